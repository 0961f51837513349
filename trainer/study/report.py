"""`ensemble-train report`: plots and one self-contained HTML page from a population's history.

Reads ``<population>/history.jsonl`` (one record per generation, see
:func:`ensemble_serve.shared.population.append_history`) and ``population.json`` and
writes, into ``<population>/report`` by default:

* ``fitness.png``    best / mean / min fitness per generation;
* ``accuracy.png``   held-out accuracy per generation (best member, mean member, ensemble vote, oracle);
* ``diversity.png``  each diversity measure per generation;
* ``domains.png``    per-member per-domain held-out accuracy of the last evaluated generation;
* ``lineage.png``    the family tree (x = generation, one node per member per generation);
* ``votes.png``      histogram of the ensemble vote agreement (only when recorded);
* ``report.html``    all of the above embedded as data URIs, plus the tables.

Every history key except ``generation`` is optional: a plot without data is
skipped. A field of the wrong type raises :class:`ReportError` naming the
generation. matplotlib is imported only when plots are drawn, and only its
object-oriented API with the Agg canvas is used (no pyplot, no global backend
state), so importing this module stays cheap and it works without a display.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ensemble_serve.shared.fsutil import atomic_write_bytes, atomic_write_text
from ensemble_serve.shared.population import (
    HISTORY_FILE,
    MANIFEST_FILE,
    Manifest,
    PopulationError,
    read_history,
    read_manifest,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.figure import Figure

__all__ = [
    "PLOT_NAMES",
    "GenerationRecord",
    "Lineage",
    "MemberRecord",
    "ReportError",
    "build_lineage",
    "load_records",
    "parse_records",
    "summary_table",
    "write_report",
]

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
HTML_FILE = "report.html"
#: Plot names in page order; each is written as ``<name>.png`` when it has data.
PLOT_NAMES = ("fitness", "accuracy", "diversity", "domains", "lineage", "votes")
#: Node labels are drawn on the lineage plot up to this many nodes.
MAX_LABELLED_NODES = 40
_DPI = 100
_MISSING = "-"
#: Held-out scalar keys, in column order, with their display names.
_HELDOUT_KEYS = (
    ("best_member", "best member"),
    ("mean_member", "mean member"),
    ("ensemble_vote", "ensemble vote"),
    ("oracle", "oracle"),
)
_FITNESS_KEYS = ("best", "mean", "min")


class ReportError(ValueError):
    """The history cannot be reported on (missing, empty, or a field of the wrong type)."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class MemberRecord:
    """One member as recorded in one generation's history line (or in population.json)."""

    name: str
    parents: tuple[str, ...] = ()
    born_generation: int | None = None
    rank: int | None = None
    fitness: float | None = None
    status: str | None = None
    heldout: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationRecord:
    """The fields of one history line the report uses, type-checked; missing ones are empty."""

    generation: int
    run_id: str | None = None
    labels: str | None = None
    fitness: dict[str, float] = field(default_factory=dict)
    diversity: dict[str, float] = field(default_factory=dict)
    members: tuple[MemberRecord, ...] = ()
    heldout: dict[str, float] = field(default_factory=dict)
    vote_agreement: tuple[float, ...] = ()
    ensemble_domains: dict[str, float] = field(default_factory=dict)


