"""The report's plots over generations (fitness, accuracy, diversity, domains, votes).

matplotlib is imported only when a plot is drawn, and only its object-oriented API with the Agg
canvas is used (no pyplot, no global backend state), so importing this module stays cheap and it
works without a display. Every ``plot_*`` returns PNG bytes, or None when it has no data.
Figures come from :mod:`trainer.plotting`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer.plotting import new_figure, to_png
from trainer.study.report.records import HELDOUT_KEYS, GenerationRecord
from trainer.study.report.tables import MISSING, DomainTable, diversity_keys

if TYPE_CHECKING:  # pragma: no cover - typing only
    pass

__all__ = [
    "generation_ticks",
    "plot_accuracy",
    "plot_diversity",
    "plot_domains",
    "plot_fitness",
    "plot_labels",
    "plot_levels",
    "plot_votes",
]


def generation_ticks(ax: Any, generations: Sequence[int], margin: float) -> None:
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
    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    for label, xs, ys, style in series:
        ax.plot(xs, ys, marker="o", markersize=4, label=label, **style)
    generation_ticks(ax, [x for s in series for x in s[1]], margin=0.3)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(loc="best", fontsize=8)
    return to_png(fig)


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
    lines = [(label, (lambda r, k=key: r.heldout.get(k)), styles[key]) for key, label in HELDOUT_KEYS]
    return _line_plot(records, lines, "held-out accuracy per generation", "accuracy")


def plot_diversity(records: Sequence[GenerationRecord]) -> bytes | None:
    """One line per diversity measure."""
    lines = [(key, (lambda r, k=key: r.diversity.get(k)), {}) for key in diversity_keys(records)]
    return _line_plot(records, lines, "population diversity per generation", "diversity")


def plot_domains(table: DomainTable | None) -> bytes | None:
    """Heatmap members x domains with the values written in the cells."""
    if table is None or not table.rows or not table.domains:
        return None
    values = np.array([[np.nan if v is None else v for v in vals] for _, vals in table.rows], dtype=float)
    n_rows, n_cols = values.shape
    fig = new_figure(min(3 + 0.8 * n_cols, 24), min(1.8 + 0.4 * n_rows, 24))
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
            text = MISSING if math.isnan(v) else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(table.title)
    return to_png(fig)


def plot_votes(records: Sequence[GenerationRecord]) -> bytes | None:
    """Histogram of the last recorded per-problem agreement of the ensemble vote."""
    last = next((r for r in reversed(records) if r.vote_agreement), None)
    if last is None:
        return None
    fig = new_figure(6, 3.5)
    ax = fig.add_subplot()
    ax.hist([min(max(v, 0.0), 1.0) for v in last.vote_agreement], bins=20, range=(0.0, 1.0), color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of members agreeing with the ensemble vote")
    ax.set_ylabel("problems")
    ax.set_title(f"vote agreement, generation {last.generation} ({len(last.vote_agreement)} problems)")
    ax.grid(True, alpha=0.3)
    return to_png(fig)


def plot_levels(records: Sequence[GenerationRecord]) -> bytes | None:
    """Held-out accuracy per level over generations: the population vote (solid), the best member (dashed)."""
    levels = sorted({lv for r in records for lv in r.levels}, key=int)
    if not levels:
        return None
    colors = [f"C{i % 10}" for i in range(len(levels))]
    lines = []
    for lv, color in zip(levels, colors):
        lines.append((f"level {lv} vote", (lambda r, k=lv: r.levels.get(k, {}).get("ensemble_vote")), {"color": color}))
        lines.append(
            (
                f"level {lv} best member",
                (lambda r, k=lv: r.levels.get(k, {}).get("best_member")),
                {"color": color, "linestyle": "--", "alpha": 0.5},
            )
        )
    return _line_plot(records, lines, "held-out accuracy per level", "accuracy")


def plot_labels(records: Sequence[GenerationRecord]) -> bytes | None:
    """Label precision, recall and coverage against the hidden answers; back-offs marked on the x axis."""
    png_lines = [
        ("precision", lambda r: r.label_audit.get("precision"), {"color": "tab:red", "linewidth": 2}),
        ("recall", lambda r: r.label_audit.get("recall"), {"color": "tab:blue"}),
        ("coverage", lambda r: r.label_audit.get("coverage"), {"color": "tab:gray", "linestyle": ":"}),
    ]
    if not any(r.label_audit for r in records):
        return None
    backoffs = [r.generation for r in records if r.backoffs]
    title = "training labels against the answers"
    if backoffs:
        title += f" (back-off in generation {', '.join(map(str, backoffs))})"
    return _line_plot(records, png_lines, title, "share")


#: The phases of a generation in the order they run (others recorded are drawn after them).
PHASES = ("propose", "generate", "score", "validate", "train", "guard", "evolve", "eval")


def plot_phases(records: Sequence[GenerationRecord]) -> bytes | None:
    """Wall seconds per phase of each generation, stacked: which phase to scale out first."""
    timed = [r for r in records if r.seconds]
    if not timed:
        return None
    phases = [p for p in PHASES if any(p in r.seconds for r in timed)]
    phases += sorted({p for r in timed for p in r.seconds} - set(phases))
    fig = new_figure(7, 3.8)
    ax = fig.add_subplot()
    x = [r.generation for r in timed]
    bottom = [0.0] * len(timed)
    for i, phase in enumerate(phases):
        h = [r.seconds.get(phase, 0.0) for r in timed]
        ax.bar(x, h, bottom=bottom, label=phase, color=f"C{i % 10}")
        bottom = [b + v for b, v in zip(bottom, h)]
    total = {p: sum(r.seconds.get(p, 0.0) for r in timed) for p in phases}
    heaviest = max(total, key=lambda p: total[p])
    ax.set_xlabel("generation")
    ax.set_ylabel("seconds")
    ax.set_title(f"time per phase ({heaviest}: {total[heaviest] / max(1e-9, sum(total.values())):.0%} of the run)")
    ax.legend(fontsize=8, ncols=3)
    ax.grid(True, axis="y", alpha=0.3)
    generation_ticks(ax, x, 0.6)
    return to_png(fig)


def plot_retention(records: Sequence[GenerationRecord]) -> bytes | None:
    """The forgetting guard: each member's own-family validation figure before (dot) and after (arrow head)
    its gradient phase, per generation; the members rolled back in red."""
    guarded = [r for r in records if r.guard]
    if not guarded:
        return None
    members = sorted({m for r in guarded for m in r.guard})
    fig = new_figure(7, 3.8)
    ax = fig.add_subplot()
    width = 0.7 / max(1, len(members))
    for r in guarded:
        for j, m in enumerate(members):
            fig_m = r.guard.get(m)
            if not fig_m or "before" not in fig_m:
                continue
            x = r.generation - 0.35 + (j + 0.5) * width
            before = fig_m["before"]
            ax.plot([x], [before], "o", color="0.4", markersize=3)
            if "after" in fig_m:
                color = "C3" if m in r.rolled_back else "C2"
                ax.annotate(
                    "", xy=(x, fig_m["after"]), xytext=(x, before), arrowprops={"arrowstyle": "->", "color": color}
                )
    rolled = sum(len(r.rolled_back) for r in guarded)
    trained = sum(1 for r in guarded for f in r.guard.values() if "after" in f)
    ax.set_xlabel("generation (one column per member)")
    ax.set_ylabel("own-family validation accuracy")
    ax.set_title(f"forgetting guard: {rolled} of {trained} trained members rolled back (red)")
    ax.grid(True, axis="y", alpha=0.3)
    generation_ticks(ax, [r.generation for r in guarded], 0.6)
    return to_png(fig)
