"""The ablation's report from its finished cells: effects, per-domain effects, interactions, the cell table.

Only seeds with a result in every cell a comparison uses are paired (see
:func:`trainer.study.stats.factor_effects`); cells or seeds without a result are listed under
``missing`` with the reason (failed, with its error, or not run). An effect that cannot be
estimated says why under ``missing``; a degenerate test (every delta identical and non-zero) has
t = +-inf, written as None (with p = 0.0) so the report stays strict JSON. :func:`report` writes
``ablation.json``, ``ablation.md`` and the plots.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from ensemble_serve.shared.fsutil import atomic_write_bytes, atomic_write_text
from trainer.study.ablate.config import ABLATION_FACTORS, DEFAULT_LEVELS, AblateConfig
from trainer.study.ablate.design import PROBE_FACTORS, AblationError, Cell, config_hash, levels_of, plan
from trainer.study.ablate.folder import REPORT_JSON, REPORT_MD, check_run_file, failed_path, read_results
from trainer.study.ablate.markdown import format_report
from trainer.study.ablate.plots import plot_domain_effects, plot_effects
from trainer.study.stats import factor_effects, paired_effect

__all__ = ["report"]

Values = dict[tuple, dict[int, float]]
"""A value per seed per cell (keyed by the cell's coded levels)."""
Found = list[tuple[Cell, int, dict[str, Any]]]


def report(cfg: AblateConfig) -> dict[str, Any]:
    """Effects, per-domain effects, interactions and the cell table from the finished cells; writes the files.

    Only seeds with a result in every cell a comparison uses are paired (see
    :func:`trainer.study.stats.factor_effects`); cells or seeds without a result are listed
    under ``missing`` with the reason (failed, with its error, or not run).
    """
    check_run_file(cfg)
    cells = plan(cfg)
    found = read_results(cfg, cells)
    if not found:
        raise AblationError(f"{cfg.out}: no finished cell to report on")
    values, per_domain = _values(cells, found)
    missing = _missing(cfg, cells, values)
    # a cell with no result at all cannot enter a paired comparison
    present = {k: v for k, v in values.items() if v}
    summary = {
        "config_hash": config_hash(cfg),
        "factors": {f: list(ABLATION_FACTORS[f]) for f in cfg.factors},
        "fixed": {
            f: lv
            for f, lv in levels_of(cfg, {}).items()
            if f not in cfg.factors and (f not in PROBE_FACTORS or lv != DEFAULT_LEVELS[f])
        },
        "design": cfg.design,
        "seeds": list(cfg.seeds),
        "metric": "balanced log-PPL of held-out reference chains under the routed mixture; "
        "effect = log PPL(reference level) - log PPL(test level), positive = the test level improves",
        "effects": {f: _effect_or_reason(present, f) for f in cfg.factors},
        "domain_effects": {
            f: {d: _effect_or_reason({k: v for k, v in vals.items() if v}, f) for d, vals in per_domain.items()}
            for f in cfg.factors
        },
        "interactions": [_interaction(present, a, b) for a, b in cfg.interactions],
        "cells": [_cell_row(cfg, cell, found) for cell in cells],
        "missing": missing,
        "complete": not missing,
    }
    if cfg.base_perturbation is not None:
        summary["perturbed"] = _perturbed(cfg, cells, found)
    atomic_write_text(cfg.out / REPORT_JSON, json.dumps(summary, indent=2))
    atomic_write_text(cfg.out / REPORT_MD, format_report(summary))
    for name, png in (("effects.png", plot_effects(summary)), ("domains.png", plot_domain_effects(summary))):
        if png is not None:
            atomic_write_bytes(cfg.out / name, png)
    return summary


def _perturbed(cfg: AblateConfig, cells: Sequence[Cell], found: Found) -> dict[str, Any]:
    """The base-perturbation probe: every effect and interaction again, on the perturbed base's figures."""
    values: Values = {c.coded: {} for c in cells}
    for cell, seed, r in found:
        if "perturbed" in r:
            values[cell.coded][seed] = r["perturbed"]["balanced_log_ppl"]
    present = {k: v for k, v in values.items() if v}
    return {
        "sigma": cfg.base_perturbation,
        "seed": cfg.eval_seed,
        "metric": "the same, with the base model's weight matrices perturbed (the same router and adapters)",
        "effects": {f: _effect_or_reason(present, f) for f in cfg.factors},
        "interactions": [_interaction(present, a, b) for a, b in cfg.interactions],
    }


def _values(cells: Sequence[Cell], found: Found) -> tuple[Values, dict[str, Values]]:
    """The balanced log-PPL of every finished (cell, seed), and the log-PPL per domain (domains sorted)."""
    values: Values = {c.coded: {} for c in cells}
    domains = sorted({d for _, _, r in found for d in r["per_domain"]})
    per_domain: dict[str, Values] = {d: {c.coded: {} for c in cells} for d in domains}
    for cell, seed, r in found:
        values[cell.coded][seed] = r["balanced_log_ppl"]
        for d, v in r["per_domain"].items():
            per_domain[d][cell.coded][seed] = v
    return values, per_domain


def _missing(cfg: AblateConfig, cells: Sequence[Cell], values: Values) -> list[dict[str, Any]]:
    """Every (cell, seed) without a result, with the reason: the failed run's error, or "not run"."""
    missing = []
    for cell in cells:
        for seed in cfg.seeds:
            if seed in values[cell.coded]:
                continue
            failed = failed_path(cfg.out, cell, seed)
            reason = json.loads(failed.read_text())["error"] if failed.exists() else "not run"
            missing.append({"cell": cell.id, "seed": seed, "reason": reason})
    return missing


def _effect_or_reason(cells: Values, factor: str) -> dict[str, Any]:
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


def _sub(cells: Values, factor: str, on: bool) -> Values:
    return {k: v for k, v in cells.items() if dict(k)[factor] == on}


def _interaction(present: Values, a: str, b: str) -> dict[str, Any]:
    """A's effect at each level of B, and (where both have seeds) the difference, paired by seed."""
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
    return entry


def _cell_row(cfg: AblateConfig, cell: Cell, found: Found) -> dict[str, Any]:
    """One row of the cell table: mean and SE over seeds of the routed mixture and its references."""
    rows = [r for c, _, r in found if c.id == cell.id]
    return {
        "cell": cell.id,
        "levels": {f: cell.levels[f] for f in cfg.factors},
        "seeds": sorted(r["seed"] for r in rows),
        "balanced_log_ppl": _mean_se([r["balanced_log_ppl"] for r in rows]),
        "uniform_mixture": _mean_se([r["reference"]["uniform"]["balanced_log_ppl"] for r in rows]),
        "best_member": _mean_se([r["reference"]["best_member"]["balanced_log_ppl"] for r in rows]),
        "base": _mean_se([r["reference"]["base"]["balanced_log_ppl"] for r in rows]),
        "specialisation": _mean_se([r["router"].get("specialisation_score", 0.0) for r in rows]),
        **(
            {
                "perturbed": _mean_se([r["perturbed"]["balanced_log_ppl"] for r in rows if "perturbed" in r]),
                "perturbed_base": _mean_se(
                    [r["perturbed"]["reference"]["base"]["balanced_log_ppl"] for r in rows if "perturbed" in r]
                ),
            }
            if cfg.base_perturbation is not None
            else {}
        ),
        "seconds": _mean_se([r["seconds"]["total"] for r in rows]),
    }


def _mean_se(xs: Sequence[float]) -> dict[str, float | int | None]:
    n = len(xs)
    if not n:
        return {"n": 0, "mean": None, "se": None}
    mean = sum(xs) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None
    return {"n": n, "mean": mean, "se": se}
