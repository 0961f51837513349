"""`ensemble-train router`: train a population's mixture router on how well each member does per prompt.

The pipeline, in the order that keeps a bad input from costing an engine start:

1. **checks**: the population loads, ``top_k`` fits its member count, the base model is a local
   folder (the router's features come from it), and the problems load; any failure is a
   :class:`RouteError` before anything runs or is written;
2. **answers**: every member answers every training and held-out problem greedily in ONE multi-LoRA
   vLLM batch (the engine layer the server uses), so all members are judged on identical prompts;
3. **quality**: ``quality[n, m] = 1`` when member ``m``'s answer to problem ``n`` verifies, else 0
   (:func:`trainer.router.evaluation.correctness`);
4. **training**: :func:`trainer.router.train.train_router` on the base model's prompt features, computed by
   :class:`ensemble_serve.shared.router.RouterFeatures`, the code the server runs;
5. **evaluation**: on the held-out problems, the routed top-1 member, the routed top-k vote, the vote
   of all members, the best single member and the oracle (some member is right), by
   :func:`trainer.router.evaluation.heldout_report`;
6. **install** (unless a dry run): ``router/`` is written with :func:`ensemble_serve.shared.router.save_router`
   and the manifest's ``router`` entry with :func:`ensemble_serve.shared.population.write_manifest`. If either
   step fails, the previous router folder and manifest are put back, so a server never sees the new
   weights with the old entry or the other way round for longer than the two renames take.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ensemble_serve.shared.engine_config import EngineConfig
from ensemble_serve.shared.fsutil import atomic_write_bytes, atomic_write_text, remove_tree, tmp_dir_beside
from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.population import (
    Manifest,
    Population,
    PopulationError,
    load_population,
    read_manifest,
    write_manifest,
)
from ensemble_serve.shared.router import (
    DEFAULT_FEATURE,
    ROUTER_DIR,
    Router,
    RouterError,
    RouterFeatures,
    safe_gates,
    save_router,
)
from ensemble_serve.shared.voting import Candidate
from trainer.engines import EngineMismatch
from trainer.evolve.problems import load_dataset
from trainer.evolve.run import EvolveError
from trainer.router.config import RouterCommandConfig
from trainer.router.evaluation import METHODS, correctness, heldout_report
from trainer.router.plots import plot_specialisation
from trainer.router.train import RouterTrainConfig, targets_from_correctness, train_router
from trainer.scoring import greedy_answers
from trainer.tasks.sandbox import Problem, generate_problems

__all__ = [
    "RouteError",
    "format_report",
    "generate_answers",
    "install_router",
    "router_problems",
    "run_router",
    "specialisation_plot_path",
    "split_dataset",
    "train_config",
]


class RouteError(ValueError):
    """The population, dataset or settings cannot give a router, or installing it failed; the message says why."""


# --------------------------------------------------------------------------- inputs


def specialisation_plot_path(out: Path) -> Path:
    """Where the gate heat map goes beside the JSON results: ``results.json`` -> ``results-specialisation.png``."""
    return out.with_name(out.stem + "-specialisation.png")


def train_config(cfg: RouterCommandConfig) -> RouterTrainConfig:
    """The router training settings of a command config (the command's seed also seeds the router)."""
    return RouterTrainConfig(
        variant=cfg.variant,
        feature=cfg.feature,
        hidden_dim=cfg.hidden_dim,
        floor_max=cfg.floor_max,
        t_start=cfg.t_start,
        t_end=cfg.t_end,
        anneal=cfg.anneal,
        steps=cfg.steps,
        lr=cfg.lr,
        seed=cfg.seed,
    )


def split_dataset(problems: Sequence[Problem], per_domain: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Split labelled rows into (train, held-out): ``per_domain`` random rows of each domain are held out.

    At most half of a domain is held out (rounded down), so every domain the file has still
    trains the router; which rows are held out depends only on ``seed`` and the file.
    """
    by_domain: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        by_domain.setdefault(p.domain, []).append(i)
    rng = random.Random(seed)
    held: set[int] = set()
    for rows in by_domain.values():
        rows = list(rows)
        rng.shuffle(rows)
        held.update(rows[: min(per_domain, len(rows) // 2)])
    train = [p for i, p in enumerate(problems) if i not in held]
    heldout = [p for i, p in enumerate(problems) if i in held]
    return train, heldout


def router_problems(cfg: RouterCommandConfig) -> tuple[list[Problem], list[Problem]]:
    """Training and held-out problems: sandbox splits, or the labelled rows of ``cfg.data`` split by domain."""
    if cfg.data is not None:
        try:
            rows = load_dataset(cfg.data, cfg.skip_invalid)
        except EvolveError as e:
            raise RouteError(str(e)) from None
        labelled = [p for p in rows if p.answer is not None]
        if not labelled:
            raise RouteError(
                f"{cfg.data}: no rows with an `answer`; the router learns from verified answers, so it needs labels"
            )
        return split_dataset(labelled, cfg.heldout_per_domain, cfg.eval_seed)
    train = generate_problems(
        cfg.per_domain * len(cfg.domains),
        seed=cfg.seed,
        split="train",
        domains=list(cfg.domains),
        difficulties=list(cfg.difficulties),
    )
    heldout = generate_problems(
        cfg.heldout_per_domain * len(cfg.domains),
        seed=cfg.eval_seed,
        split="heldout",
        domains=list(cfg.domains),
        difficulties=list(cfg.difficulties),
    )
    return train, heldout


# --------------------------------------------------------------------------- answers


def generate_answers(
    population: Population,
    problems: Sequence[Problem],
    cfg: RouterCommandConfig,
    progress: bool = False,
    engine: OfflineEngine | None = None,
) -> list[list[Candidate]]:
    """Each member's greedy answer to each problem, ``[problem][member]`` in manifest order.

    Every (member, problem) pair goes into one multi-LoRA ``generate`` call, so vLLM batches all
    members in the same steps. An engine started here is dropped before returning: the router's
    features load the base model next, and both need not be in memory at once. A caller's
    ``engine`` is checked, synced to the population and left running.
    """
    members = population.names
    ecfg = EngineConfig(gpu_memory_utilization=cfg.gpu_memory_utilization, seed=cfg.seed)
    try:
        cands = greedy_answers(
            population, members, problems, cfg.max_tokens, ecfg, engine=engine, remote=cfg, progress=progress
        )
    except EngineMismatch as e:
        raise RouteError(str(e)) from None
    return [[cands[m][i] for m in members] for i in range(len(problems))]


# --------------------------------------------------------------------------- install


def _restore(target: Path, backup: Path | None) -> None:
    """Put the router folder back as it was before the install (``backup`` holds its copy, or None if there was none)."""
    if backup is None:
        remove_tree(target)
        return
    aside = tmp_dir_beside(target)
    try:
        if target.exists() or target.is_symlink():
            os.rename(target, aside / "failed")
        os.rename(backup, target)
    finally:
        remove_tree(aside)


def install_router(root: Path, router: Router, entry: dict[str, Any]) -> Manifest:
    """Write ``router/`` and the manifest's ``router`` entry; on any failure both stay as they were.

    The manifest is re-read here (training takes a while) and must still list the members the
    router was trained for, in the same order, because gates are positional. The new manifest is
    validated before anything is touched; the previous router folder is copied aside first so it
    can be put back if writing the manifest fails after the new folder is in place.
    """
    root = Path(root)
    try:
        manifest = read_manifest(root)
    except PopulationError as e:
        raise RouteError(str(e)) from None
    if manifest.names != router.members:
        raise RouteError(
            f"{root}: the population changed while the router trained (members now {manifest.names}, "
            f"trained for {router.members}); run the command again"
        )
    try:
        new = Manifest.model_validate({**manifest.model_dump(mode="json"), "router": entry})
    except ValueError as e:
        raise RouteError(f"{root}: the router entry would make an invalid manifest: {e}") from None
    target = root / ROUTER_DIR
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise RouteError(f"{target}: exists and is not a router folder; move it away first")
    holder: Path | None = None
    backup: Path | None = None
    try:
        if target.is_dir():
            holder = tmp_dir_beside(target)
            backup = holder / "previous"
            shutil.copytree(target, backup, symlinks=True)
        try:
            save_router(router, target)
            write_manifest(root, new)
        except BaseException:
            _restore(target, backup)
            raise
    except (OSError, PopulationError, RouterError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RouteError(
            f"{root}: could not install the router ({reason}); the previous router and manifest are intact"
        ) from e
    finally:
        if holder is not None:
            remove_tree(holder)
    return new


# --------------------------------------------------------------------------- the command


def _check_population(cfg: RouterCommandConfig) -> Population:
    try:
        population = load_population(cfg.population)
    except PopulationError as e:
        raise RouteError(str(e)) from None
    n = len(population.names)
    if cfg.top_k > n:
        raise RouteError(
            f"top_k {cfg.top_k} is larger than the population: {cfg.population} has {n} member(s) "
            f"({', '.join(population.names)}); use a top_k from 1 to {n}"
        )
    if population.base_model_path is None:
        raise RouteError(
            f"{cfg.population}: the manifest names no local base model folder (base_model.path); "
            "the router's features are computed from the base model's weights"
        )
    return population


def _vetted_gates(router: Router, features: torch.Tensor, what: str) -> torch.Tensor:
    gates, problem = safe_gates(router, features)
    if gates is None:
        raise RouteError(f"the trained router is unusable on the {what} prompts ({problem}); nothing was installed")
    return gates


def run_router(
    cfg: RouterCommandConfig, dry_run: bool = False, progress: bool = True, engine: OfflineEngine | None = None
) -> dict[str, Any]:
    """Train, evaluate and (unless ``dry_run``) install the population's router; return the results.

    Every check that needs no engine runs first, so bad input fails in seconds and writes nothing.
    ``cfg.out`` (JSON results) is written last, after a successful install or dry run. ``engine``:
    an :class:`OfflineEngine` on the population's base model to use instead of starting one
    (checked, synced to this population and left running).
    """
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    train, heldout = router_problems(cfg)
    population = _check_population(cfg)
    members = population.names
    tcfg = train_config(cfg)
    feature = cfg.feature or DEFAULT_FEATURE[cfg.variant]

    t = time.perf_counter()
    answers = generate_answers(population, [*train, *heldout], cfg, progress=progress, engine=engine)
    train_answers, heldout_answers = answers[: len(train)], answers[len(train) :]
    seconds["generate"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    quality = targets_from_correctness(correctness(train, train_answers))
    x_train, x_heldout = _prompt_features(population, train, heldout, feature)
    router, metrics = train_router(
        x_train,
        quality,
        members,
        population.manifest.base_model.name,
        tcfg,
        progress=progress,
        domains=[p.domain for p in train],
    )
    _vetted_gates(router, x_train, "training")
    seconds["train"] = round(time.perf_counter() - t, 1)

    report = None
    if heldout:
        gates = _vetted_gates(router, x_heldout, "held-out")
        report = heldout_report(heldout, heldout_answers, gates, members, cfg.top_k)
    entry = _manifest_entry(cfg, feature, members, len(heldout), report)
    if not dry_run:
        install_router(population.root, router, entry)
    seconds["total"] = round(time.perf_counter() - started, 1)
    train_accuracy = {m: round(float(v), 4) for m, v in zip(members, quality.mean(dim=0).tolist())}
    result = {
        "population": str(cfg.population),
        "generation": population.manifest.generation,
        "members": list(members),
        "variant": cfg.variant,
        "feature": feature,
        "top_k": cfg.top_k,
        "problems": {"train": len(train), "heldout": len(heldout)},
        "train_accuracy": train_accuracy,
        "router": metrics,
        "heldout": report,
        "installed": not dry_run,
        "router_dir": None if dry_run else str(population.root / ROUTER_DIR),
        "manifest_router": entry,
        "seconds": seconds,
    }
    if cfg.out is not None:
        _write_results(Path(cfg.out), result)
    return result


def _prompt_features(
    population: Population, train: Sequence[Problem], heldout: Sequence[Problem], feature: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router features of the training and held-out prompts, from the population's base model."""
    try:
        features = RouterFeatures(population.base_model_path)
        x_train = features([p.prompt for p in train], feature)
        x_heldout = features([p.prompt for p in heldout], feature)
    except RouterError as e:
        raise RouteError(str(e)) from None
    return x_train, x_heldout


def _manifest_entry(
    cfg: RouterCommandConfig, feature: str, members: Sequence[str], n_heldout: int, report: dict[str, Any] | None
) -> dict[str, Any]:
    """The manifest's ``router`` entry: the router's shape and, with held-out problems, each method's accuracy."""
    summary = None if report is None else {m: report["accuracy"][m]["all"] for m in METHODS}
    return {
        "path": ROUTER_DIR,
        "variant": cfg.variant,
        "feature": feature,
        "members": list(members),
        "top_k": cfg.top_k,
        "heldout": None if summary is None else {"problems": n_heldout, **summary},
    }


def _write_results(out: Path, result: dict[str, Any]) -> None:
    """``out`` (the results as JSON) and, when the router has a per-domain table, its heat map beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    png = plot_specialisation(
        result["router"].get("specialisation") or {}, f"Mean {result['variant']} gate per domain (training prompts)"
    )
    if png is not None:
        atomic_write_bytes(specialisation_plot_path(out), png)


# --------------------------------------------------------------------------- report


def _row(label: str, values: dict[str, float], columns: Sequence[str], width: int) -> str:
    return f"{label:<{width}}" + "".join(f"{values.get(c, float('nan')):>9.3f}" for c in columns)


def format_report(result: dict[str, Any]) -> str:
    """The printed summary: training figures, the held-out accuracy table and the per-domain mean gates."""
    members = result["members"]
    metrics = result["router"]
    lines = [
        f"router: {result['variant']} on {result['feature']}, {len(members)} members, "
        f"{result['problems']['train']} training / {result['problems']['heldout']} held-out problems, "
        f"final loss {metrics['final_loss']:.4f}",
        "training accuracy: " + ", ".join(f"{m} {a:.3f}" for m, a in result["train_accuracy"].items()),
    ]
    report = result["heldout"]
    if report is None:
        lines.append("no held-out problems: evaluation skipped")
    else:
        acc = report["accuracy"]
        labels = {
            "routed_top1": "routed top-1",
            "routed_top_k": f"routed top-{report['top_k']} vote",
            "all_vote": "all-member vote",
            "best_member": f"best member ({report['best_member']})",
            "oracle": "oracle",
        }
        width = max(len(s) for s in labels.values()) + 2
        columns = [c for c in acc["oracle"] if c != "all"] + ["all"]
        head = f"{'held-out accuracy':<{width}}" + "".join(f"{c:>9}" for c in columns)
        lines += ["", head, "-" * len(head)]
        lines += [_row(labels[m], acc[m], columns, width) for m in METHODS]
        lines.append("routed top-1 picks: " + ", ".join(f"{m} {n}" for m, n in report["routed_top1_choice"].items()))
    table = metrics.get("specialisation") or {}
    if table:
        width = max(12, *(len(d) + 2 for d in table))
        head = f"{'mean gate':<{width}}" + "".join(f"{m:>9}" for m in members)
        lines += ["", head, "-" * len(head)]
        lines += [f"{d:<{width}}" + "".join(f"{row[m]:>9.3f}" for m in members) for d, row in table.items()]
        lines.append(f"specialisation score {metrics.get('specialisation_score', 0.0):.3f} (0: same gates everywhere)")
    lines.append("")
    if result["installed"]:
        lines.append(f"installed: {result['router_dir']} (population.json `router` entry updated)")
    else:
        lines.append("dry run: nothing installed")
    return "\n".join(lines)
