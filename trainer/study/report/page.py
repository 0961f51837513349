"""The report's files: the PNG plots and one self-contained HTML page (plots as data URIs, plus tables).

:func:`write_report` is the entry point of ``ensemble-train report``. A plot without data is not
written, and a stale PNG of that name from an earlier report is removed.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from ensemble_serve.shared.fsutil import atomic_write_bytes, atomic_write_text
from ensemble_serve.shared.population import Manifest
from trainer.study.report.figures import (
    plot_accuracy,
    plot_diversity,
    plot_domains,
    plot_fitness,
    plot_labels,
    plot_levels,
    plot_phases,
    plot_retention,
    plot_votes,
)
from trainer.study.report.lineage import build_lineage, plot_lineage
from trainer.study.report.records import HELDOUT_KEYS, GenerationRecord, load_records, read_manifest_or_none
from trainer.study.report.tables import MISSING, DomainTable, diversity_keys, domain_table, fmt

__all__ = ["HTML_FILE", "PLOT_NAMES", "REPORT_DIR", "write_report"]

REPORT_DIR = "report"
HTML_FILE = "report.html"
#: Plot names in page order; each is written as ``<name>.png`` when it has data.
PLOT_NAMES = (
    "fitness",
    "accuracy",
    "levels",
    "labels",
    "diversity",
    "domains",
    "lineage",
    "votes",
    "phases",
    "retention",
)
#: Fitness statistics, in column order.
FITNESS_KEYS = ("best", "mean", "min")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #666; font-size: 0.9em; }
"""

_PLOT_TITLES = {
    "fitness": "Fitness",
    "accuracy": "Held-out accuracy",
    "levels": "Held-out accuracy per level",
    "labels": "Label precision (against answers the run never read)",
    "diversity": "Diversity",
    "domains": "Accuracy by domain",
    "lineage": "Lineage",
    "votes": "Vote agreement",
    "phases": "Time per phase",
    "retention": "Forgetting guard (own-family validation before and after training)",
}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], name_cols: int = 1) -> str:
    """An HTML table; the first ``name_cols`` columns are left-aligned, all text is escaped."""

    def cells(tag: str, values: Sequence[str]) -> str:
        out = []
        for i, v in enumerate(values):
            attr = ' class="name"' if i < name_cols else ""
            out.append(f"<{tag}{attr}>{html.escape(v)}</{tag}>")
        return "".join(out)

    body = "\n".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table>\n<thead><tr>{cells('th', header)}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _generation_table(records: Sequence[GenerationRecord]) -> str:
    div = diversity_keys(records)
    header = [
        "generation",
        *(f"fitness {k}" for k in FITNESS_KEYS),
        *(f"acc. {label}" for _, label in HELDOUT_KEYS),
        *(f"diversity {k}" for k in div),
    ]
    rows = [
        [
            str(r.generation),
            *(fmt(r.fitness.get(k)) for k in FITNESS_KEYS),
            *(fmt(r.heldout.get(k)) for k, _ in HELDOUT_KEYS),
            *(fmt(r.diversity.get(k), 4) for k in div),
        ]
        for r in records
    ]
    return _table(header, rows)


def _domain_html(table: DomainTable | None) -> str:
    if table is None:
        return '<p class="note">No per-member held-out results recorded.</p>'
    rows = [[name, *(fmt(v) for v in vals)] for name, vals in table.rows]
    return f"<p>{html.escape(table.title)}</p>\n" + _table(["member", *table.domains], rows)


def _members_html(manifest: Manifest | None, note: str | None) -> str:
    if manifest is None:
        return f'<p class="note">{html.escape(note or "no manifest")}</p>'
    rows = [
        [m.name, str(m.rank), fmt(m.fitness), str(m.born_generation), ", ".join(m.parents) or MISSING]
        for m in manifest.members
    ]
    return f"<p>generation {manifest.generation}, base model {html.escape(manifest.base_model.name)}</p>\n" + _table(
        ["member", "rank", "fitness", "born", "parents"], rows
    )


def _html_page(
    title: str,
    records: Sequence[GenerationRecord],
    images: Mapping[str, bytes],
    domains: DomainTable | None,
    manifest: Manifest | None,
    manifest_note: str | None,
) -> str:
    runs = sorted({r.run_id for r in records if r.run_id})
    labels = sorted({r.labels for r in records if r.labels})
    facts = [
        f"{len(records)} generation record(s), generations {records[0].generation}-{records[-1].generation}",
        f"run(s): {', '.join(runs)}" if runs else "",
        f"labels: {', '.join(labels)}" if labels else "",
        f"written {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape("; ".join(f for f in facts if f))}</p>',
        "<h2>Per generation</h2>",
        _generation_table(records),
    ]
    for name in PLOT_NAMES:
        if name in images:
            data = base64.b64encode(images[name]).decode("ascii")
            parts += [
                f"<h2>{_PLOT_TITLES[name]}</h2>",
                f'<img src="data:image/png;base64,{data}" alt="{name}">',
            ]
            if name == "domains":
                parts.append(_domain_html(domains))
    if "domains" not in images:
        parts += ["<h2>Accuracy by domain</h2>", _domain_html(domains)]
    skipped = [n for n in PLOT_NAMES if n not in images]
    parts += ["<h2>Current members</h2>", _members_html(manifest, manifest_note)]
    if skipped:
        parts.append(f'<p class="note">No data for: {html.escape(", ".join(skipped))}.</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    population_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> dict[str, Path]:
    """Write the PNG plots and ``report.html`` for a population; return ``{"html": path, "<plot>": path, ...}``.

    ``out_dir`` defaults to ``<population_dir>/report``. Plots without data are
    not written (and a stale PNG of that name from an earlier report is
    removed). Raises :class:`ReportError` when there is no history yet or a
    history field has the wrong type.
    """
    root = Path(population_dir)
    records = load_records(root)
    manifest, manifest_note = read_manifest_or_none(root)
    out = Path(out_dir) if out_dir is not None else root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)

    domains = domain_table(records, manifest)
    drawers: dict[str, Callable[[], bytes | None]] = {
        "fitness": lambda: plot_fitness(records),
        "accuracy": lambda: plot_accuracy(records),
        "levels": lambda: plot_levels(records),
        "labels": lambda: plot_labels(records),
        "diversity": lambda: plot_diversity(records),
        "domains": lambda: plot_domains(domains),
        "lineage": lambda: plot_lineage(build_lineage(records, manifest)),
        "votes": lambda: plot_votes(records),
        "phases": lambda: plot_phases(records),
        "retention": lambda: plot_retention(records),
    }
    images: dict[str, bytes] = {}
    paths: dict[str, Path] = {}
    for name in PLOT_NAMES:
        target = out / f"{name}.png"
        png = drawers[name]()
        if png is None:
            target.unlink(missing_ok=True)
            continue
        atomic_write_bytes(target, png)
        images[name] = png
        paths[name] = target
    title = f"Population report: {root.resolve().name}"
    html_path = out / HTML_FILE
    atomic_write_text(html_path, _html_page(title, records, images, domains, manifest, manifest_note))
    return {"html": html_path, **paths}
