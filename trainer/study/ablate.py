"""`ensemble-train ablate`: a two-level factorial over the population's switches, measured by balanced log-PPL.

The switches (:data:`trainer.config.ABLATION_FACTORS`, reference level first):

=========== ================= ============== =====================================================
factor      reference         test           what changes
=========== ================= ============== =====================================================
router      softmax           sigmoid_floor  the mixture router's variant (baseline vs rewrite)
scope       global            domain_loo     fitness of the per-problem terms (evaluation scope)
lifecycle   off               on             death, inheritance, SVD mutation, reallocation
evolution   off               on             selection/crossover/mutation (off: gradient phase only)
init        random            pre_aligned    starting adapters: PEFT's initialisation vs warmed-up
=========== ================= ============== =====================================================

A **cell** is one combination of levels; it runs once per seed with the same budget
(``generations`` evolve generations of ``evolve.train_steps`` gradient steps per member):

1. **stage**: the starting population (pre-aligned, or the same members re-initialised as PEFT does)
   is evolved with the cell's scope/lifecycle/evolution levels. Cells that differ only in the
   router share the stage (it is the same run), so the router comparison is paired on identical
   adapters;
2. **router**: trained on ``router_per_domain`` sandbox prompts per domain, on per-prompt member
   quality (a softmax over members of their reference-chain log-likelihoods) or end to end
   through the mixture (``router_objective``);
3. **evaluation**: each held-out prompt's reference chain is scored under the prompt's mixture of
   the members (:class:`trainer.models.mixture_lm.MixtureLM`, the server's ``mixture`` weights); the
   cell's value is the balanced log-PPL (mean over domains of log-PPL). The uniform mixture,
   the best single member and the bare base are scored too, for reference.

Each cell's result is one JSON file written atomically, so an interrupted ablation resumes where it
stopped and finished cells are never recomputed. A cell that raises is recorded as failed (its
error kept) and the rest go on; the report lists the missing cells, and running the same command
again retries them. The report: per-factor effects (mean, SE, paired t-test p), per-domain effects,
the requested interactions, a cell table, and plots (``effects.png``, ``domains.png``).
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from ensemble_serve.shared.fsutil import atomic_write_bytes, atomic_write_text, remove_tree
from trainer.study.stats import balanced_log_ppl, factor_effects, paired_effect
from trainer.config import ABLATION_FACTORS, AblateConfig, EvolveConfig

__all__ = [
    "DEFAULT_LEVELS",
    "AblationError",
    "CellRunner",
    "cell_id",
    "design_cells",
    "plan",
    "report",
    "run_ablation",
]

DEFAULT_LEVELS = {
    "router": "sigmoid_floor",
    "scope": "global",
    "lifecycle": "off",
    "evolution": "on",
    "init": "pre_aligned",
}
"""Levels of the switches that an ablation neither varies nor fixes."""

STAGE_FACTORS = ("init", "evolution", "scope", "lifecycle")
"""The switches that change the evolve run (the router only changes what is trained on its result)."""

RUN_FILE = "ablate-run.json"
REPORT_JSON = "ablation.json"
REPORT_MD = "ablation.md"


class AblationError(ValueError):
    """An ablation that cannot run or be reported: its folder holds another config, or no cell finished."""


# --------------------------------------------------------------------------- the design


def design_cells(factors: Sequence[str], design: str) -> list[dict[str, bool]]:
    """The cells of a two-level design, as {factor: on}: full 2^k, or the half fraction I = product of all.

    The half fraction keeps the cells whose levels, coded -1/+1, multiply to +1 (the principal
    fraction), so every main effect is balanced over the other factors.
    """
    cells = [dict(zip(factors, bits)) for bits in itertools.product((False, True), repeat=len(factors))]
    if design == "full":
        return cells
    if design == "half":
        return [c for c in cells if math.prod(1 if on else -1 for on in c.values()) == 1]
    raise AblationError(f"unknown design {design!r}; known: full, half")


def levels_of(cfg: AblateConfig, cell: Mapping[str, bool]) -> dict[str, str]:
    """Every switch's level in a cell: the cell's for varied factors, else fixed, else the default."""
    out = {}
    for name, (ref, test) in ABLATION_FACTORS.items():
        if name in cell:
            out[name] = test if cell[name] else ref
        else:
            out[name] = cfg.fixed.get(name, DEFAULT_LEVELS[name])
    return out


def cell_id(levels: Mapping[str, str], factors: Sequence[str]) -> str:
    """Folder-safe name of a cell from its varied factors' levels, e.g. ``router-softmax__scope-global``."""
    return "__".join(f"{f}-{levels[f]}" for f in factors)


