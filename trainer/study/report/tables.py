"""Tables of the report: the plain-text summary (one row per generation) and the per-domain table.

Missing values show as :data:`MISSING`; numbers have a fixed number of digits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from ensemble_serve.shared.population import MANIFEST_FILE, Manifest
from trainer.study.report.records import GenerationRecord, parse_records

__all__ = ["MISSING", "DomainTable", "diversity_keys", "domain_table", "fmt", "summary_table"]

MISSING = "-"


def fmt(x: float | None, digits: int = 3) -> str:
    return MISSING if x is None else f"{x:.{digits}f}"


def diversity_keys(records: Sequence[GenerationRecord]) -> list[str]:
    keys: list[str] = []
    for r in records:
        keys += [k for k in r.diversity if k not in keys]
    return keys


def summary_table(records: Sequence[Mapping[str, Any]] | Sequence[GenerationRecord]) -> str:
    """Plain-text table, one row per generation: fitness, held-out accuracy and diversity.

    Accepts raw history records (as from :func:`ensemble_serve.shared.population.read_history`)
    or already parsed :class:`GenerationRecord` objects. Missing values show as ``-``.
    """
    if all(isinstance(r, GenerationRecord) for r in records):
        recs = sorted((r for r in records if isinstance(r, GenerationRecord)), key=lambda r: r.generation)
    else:
        recs = parse_records(cast(Sequence[Mapping[str, Any]], records))
    div = diversity_keys(recs)
    header = ["gen", "fit best", "fit mean", "acc best", "acc mean", "acc vote", *(f"div {k}" for k in div)]
    rows = [
        [
            str(r.generation),
            fmt(r.fitness.get("best")),
            fmt(r.fitness.get("mean")),
            fmt(r.heldout.get("best_member")),
            fmt(r.heldout.get("mean_member")),
            fmt(r.heldout.get("ensemble_vote")),
            *(fmt(r.diversity.get(k), 4) for k in div),
        ]
        for r in recs
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass(frozen=True)
class DomainTable:
    """Per-member per-domain accuracy of one generation (rows may contain None)."""

    title: str
    domains: list[str]
    rows: list[tuple[str, list[float | None]]]


def _domain_columns(score_maps: Sequence[Mapping[str, float]]) -> list[str]:
    keys = sorted({k for m in score_maps for k in m})
    return (["all"] if "all" in keys else []) + [k for k in keys if k != "all"]


def domain_table(records: Sequence[GenerationRecord], manifest: Manifest | None) -> DomainTable | None:
    """The last generation whose members have held-out results (else the manifest's domain_scores)."""
    for r in reversed(records):
        scored = [m for m in r.members if m.heldout]
        if not scored:
            continue
        domains = _domain_columns([m.heldout for m in scored] + [r.ensemble_domains])
        rows = [(m.name, [m.heldout.get(d) for d in domains]) for m in scored]
        if r.ensemble_domains:
            ens = dict(r.ensemble_domains)
            if "all" in domains and "all" not in ens and "ensemble_vote" in r.heldout:
                ens["all"] = r.heldout["ensemble_vote"]
            rows.append(("(ensemble vote)", [ens.get(d) for d in domains]))
        return DomainTable(f"held-out accuracy by domain, generation {r.generation}", domains, rows)
    if manifest is not None and any(m.domain_scores for m in manifest.members):
        scored_m = [m for m in manifest.members if m.domain_scores]
        domains = _domain_columns([m.domain_scores for m in scored_m])
        rows = [(m.name, [m.domain_scores.get(d) for d in domains]) for m in scored_m]
        return DomainTable(f"domain scores in {MANIFEST_FILE}, generation {manifest.generation}", domains, rows)
    return None