class _Checker:
    """Type checks for one history record; every error names the generation."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, expected: str, value: Any) -> ReportError:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return ReportError(
            f"{HISTORY_FILE}, {self.where}: `{key}` must be {expected}, got {type(value).__name__} {shown}"
        )

    def number(self, value: Any, key: str) -> float | None:
        """A finite float, or None for a missing/null/non-finite value."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, "a number", value)
        x = float(value)
        return x if math.isfinite(x) else None

    def integer(self, value: Any, key: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "an integer", value)
        return value

    def string(self, value: Any, key: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(key, "a string", value)
        return value

    def mapping(self, value: Any, key: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, "an object", value)
        return value

    def sequence(self, value: Any, key: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            raise self.fail(key, "a list", value)
        return list(value)

    def number_map(self, value: Any, key: str) -> dict[str, float]:
        """An object of numbers; null and non-finite values are dropped."""
        out: dict[str, float] = {}
        for k, v in self.mapping(value, key).items():
            x = self.number(v, f"{key}.{k}")
            if x is not None:
                out[str(k)] = x
        return out


def _parse_member(c: _Checker, raw: Any, key: str) -> MemberRecord:
    if not isinstance(raw, Mapping):
        raise c.fail(key, "an object", raw)
    name = c.string(raw.get("name"), f"{key}.name")
    if not name:
        raise c.fail(f"{key}.name", "a non-empty string", raw.get("name"))
    key = f"members[{name}]"
    parents = tuple(
        p
        for i, x in enumerate(c.sequence(raw.get("parents"), f"{key}.parents"))
        if (p := c.string(x, f"{key}.parents[{i}]"))
    )
    return MemberRecord(
        name=name,
        parents=parents,
        born_generation=c.integer(raw.get("born_generation"), f"{key}.born_generation"),
        rank=c.integer(raw.get("rank"), f"{key}.rank"),
        fitness=c.number(raw.get("fitness"), f"{key}.fitness"),
        status=c.string(raw.get("status"), f"{key}.status"),
        heldout=c.number_map(raw.get("heldout"), f"{key}.heldout"),
    )


def _parse_record(raw: Mapping[str, Any], index: int, previous: int | None) -> GenerationRecord:
    """Check and convert one history line (``index`` is 1-based, for messages)."""
    gen_raw = raw.get("generation")
    if gen_raw is None:
        generation = 0 if previous is None else previous + 1
        logger.warning("%s: record %d has no `generation`; taking it as generation %d", HISTORY_FILE, index, generation)
    elif isinstance(gen_raw, bool) or not isinstance(gen_raw, int):
        raise ReportError(
            f"{HISTORY_FILE}, record {index}: `generation` must be an integer, got {type(gen_raw).__name__} {gen_raw!r}"
        )
    else:
        generation = gen_raw
    c = _Checker(f"generation {generation}")
    members = [_parse_member(c, m, f"members[{i}]") for i, m in enumerate(c.sequence(raw.get("members"), "members"))]
    heldout_raw = c.mapping(raw.get("heldout"), "heldout")
    heldout: dict[str, float] = {}
    for k in ("problems", *(k for k, _ in _HELDOUT_KEYS)):
        x = c.number(heldout_raw.get(k), f"heldout.{k}")
        if x is not None:
            heldout[k] = x
    votes = (
        c.number(v, f"heldout.vote_agreement[{i}]")
        for i, v in enumerate(c.sequence(heldout_raw.get("vote_agreement"), "heldout.vote_agreement"))
    )
    return GenerationRecord(
        generation=generation,
        run_id=None if raw.get("run_id") is None else str(raw.get("run_id")),
        labels=None if raw.get("labels") is None else str(raw.get("labels")),
        fitness=c.number_map(raw.get("fitness"), "fitness"),
        diversity=c.number_map(raw.get("diversity"), "diversity"),
        members=tuple(members),
        heldout=heldout,
        vote_agreement=tuple(v for v in votes if v is not None),
        ensemble_domains=c.number_map(heldout_raw.get("ensemble_domains"), "heldout.ensemble_domains"),
    )


def parse_records(records: Sequence[Mapping[str, Any]]) -> list[GenerationRecord]:
    """Type-check raw history records and return them sorted by generation.

    When a generation appears more than once (a resumed run re-recorded it),
    the last record wins. Raises :class:`ReportError` for a field of the
    wrong type, naming the generation.
    """
    by_gen: dict[int, GenerationRecord] = {}
    previous: int | None = None
    for i, raw in enumerate(records, start=1):
        if not isinstance(raw, Mapping):
            raise ReportError(f"{HISTORY_FILE}, record {i}: expected a JSON object, got {type(raw).__name__}")
        rec = _parse_record(raw, i, previous)
        if rec.generation in by_gen:
            logger.warning(
                "%s: generation %d recorded more than once; using the last record", HISTORY_FILE, rec.generation
            )
        by_gen[rec.generation] = rec
        previous = rec.generation
    return [by_gen[g] for g in sorted(by_gen)]


def load_records(population_dir: str | os.PathLike[str]) -> list[GenerationRecord]:
    """Read and check ``<population_dir>/history.jsonl``; :class:`ReportError` if it is missing or empty."""
    root = Path(population_dir)
    if not root.is_dir():
        raise ReportError(f"{root}: population directory not found")
    try:
        raw = read_history(root)
    except PopulationError as e:
        raise ReportError(str(e)) from e
    if not raw:
        raise ReportError(f"{root / HISTORY_FILE}: no history yet: run `ensemble-train evolve` first")
    return parse_records(raw)


def _read_manifest_or_none(root: Path) -> tuple[Manifest | None, str | None]:
    """The manifest, or None and a note when it is missing or invalid (the report still uses the history)."""
    if not (root / MANIFEST_FILE).is_file():
        return None, f"{MANIFEST_FILE} not found"
    try:
        return read_manifest(root), None
    except PopulationError as e:
        logger.warning("report without the manifest: %s", e)
        return None, f"{MANIFEST_FILE} could not be read: {e}"


# --------------------------------------------------------------------------- text table


def _fmt(x: float | None, digits: int = 3) -> str:
    return _MISSING if x is None else f"{x:.{digits}f}"


def _diversity_keys(records: Sequence[GenerationRecord]) -> list[str]:
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
    div = _diversity_keys(recs)
    header = ["gen", "fit best", "fit mean", "acc best", "acc mean", "acc vote", *(f"div {k}" for k in div)]
    rows = [
        [
            str(r.generation),
            _fmt(r.fitness.get("best")),
            _fmt(r.fitness.get("mean")),
            _fmt(r.heldout.get("best_member")),
            _fmt(r.heldout.get("mean_member")),
            _fmt(r.heldout.get("ensemble_vote")),
            *(_fmt(r.diversity.get(k), 4) for k in div),
        ]
        for r in recs
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_specialisation(
    table: Mapping[str, Mapping[str, float]], title: str = "Mean router gate per domain"
) -> bytes | None:
    """Heat map of a router's mean gate per domain (rows) and member (columns): who the router sends what."""
    domains = list(table)
    members = list(next(iter(table.values()), {}))
    if not domains or not members:
        return None
    grid = [[float(table[d].get(m, 0.0)) for m in members] for d in domains]
    fig = _new_figure(1.6 + 0.75 * len(members), 1.2 + 0.45 * len(domains))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=max(1e-9, max(max(r) for r in grid)), aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v < 0.6 * max(map(max, grid)) else "black",
            )
    ax.set_xticks(range(len(members)), members, fontsize=8)
    ax.set_yticks(range(len(domains)), domains, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _generation_ticks(ax: Any, generations: Sequence[int], margin: float) -> None:
    """Integer generation ticks on the x axis, with ``margin`` around the first and last."""
    from matplotlib.ticker import MaxNLocator

    lo, hi = min(generations), max(generations)
    if hi - lo <= 12:
        ax.set_xticks(range(lo, hi + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(lo - margin, hi + margin)
    ax.set_xlabel("generation")


def _series(
    records: Sequence[GenerationRecord], get: Callable[[GenerationRecord], float | None]
) -> tuple[list[int], list[float]]:
    xs: list[int] = []
    ys: list[float] = []
    for r in records:
        y = get(r)
        if y is not None:
            xs.append(r.generation)
            ys.append(y)
    return xs, ys


def _line_plot(
    records: Sequence[GenerationRecord],
    lines: Sequence[tuple[str, Callable[[GenerationRecord], float | None], dict[str, Any]]],
    title: str,
    ylabel: str,
) -> bytes | None:
    """One line per (label, getter, style); None when no line has a point."""
    series = [(label, *_series(records, get), style) for label, get, style in lines]
    series = [s for s in series if s[1]]
    if not series:
        return None
    fig = _new_figure(7, 4)
    ax = fig.add_subplot()
    for label, xs, ys, style in series:
        ax.plot(xs, ys, marker="o", markersize=4, label=label, **style)
    _generation_ticks(ax, [x for s in series for x in s[1]], margin=0.3)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def plot_fitness(records: Sequence[GenerationRecord]) -> bytes | None:
    """Best and mean fitness per generation, min as a faint line."""
    return _line_plot(
        records,
        [
            ("best", lambda r: r.fitness.get("best"), {"color": "tab:green", "linewidth": 2}),
            ("mean", lambda r: r.fitness.get("mean"), {"color": "tab:blue"}),
            ("min", lambda r: r.fitness.get("min"), {"color": "tab:gray", "alpha": 0.4, "linestyle": "--"}),
        ],
        "fitness per generation",
        "fitness",
    )


def plot_accuracy(records: Sequence[GenerationRecord]) -> bytes | None:
    """Held-out accuracy per generation: best member, mean member, ensemble vote, oracle."""
    styles = {
        "best_member": {"color": "tab:green"},
        "mean_member": {"color": "tab:blue"},
        "ensemble_vote": {"color": "tab:red", "linewidth": 2},
        "oracle": {"color": "tab:gray", "alpha": 0.6, "linestyle": ":"},
    }
    lines = [(label, (lambda r, k=key: r.heldout.get(k)), styles[key]) for key, label in _HELDOUT_KEYS]
    return _line_plot(records, lines, "held-out accuracy per generation", "accuracy")


def plot_diversity(records: Sequence[GenerationRecord]) -> bytes | None:
    """One line per diversity measure."""
    lines = [(key, (lambda r, k=key: r.diversity.get(k)), {}) for key in _diversity_keys(records)]
    return _line_plot(records, lines, "population diversity per generation", "diversity")


@dataclass(frozen=True)
class _DomainTable:
    """Per-member per-domain accuracy of one generation (rows may contain None)."""

    title: str
    domains: list[str]
    rows: list[tuple[str, list[float | None]]]


def _domain_columns(score_maps: Sequence[Mapping[str, float]]) -> list[str]:
    keys = sorted({k for m in score_maps for k in m})
    return (["all"] if "all" in keys else []) + [k for k in keys if k != "all"]


def domain_table(records: Sequence[GenerationRecord], manifest: Manifest | None) -> _DomainTable | None:
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
        return _DomainTable(f"held-out accuracy by domain, generation {r.generation}", domains, rows)
    if manifest is not None and any(m.domain_scores for m in manifest.members):
        scored_m = [m for m in manifest.members if m.domain_scores]
        domains = _domain_columns([m.domain_scores for m in scored_m])
        rows = [(m.name, [m.domain_scores.get(d) for d in domains]) for m in scored_m]
        return _DomainTable(f"domain scores in {MANIFEST_FILE}, generation {manifest.generation}", domains, rows)
    return None


def plot_domains(table: _DomainTable | None) -> bytes | None:
    """Heatmap members x domains with the values written in the cells."""
    if table is None or not table.rows or not table.domains:
        return None
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in vals] for _, vals in table.rows], dtype=float)
    n_rows, n_cols = values.shape
    fig = _new_figure(min(3 + 0.8 * n_cols, 24), min(1.8 + 0.4 * n_rows, 24))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(
        range(n_cols), table.domains, rotation=30 if n_cols > 6 else 0, ha="right" if n_cols > 6 else "center"
    )
    ax.set_yticks(range(n_rows), [name for name, _ in table.rows])
    ax.tick_params(labelsize=8)
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            text = _MISSING if math.isnan(v) else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(table.title)
    return _png(fig)


@dataclass
class _Node:
    name: str
    generation: int
    fitness: float | None
    lane: int = 0


@dataclass
class Lineage:
    """The lineage graph: nodes (one per member per generation) and edges between node indices."""

    nodes: list[_Node] = field(default_factory=list)
    carried: list[tuple[int, int]] = field(default_factory=list)
    """Edges from a member's previous node to its node in a later generation."""
    born: list[tuple[int, int]] = field(default_factory=list)
    """Edges from a parent's node to a child's first node."""


def _lineage_generations(
    records: Sequence[GenerationRecord], manifest: Manifest | None
) -> list[tuple[int, tuple[MemberRecord, ...]]]:
    gens = [(r.generation, r.members) for r in records if r.members]
    if manifest is not None and (not gens or manifest.generation > gens[-1][0]):
        gens.append(
            (
                manifest.generation,
                tuple(
                    MemberRecord(
                        name=m.name,
                        parents=tuple(m.parents),
                        born_generation=m.born_generation,
                        rank=m.rank,
                        fitness=m.fitness,
                    )
                    for m in manifest.members
                ),
            )
        )
    return gens


def build_lineage(records: Sequence[GenerationRecord], manifest: Manifest | None = None) -> Lineage:
    """Nodes and edges of the family tree, with a lane (row) per node that keeps survivors on one line.

    A member present in consecutive records is one lane with horizontal edges. A
    member seen for the first time (or re-born: ``born_generation`` after its last
    appearance) gets edges from its parents' latest earlier nodes and the free
    lane nearest to theirs; parents found in no earlier record make it a root.
    """
    lineage = Lineage()
    last_node: dict[str, int] = {}  # member name -> index of its latest node (earlier generations only)
    active: dict[str, int] = {}  # member name -> lane, in the previous generation
    n_lanes = 0
    for generation, members in _lineage_generations(records, manifest):
        unique: list[MemberRecord] = []
        for m in members:  # a name twice in one record: keep the first
            if all(u.name != m.name for u in unique):
                unique.append(m)
        lanes: dict[str, int] = {}
        edges: dict[str, tuple[list[tuple[int, int]], list[int]]] = {}  # name -> (edge list, source nodes)
        pending: list[tuple[float, str]] = []
        for m in unique:
            prev = last_node.get(m.name)
            if prev is not None and not _reborn(m, lineage.nodes[prev]):
                edges[m.name] = (lineage.carried, [prev])
                if m.name in active:
                    lanes[m.name] = active[m.name]
                else:  # back after a gap: the free lane nearest to its old one
                    pending.append((float(lineage.nodes[prev].lane), m.name))
                continue
            sources = [last_node[p] for p in dict.fromkeys(m.parents) if p in last_node and p != m.name]
            edges[m.name] = (lineage.born, sources)
            target = sum(lineage.nodes[i].lane for i in sources) / len(sources) if sources else float(n_lanes)
            pending.append((target, m.name))
        used = set(lanes.values())
        for target, name in sorted(pending, key=lambda t: t[0]):
            free = [lane for lane in range(n_lanes) if lane not in used] + [n_lanes]
            lane = min(free, key=lambda x: (abs(x - target), x))
            n_lanes = max(n_lanes, lane + 1)
            used.add(lane)
            lanes[name] = lane
        for m in unique:
            idx = len(lineage.nodes)
            lineage.nodes.append(_Node(m.name, generation, m.fitness, lanes[m.name]))
            edge_list, sources = edges[m.name]
            edge_list.extend((s, idx) for s in sources)
            last_node[m.name] = idx
        active = lanes
    return lineage


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _reborn(m: MemberRecord, prev: _Node) -> bool:
    """A name seen before that was born again later (names reused for a new member)."""
    return m.born_generation is not None and m.born_generation > prev.generation


def plot_lineage(lineage: Lineage) -> bytes | None:
    """The family tree: x = generation, nodes coloured by fitness, crossover edges from parents."""
    if not lineage.nodes:
        return None
    import matplotlib
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize

    nodes = lineage.nodes
    gens = sorted({n.generation for n in nodes})
    n_lanes = max(n.lane for n in nodes) + 1
    fig = _new_figure(min(3.5 + 1.1 * len(gens), 30), min(2.0 + 0.42 * n_lanes, 30))
    ax = fig.add_subplot()

    def xy(i: int) -> tuple[float, float]:
        return (float(nodes[i].generation), float(nodes[i].lane))

    if lineage.carried:
        ax.add_collection(
            LineCollection([[xy(a), xy(b)] for a, b in lineage.carried], colors="0.6", linewidths=1.2, zorder=1)
        )
    if lineage.born:
        ax.add_collection(
            LineCollection(
                [[xy(a), xy(b)] for a, b in lineage.born], colors="tab:purple", linewidths=1.0, alpha=0.6, zorder=1
            )
        )
    scored = [n for n in nodes if n.fitness is not None]
    unscored = [n for n in nodes if n.fitness is None]
    if scored:
        values = [n.fitness for n in scored if n.fitness is not None]
        lo, hi = min(values), max(values)
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        cmap = matplotlib.colormaps["viridis"]
        points = ax.scatter(
            [n.generation for n in scored],
            [n.lane for n in scored],
            c=values,
            cmap=cmap,
            norm=Normalize(lo, hi),
            s=70,
            edgecolors="black",
            linewidths=0.6,
            zorder=2,
        )
        fig.colorbar(points, ax=ax, label="fitness")
    if unscored:
        ax.scatter(
            [n.generation for n in unscored],
            [n.lane for n in unscored],
            c="white",
            s=70,
            edgecolors="0.4",
            linewidths=0.8,
            zorder=2,
            label="no fitness",
        )
        fig.legend(loc="outside lower left", fontsize=7, frameon=False)
    if len(nodes) <= MAX_LABELLED_NODES:
        for n in nodes:
            ax.annotate(
                n.name, (n.generation, n.lane), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=7
            )
    _generation_ticks(ax, gens, margin=0.6)
    ax.set_ylim(n_lanes - 0.4, -0.6)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    n_names = len({n.name for n in nodes})
    ax.set_title(f"lineage ({_plural(n_names, 'member')}, {_plural(len(gens), 'generation')})")
    return _png(fig)


def plot_votes(records: Sequence[GenerationRecord]) -> bytes | None:
    """Histogram of the last recorded per-problem agreement of the ensemble vote."""
    last = next((r for r in reversed(records) if r.vote_agreement), None)
    if last is None:
        return None
    fig = _new_figure(6, 3.5)
    ax = fig.add_subplot()
    ax.hist([min(max(v, 0.0), 1.0) for v in last.vote_agreement], bins=20, range=(0.0, 1.0), color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of members agreeing with the ensemble vote")
    ax.set_ylabel("problems")
    ax.set_title(f"vote agreement, generation {last.generation} ({len(last.vote_agreement)} problems)")
    ax.grid(True, alpha=0.3)
    return _png(fig)


# --------------------------------------------------------------------------- HTML

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
    "diversity": "Diversity",
    "domains": "Accuracy by domain",
    "lineage": "Lineage",
    "votes": "Vote agreement",
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
    div = _diversity_keys(records)
    header = [
        "generation",
        *(f"fitness {k}" for k in _FITNESS_KEYS),
        *(f"acc. {label}" for _, label in _HELDOUT_KEYS),
        *(f"diversity {k}" for k in div),
    ]
    rows = [
        [
            str(r.generation),
            *(_fmt(r.fitness.get(k)) for k in _FITNESS_KEYS),
            *(_fmt(r.heldout.get(k)) for k, _ in _HELDOUT_KEYS),
            *(_fmt(r.diversity.get(k), 4) for k in div),
        ]
        for r in records
    ]
    return _table(header, rows)


def _domain_html(table: _DomainTable | None) -> str:
    if table is None:
        return '<p class="note">No per-member held-out results recorded.</p>'
    rows = [[name, *(_fmt(v) for v in vals)] for name, vals in table.rows]
    return f"<p>{html.escape(table.title)}</p>\n" + _table(["member", *table.domains], rows)


def _members_html(manifest: Manifest | None, note: str | None) -> str:
    if manifest is None:
        return f'<p class="note">{html.escape(note or "no manifest")}</p>'
    rows = [
        [m.name, str(m.rank), _fmt(m.fitness), str(m.born_generation), ", ".join(m.parents) or _MISSING]
        for m in manifest.members
    ]
    return f"<p>generation {manifest.generation}, base model {html.escape(manifest.base_model.name)}</p>\n" + _table(
        ["member", "rank", "fitness", "born", "parents"], rows
    )


def _html_page(
    title: str,
    records: Sequence[GenerationRecord],
    images: Mapping[str, bytes],
    domains: _DomainTable | None,
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


# --------------------------------------------------------------------------- entry point


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
    manifest, manifest_note = _read_manifest_or_none(root)
    out = Path(out_dir) if out_dir is not None else root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)

    domains = domain_table(records, manifest)
    drawers: dict[str, Callable[[], bytes | None]] = {
        "fitness": lambda: plot_fitness(records),
        "accuracy": lambda: plot_accuracy(records),
        "diversity": lambda: plot_diversity(records),
        "domains": lambda: plot_domains(domains),
        "lineage": lambda: plot_lineage(build_lineage(records, manifest)),
        "votes": lambda: plot_votes(records),
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