def stage_id(levels: Mapping[str, str]) -> str:
    return "__".join(f"{f}-{levels[f]}" for f in STAGE_FACTORS)


@dataclass(frozen=True)
class Cell:
    """One cell of the design: its coded levels (varied factors), every switch's level, and its names."""

    coded: tuple[tuple[str, bool], ...]
    levels: dict[str, str]
    id: str
    stage: str


def plan(cfg: AblateConfig) -> list[Cell]:
    """The design's cells, ordered so that cells sharing an evolve stage are adjacent."""
    cells = []
    for c in design_cells(cfg.factors, cfg.design):
        levels = levels_of(cfg, c)
        cells.append(Cell(tuple(sorted(c.items())), levels, cell_id(levels, cfg.factors), stage_id(levels)))
    return sorted(cells, key=lambda c: (c.stage, c.id))


def config_hash(cfg: AblateConfig) -> str:
    """Hash of everything that changes a cell's result (not the seeds, the folder, or what only the report reads)."""
    payload = cfg.model_dump(mode="json", exclude={"seeds", "out", "threads", "gpu_memory_utilization", "interactions"})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def result_path(out: Path, cell: Cell, seed: int) -> Path:
    return out / "cells" / cell.id / f"seed-{seed}.json"


def failed_path(out: Path, cell: Cell, seed: int) -> Path:
    return out / "cells" / cell.id / f"seed-{seed}.failed.json"


# --------------------------------------------------------------------------- running


class Runner(Protocol):
    """What runs one cell: ``run(cell, seed)`` returns the cell's result (see :class:`CellRunner`)."""

    def run(self, cell: Cell, seed: int, note: Callable[[str], None]) -> dict[str, Any]: ...

    def close(self) -> None: ...


