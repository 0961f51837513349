"""The family tree of a population: nodes (one per member per generation), edges, and its plot.

A member present in consecutive records keeps one lane (row); a new or re-born member gets
edges from its parents and the free lane nearest to theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ensemble_serve.shared.population import Manifest
from trainer.plotting import new_figure, to_png
from trainer.study.report.figures import generation_ticks
from trainer.study.report.records import GenerationRecord, MemberRecord

__all__ = ["Lineage", "build_lineage", "plot_lineage"]

#: Node labels are drawn on the lineage plot up to this many nodes.
MAX_LABELLED_NODES = 40


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
    fig = new_figure(min(3.5 + 1.1 * len(gens), 30), min(2.0 + 0.42 * n_lanes, 30))
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
    generation_ticks(ax, gens, margin=0.6)
    ax.set_ylim(n_lanes - 0.4, -0.6)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    n_names = len({n.name for n in nodes})
    ax.set_title(f"lineage ({_plural(n_names, 'member')}, {_plural(len(gens), 'generation')})")
    return to_png(fig)