def _prepare_out(cfg: AblateConfig) -> None:
    out = cfg.out
    run_file = out / RUN_FILE
    digest = config_hash(cfg)
    if run_file.exists():
        try:
            have = json.loads(run_file.read_text())
        except (OSError, ValueError) as e:
            raise AblationError(f"{run_file}: unreadable ({e}); use a new --out") from None
        if have.get("config_hash") != digest:
            raise AblationError(
                f"{out} holds an ablation of another config (hash {have.get('config_hash')}, this one {digest}); "
                "use a new --out, or the config it was started with (only seeds, interactions, threads and "
                "gpu_memory_utilization may change)"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise AblationError(f"{out} exists and is not an ablation folder; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_file, json.dumps({"config_hash": digest, "config": cfg.model_dump(mode="json")}, indent=2))


def run_ablation(cfg: AblateConfig, runner: Runner | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every (cell, seed) that has no result yet, then write and return the report.

    A cell that raises is recorded in ``<cell>/seed-<s>.failed.json`` and the next one runs;
    Ctrl-C (``KeyboardInterrupt``) stops after writing the report of what is finished, then
    re-raises. A later run of the same config retries failed and unfinished cells only.
    """
    _prepare_out(cfg)
    cells = plan(cfg)
    todo = [(c, s) for s in cfg.seeds for c in cells if not result_path(cfg.out, c, s).exists()]
    runner = runner if runner is not None else CellRunner(cfg, progress=False)
    bar = tqdm(total=len(todo), desc="ablation cells", unit="cell", disable=not progress)
    try:
        for cell, seed in todo:
            bar.set_description(f"{cell.id} seed {seed}")
            failed = failed_path(cfg.out, cell, seed)
            started = time.perf_counter()
            try:
                result = runner.run(cell, seed, lambda what: bar.set_postfix_str(what))
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 (a crashed cell is recorded; the rest go on)
                record = {
                    "cell": cell.id,
                    "seed": seed,
                    "levels": cell.levels,
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(limit=8),
                    "seconds": round(time.perf_counter() - started, 2),
                }
                failed.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(failed, json.dumps(record, indent=2))
                tqdm.write(f"cell {cell.id} seed {seed} FAILED: {record['error']}")
            else:
                result = {"cell": cell.id, "seed": seed, "levels": cell.levels, **result}
                result["seconds"] = {**result.get("seconds", {}), "total": round(time.perf_counter() - started, 2)}
                path = result_path(cfg.out, cell, seed)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(result, indent=2))
                failed.unlink(missing_ok=True)
            bar.update(1)
    finally:
        bar.close()
        runner.close()
        summary = report(cfg) if any(_results(cfg, cells)) else None
    return summary if summary is not None else {}


# --------------------------------------------------------------------------- the report


def _results(cfg: AblateConfig, cells: Sequence[Cell]) -> list[tuple[Cell, int, dict[str, Any]]]:
    found = []
    for cell in cells:
        for seed in cfg.seeds:
            path = result_path(cfg.out, cell, seed)
            if path.exists():
                found.append((cell, seed, json.loads(path.read_text())))
    return found


def _effect_or_reason(cells: dict, factor: str) -> dict[str, Any]:
    """The factor's effect as a dict, with the seeds its deltas belong to; not estimable: ``missing`` says why.

    A degenerate test (every delta identical and non-zero) has t = +-inf; it is written as None
    (with p = 0.0) so the report stays strict JSON.
    """
    try:
        out = factor_effects(cells, [factor])[factor].as_dict()
    except ValueError as e:
        return {"n": 0, "mean": None, "se": None, "t": None, "p": None, "deltas": [], "seeds": [], "missing": str(e)}
    out["seeds"] = sorted(set.intersection(*(set(v) for v in cells.values())))
    if out["t"] is not None and not math.isfinite(out["t"]):
        out["t"] = None
    return out


def _sub(cells: dict, factor: str, on: bool) -> dict:
    return {k: v for k, v in cells.items() if dict(k)[factor] == on}


def report(cfg: AblateConfig) -> dict[str, Any]:
    """Effects, per-domain effects, interactions and the cell table from the finished cells; writes the files.

    Only seeds with a result in every cell a comparison uses are paired (see
    :func:`trainer.study.stats.factor_effects`); cells or seeds without a result are listed
    under ``missing`` with the reason (failed, with its error, or not run).
    """
    run_file = cfg.out / RUN_FILE
    if run_file.exists():
        try:
            have = json.loads(run_file.read_text()).get("config_hash")
        except (OSError, ValueError) as e:
            raise AblationError(f"{run_file}: unreadable ({e})") from None
        if have != config_hash(cfg):
            raise AblationError(
                f"{cfg.out} holds an ablation of another config (hash {have}, this one {config_hash(cfg)}); "
                "report it with the config it was run with"
            )
    cells = plan(cfg)
    found = _results(cfg, cells)
    if not found:
        raise AblationError(f"{cfg.out}: no finished cell to report on")
    values: dict[tuple, dict[int, float]] = {c.coded: {} for c in cells}
    domains = sorted({d for _, _, r in found for d in r["per_domain"]})
    per_domain: dict[str, dict[tuple, dict[int, float]]] = {d: {c.coded: {} for c in cells} for d in domains}
    for cell, seed, r in found:
        values[cell.coded][seed] = r["balanced_log_ppl"]
        for d, v in r["per_domain"].items():
            per_domain[d][cell.coded][seed] = v

    missing = []
    for cell in cells:
        for seed in cfg.seeds:
            if seed in values[cell.coded]:
                continue
            failed = failed_path(cfg.out, cell, seed)
            reason = json.loads(failed.read_text())["error"] if failed.exists() else "not run"
            missing.append({"cell": cell.id, "seed": seed, "reason": reason})
    # a cell with no result at all cannot enter a paired comparison
    present = {k: v for k, v in values.items() if v}

    effects = {f: _effect_or_reason(present, f) for f in cfg.factors}
    domain_effects = {
        f: {d: _effect_or_reason({k: v for k, v in per_domain[d].items() if v}, f) for d in domains}
        for f in cfg.factors
    }
    interactions = []
    for a, b in cfg.interactions:
        entry: dict[str, Any] = {"factor": a, "by": b}
        at = {}
        for on in (False, True):
            level = ABLATION_FACTORS[b][1 if on else 0]
            at[level] = _effect_or_reason(_sub(present, b, on), a)
        entry["effect_at"] = at
        off_e, on_e = at[ABLATION_FACTORS[b][0]], at[ABLATION_FACTORS[b][1]]
        common = sorted(set(off_e["seeds"]) & set(on_e["seeds"]))
        if common:
            # interaction = A's effect where B is on minus where B is off, paired by seed
            on_d = dict(zip(on_e["seeds"], on_e["deltas"]))
            off_d = dict(zip(off_e["seeds"], off_e["deltas"]))
            diff = paired_effect([on_d[x] for x in common], [off_d[x] for x in common]).as_dict()
            diff["seeds"] = common
            if diff["t"] is not None and not math.isfinite(diff["t"]):
                diff["t"] = None
            entry["difference"] = diff
        interactions.append(entry)

    table = []
    for cell in cells:
        rows = [r for c, _, r in found if c.id == cell.id]
        table.append(
            {
                "cell": cell.id,
                "levels": {f: cell.levels[f] for f in cfg.factors},
                "seeds": sorted(r["seed"] for r in rows),
                "balanced_log_ppl": _mean_se([r["balanced_log_ppl"] for r in rows]),
                "uniform_mixture": _mean_se([r["reference"]["uniform"]["balanced_log_ppl"] for r in rows]),
                "best_member": _mean_se([r["reference"]["best_member"]["balanced_log_ppl"] for r in rows]),
                "base": _mean_se([r["reference"]["base"]["balanced_log_ppl"] for r in rows]),
                "specialisation": _mean_se([r["router"].get("specialisation_score", 0.0) for r in rows]),
                "seconds": _mean_se([r["seconds"]["total"] for r in rows]),
            }
        )
    summary = {
        "config_hash": config_hash(cfg),
        "factors": {f: list(ABLATION_FACTORS[f]) for f in cfg.factors},
        "fixed": {f: lv for f, lv in levels_of(cfg, {}).items() if f not in cfg.factors},
        "design": cfg.design,
        "seeds": list(cfg.seeds),
        "metric": "balanced log-PPL of held-out reference chains under the routed mixture; "
        "effect = log PPL(reference level) - log PPL(test level), positive = the test level improves",
        "effects": effects,
        "domain_effects": domain_effects,
        "interactions": interactions,
        "cells": table,
        "missing": missing,
        "complete": not missing,
    }
    atomic_write_text(cfg.out / REPORT_JSON, json.dumps(summary, indent=2))
    atomic_write_text(cfg.out / REPORT_MD, format_report(summary))
    for name, png in (("effects.png", plot_effects(summary)), ("domains.png", plot_domain_effects(summary))):
        if png is not None:
            atomic_write_bytes(cfg.out / name, png)
    return summary


def _mean_se(xs: Sequence[float]) -> dict[str, float | int | None]:
    n = len(xs)
    if not n:
        return {"n": 0, "mean": None, "se": None}
    mean = sum(xs) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None
    return {"n": n, "mean": mean, "se": se}


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _p(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}")


def _effect_row(name: str, e: Mapping[str, Any]) -> str:
    if e.get("missing"):
        return f"| {name} | - | - | - | - | not estimable: {e['missing']} |"
    return f"| {name} | {_f(e['mean'], 5)} | {_f(e['se'], 5)} | {_p(e['p'])} | {e['n']} | |"


def format_report(s: Mapping[str, Any]) -> str:
    """The report as Markdown: effects, interactions, per-domain effects, cells, missing cells."""
    lines = [
        "# Ablation report",
        "",
        f"Design: {s['design']} over {', '.join(s['factors'])}; fixed: "
        + (", ".join(f"{k}={v}" for k, v in s["fixed"].items()) or "none")
        + f"; seeds {s['seeds']}.",
        "",
        f"Metric: {s['metric']}.",
        "",
        "## Effects",
        "",
        "| factor (reference -> test) | mean delta | SE | p (paired t) | seeds | |",
        "|---|---|---|---|---|---|",
    ]
    for f, e in s["effects"].items():
        ref, test = s["factors"][f]
        lines.append(_effect_row(f"{f} ({ref} -> {test})", e))
    if s["interactions"]:
        lines += [
            "",
            "## Interactions",
            "",
            "| effect of | where | mean delta | SE | p | seeds | |",
            "|---|---|---|---|---|---|---|",
        ]
        for it in s["interactions"]:
            for level, e in it["effect_at"].items():
                lines.append(_effect_row(f"{it['factor']} | {it['by']}={level}", e))
            if "difference" in it:
                lines.append(_effect_row(f"{it['factor']} | difference (on - off)", it["difference"]))
    domains = sorted({d for per in s["domain_effects"].values() for d in per})
    if domains:
        lines += ["", "## Effects per domain (mean delta, p)", "", "| factor | " + " | ".join(domains) + " |"]
        lines.append("|---" * (len(domains) + 1) + "|")
        for f, per in s["domain_effects"].items():
            cells = [
                f"{_f(per[d]['mean'], 3)} ({_p(per[d]['p'])})" if per.get(d, {}).get("n") else "-" for d in domains
            ]
            lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cells (balanced log-PPL, mean +- SE over seeds)",
        "",
        "| cell | seeds | routed mixture | uniform mixture | best member | base | specialisation | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in s["cells"]:

        def ms(x: Mapping[str, Any], digits: int = 4) -> str:
            if x["mean"] is None:
                return "-"
            return _f(x["mean"], digits) + ("" if x["se"] is None else f" +- {_f(x['se'], digits)}")

        lines.append(
            f"| {row['cell']} | {len(row['seeds'])} | {ms(row['balanced_log_ppl'])} | {ms(row['uniform_mixture'])} | "
            f"{ms(row['best_member'])} | {ms(row['base'])} | {ms(row['specialisation'], 3)} | {ms(row['seconds'], 0)} |"
        )
    lines += ["", "## Missing cells", ""]
    if s["missing"]:
        lines += [f"- {m['cell']} seed {m['seed']}: {m['reason']}" for m in s["missing"]]
    else:
        lines.append("None: every cell finished for every seed.")
    return "\n".join(lines) + "\n"


def plot_effects(s: Mapping[str, Any]) -> bytes | None:
    """Bar chart of each factor's mean effect with +-1 SE bars and the p-value on top."""
    from trainer.study.report import _new_figure, _png

    rows = [(f, e) for f, e in s["effects"].items() if e.get("n")]
    if not rows:
        return None
    fig = _new_figure(max(4.4, 1.6 + 1.3 * len(rows)), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(rows))
    means = [e["mean"] for _, e in rows]
    errs = [e["se"] or 0.0 for _, e in rows]
    colors = ["tab:green" if m > 0 else "tab:red" for m in means]
    ax.bar(xs, means, yerr=errs, color=colors, capsize=4, alpha=0.8)
    ax.axhline(0.0, color="black", lw=0.8)
    for x, (m, err, (_, e)) in enumerate(zip(means, errs, rows)):
        ax.annotate(
            f"p={_p(e['p'])}",
            (x, m + (err if m >= 0 else -err)),
            ha="center",
            va="bottom" if m >= 0 else "top",
            fontsize=8,
        )
    ax.set_xticks(list(xs), [f"{f}\n{s['factors'][f][0]}->{s['factors'][f][1]}" for f, _ in rows], fontsize=8)
    ax.set_ylabel("delta log-PPL (positive = improves)")
    ax.set_title("Effect on balanced log-PPL\n(mean +- SE over seeds)", fontsize=9)
    return _png(fig)


def plot_domain_effects(s: Mapping[str, Any]) -> bytes | None:
    """Heat map of the mean effect per factor (rows) and domain (columns)."""
    from trainer.study.report import _new_figure, _png

    factors = list(s["domain_effects"])
    domains = sorted({d for per in s["domain_effects"].values() for d in per})
    if not factors or not domains:
        return None
    grid = [[(s["domain_effects"][f].get(d) or {}).get("mean") for d in domains] for f in factors]
    flat = [abs(v) for row in grid for v in row if v is not None]
    if not flat:
        return None
    lim = max(flat) or 1.0
    fig = _new_figure(max(4.4, 1.5 + 0.9 * len(domains)), 1.6 + 0.5 * len(factors))
    ax = fig.add_subplot(1, 1, 1)
    data = [[math.nan if v is None else v for v in row] for row in grid]
    im = ax.imshow(data, cmap="RdYlGn", vmin=-lim, vmax=lim, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if v is None else f"{v:.3f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(domains)), domains, fontsize=8)
    ax.set_yticks(range(len(factors)), factors, fontsize=8)
    ax.set_title("Effect per domain (delta log-PPL, positive = improves)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)


# --------------------------------------------------------------------------- the real cell


class CellRunner:
    """Runs cells for real: evolve (vLLM self-play, PEFT training) then router training and mixture scoring.

    One vLLM engine serves every evolve stage of the ablation (its adapters are re-synced to each
    stage's population), one copy of the base model serves the router features, and each stage's
    mixture model and member scores are kept while the cells of that stage run.
    """

    def __init__(self, cfg: AblateConfig, progress: bool = False) -> None:
        import torch

        from ensemble_serve.config import EMBEDDED_POPULATION

        self.cfg = cfg
        self.progress = progress
        self.source = Path(cfg.population) if cfg.population is not None else EMBEDDED_POPULATION
        self.evolve_base = EvolveConfig(**cfg.evolve)
        self.engine = None
        self.features = None
        self._snapshots = tempfile.TemporaryDirectory(prefix="ensemble-ablate-adapters-")
        self._stage_cache: tuple[Path, dict[str, Any]] | None = None
        self._failed_stages: dict[str, str] = {}
        torch.set_num_threads(cfg.threads)

    def close(self) -> None:
        self.engine = None
        self.features = None
        self._stage_cache = None
        gc.collect()
        self._snapshots.cleanup()

    # -- the starting populations

    def _start(self, init: str, seed: int) -> Path:
        if init == "pre_aligned":
            return self.source
        root = self.cfg.out / "starts" / f"random-seed-{seed}"
        if not root.exists():
            self._random_start(root, seed)
        return root

    def _random_start(self, root: Path, seed: int) -> None:
        """The source population's members re-initialised as PEFT initialises LoRA (B = 0), seeded per member."""
        import torch

        from ensemble_serve.shared.lora import load_lora, save_lora
        from ensemble_serve.shared.population import create_population, load_population
        from trainer.evolve.loop import derive_seed
        from trainer.evolve.lifecycle import fresh_adapter

        source = load_population(self.source)
        base = source.manifest.base_model
        if base.path is not None and source.base_model_path is not None:
            base = base.model_copy(update={"path": os.path.relpath(source.base_model_path.resolve(), root.absolute())})
        members = [
            m.model_copy(update={"path": f"members/{m.name}", "fitness": None, "domain_scores": {}, "parents": []})
            for m in source.manifest.members
        ]
        manifest = source.manifest.model_copy(update={"members": members, "base_model": base, "generation": 0})
        with tempfile.TemporaryDirectory(prefix="ensemble-ablate-fresh-") as work:
            folders = {}
            for m in source.manifest.members:
                rng = torch.Generator().manual_seed(derive_seed("ablate-random-init", seed, m.name))
                folders[m.name] = save_lora(
                    fresh_adapter(load_lora(source.member_dir(m.name)), rng), Path(work) / m.name
                )
            root.parent.mkdir(parents=True, exist_ok=True)
            create_population(root, manifest, folders)

    # -- stage: the evolve run

    def _engine(self, population_dir: Path):
        if self.engine is None:
            from ensemble_serve.shared.vllm import EngineConfig, OfflineEngine
            from ensemble_serve.shared.population import load_population
            from trainer.evolve.loop import _vllm_rank

            pop = load_population(population_dir)
            n = len(pop.names)
            rank = _vllm_rank(max(m.rank for m in pop.manifest.members), self.evolve_base.evolution.child_rank)
            self.engine = OfflineEngine(
                pop,
                EngineConfig(
                    max_loras=min(max(n, 1), 16),
                    max_cpu_loras=max(2 * n, 4),
                    max_lora_rank=rank,
                    gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                    max_num_seqs=self.evolve_base.max_num_seqs,
                    seed=0,
                ),
                snapshot_root=Path(self._snapshots.name),
            )
        return self.engine

    def evolve_config(self, levels: Mapping[str, str], seed: int, start: Path, out: Path) -> EvolveConfig:
        """The evolve run of a stage: the shared settings plus the cell's switches and the budget."""
        settings = dict(self.cfg.evolve)
        evolution = {**settings.pop("evolution", {}), "enabled": levels["evolution"] == "on"}
        lifecycle = {**settings.pop("lifecycle", {}), "enabled": levels["lifecycle"] == "on"}
        return EvolveConfig(
            **settings,
            population=start,
            out=out,
            generations=self.cfg.generations,
            seed=seed,
            fitness_scope=levels["scope"],
            heldout_per_domain=0,
            evolution=evolution,
            lifecycle=lifecycle,
        )

    def stage(self, levels: Mapping[str, str], seed: int) -> tuple[Path, dict[str, Any]]:
        """The evolved population of a stage (run, resumed, or found done) and the stage's summary."""
        from trainer.evolve.loop import RUN_FILE as EVOLVE_RUN_FILE
        from trainer.evolve.loop import run_evolve

        folder = self.cfg.out / "stages" / stage_id(levels) / f"seed-{seed}"
        done = folder / "done.json"
        population = folder / "population"
        if done.exists():
            return population, json.loads(done.read_text())
        start = self._start(levels["init"], seed)
        cfg = self.evolve_config(levels, seed, start, population)
        resume = (population / EVOLVE_RUN_FILE).exists()
        if population.exists() and not resume:
            remove_tree(population)  # a copy that never got its run file: start the stage over
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:
            _, records = run_evolve(cfg, resume=resume, progress=self.progress, engine=self._engine(start))
        except KeyboardInterrupt:
            raise
        except Exception:
            self.engine = None  # the engine may be the cause (or dead): the next stage starts a fresh one
            gc.collect()
            raise
        from ensemble_serve.shared.population import read_history

        history = [r for r in read_history(population) if "members" in r]
        summary = {
            "generations": self.cfg.generations,
            "seconds": round(time.perf_counter() - started, 2),
            "train_steps_per_member": self.cfg.generations * cfg.train_steps,
            "last": _stage_last(history),
        }
        atomic_write_text(done, json.dumps(summary, indent=2))
        return population, summary

    # -- the router and the evaluation

    def _problems(self, seed: int):
        from trainer.tasks.sandbox import generate_problems

        domains = list(self.evolve_base.domains)
        diffs = list(self.evolve_base.difficulties)
        train = generate_problems(
            self.cfg.router_per_domain * len(domains), seed=seed, split="train", domains=domains, difficulties=diffs
        )
        heldout = generate_problems(
            self.cfg.heldout_per_domain * len(domains),
            seed=self.cfg.eval_seed,
            split="heldout",
            domains=domains,
            difficulties=diffs,
        )
        return train, heldout

    def _scores(self, population_dir: Path, seed: int) -> dict[str, Any]:
        """The stage's mixture model, features and member scores (kept for the next cell of the same stage)."""
        import torch

        from ensemble_serve.shared.lora import load_lora
        from ensemble_serve.shared.population import load_population
        from ensemble_serve.shared.router import RouterFeatures
        from trainer.models.mixture_lm import MixtureLM, domain_nll, encode_chains, member_nll

        if self._stage_cache is not None and self._stage_cache[0] == population_dir:
            return self._stage_cache[1]
        self._stage_cache = None
        gc.collect()
        pop = load_population(population_dir)
        if pop.base_model_path is None:
            raise AblationError(f"{population_dir}: the base model must be a local folder (router features)")
        if self.features is None or self.features.model_dir.resolve() != pop.base_model_path.resolve():
            self.features = RouterFeatures(pop.base_model_path)
        weights = [load_lora(pop.member_dir(n)) for n in pop.names]
        lm = MixtureLM(pop.base_model_path, weights, pop.names)
        train, heldout = self._problems(seed)
        enc_train, enc_held = encode_chains(lm, train), encode_chains(lm, heldout)
        train_nll, train_count = member_nll(lm, enc_train)
        held_nll, held_count = member_nll(lm, enc_held)
        m = len(pop.names)

        def per_domain_of(nll_col: torch.Tensor) -> dict[str, tuple[float, int]]:
            acc: dict[str, list] = {}
            for p, a, b in zip(heldout, nll_col.tolist(), held_count.tolist()):
                x = acc.setdefault(p.domain, [0.0, 0])
                x[0] += a
                x[1] += b
            return {d: (v[0], int(v[1])) for d, v in sorted(acc.items())}

        members = {name: per_domain_of(held_nll[:, i]) for i, name in enumerate(pop.names)}
        best = min(pop.names, key=lambda n: balanced_log_ppl(members[n]))
        uniform = domain_nll(lm, heldout, torch.full((len(heldout), m), 1.0 / m), encoded=enc_held)
        base = domain_nll(lm, heldout, torch.zeros(len(heldout), m), encoded=enc_held)
        scores = {
            "population": pop,
            "lm": lm,
            "train": train,
            "heldout": heldout,
            "enc_train": enc_train,
            "enc_held": enc_held,
            "train_loglik": -(train_nll / train_count.clamp(min=1).unsqueeze(1)),
            "reference": {
                "uniform": _domain_summary(uniform),
                "best_member": {"name": best, **_domain_summary(members[best])},
                "base": _domain_summary(base),
                "members": {n: balanced_log_ppl(v) for n, v in members.items()},
            },
        }
        self._stage_cache = (population_dir, scores)
        return scores

    def run(self, cell: Cell, seed: int, note: Callable[[str], None]) -> dict[str, Any]:
        import torch

        from trainer.models.mixture_lm import domain_nll, mixture_weights, train_router_mixture
        from trainer.router.train import RouterTrainConfig, targets_from_loglik, train_router

        if cell.stage + f"/{seed}" in self._failed_stages:
            raise AblationError(
                f"its evolve stage failed earlier in this run: {self._failed_stages[cell.stage + f'/{seed}']}"
            )
        note("evolve")
        t0 = time.perf_counter()
        try:
            population_dir, stage = self.stage(cell.levels, seed)
        except Exception as e:
            self._failed_stages[cell.stage + f"/{seed}"] = f"{type(e).__name__}: {e}"
            raise
        t1 = time.perf_counter()
        note("score members")
        s = self._scores(population_dir, seed)
        pop = s["population"]
        rcfg = RouterTrainConfig(**{**self.cfg.router, "variant": cell.levels["router"], "seed": seed})
        feature = rcfg.feature or {"softmax": "embedding_mean", "sigmoid_floor": "hidden_mean"}[rcfg.variant]
        x_train = self.features([p.prompt for p in s["train"]], feature)
        x_held = self.features([p.prompt for p in s["heldout"]], feature)
        domains = [p.domain for p in s["train"]]
        note("router")
        t2 = time.perf_counter()
        if self.cfg.router_objective == "quality":
            quality = targets_from_loglik(s["train_loglik"], self.cfg.quality_tau)
            router, metrics = train_router(
                x_train, quality, pop.names, pop.manifest.base_model.name, rcfg, domains=domains
            )
        else:
            router, metrics = train_router_mixture(
                s["lm"], x_train, s["enc_train"], pop.manifest.base_model.name, rcfg, domains=domains
            )
        t3 = time.perf_counter()
        note("evaluate")
        with torch.no_grad():
            gates = router(x_held)
        weights = mixture_weights(gates, self.cfg.top_k)
        routed = domain_nll(s["lm"], s["heldout"], weights, encoded=s["enc_held"])
        summary = _domain_summary(routed)
        held_domains = [p.domain for p in s["heldout"]]
        from trainer.router.train import specialisation_score, specialisation_table

        held_table = specialisation_table(gates, held_domains, pop.names)
        return {
            **summary,
            "reference": s["reference"],
            "router": {
                "variant": rcfg.variant,
                "feature": feature,
                "objective": self.cfg.router_objective,
                "final_loss": metrics["final_loss"],
                "mean_gate": metrics["mean_gate"],
                "specialisation_score": specialisation_score(held_table),
                "specialisation": held_table,
            },
            "stage": stage,
            "seconds": {
                "evolve": round(t1 - t0, 2),
                "score": round(t2 - t1, 2),
                "router": round(t3 - t2, 2),
                "evaluate": round(time.perf_counter() - t3, 2),
            },
        }


def _domain_summary(per_domain: Mapping[str, tuple[float, int]]) -> dict[str, Any]:
    return {
        "balanced_log_ppl": balanced_log_ppl(per_domain),
        "per_domain": {d: nll / tokens for d, (nll, tokens) in per_domain.items()},
        "tokens": {d: tokens for d, (_, tokens) in per_domain.items()},
    }


def _stage_last(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if not history:
        return {}
    last = history[-1]
    out: dict[str, Any] = {"generation": last.get("generation")}
    for key in ("lifecycle", "train", "diversity", "fitness"):
        if key in last:
            out[key] = last[key]
    return out
