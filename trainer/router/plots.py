"""The router's plot: its mean gate per domain and member (who the router sends what)."""

from __future__ import annotations

from collections.abc import Mapping

from trainer.plotting import new_figure, to_png


def plot_specialisation(
    table: Mapping[str, Mapping[str, float]], title: str = "Mean router gate per domain"
) -> bytes | None:
    """Heat map of a router's mean gate per domain (rows) and member (columns): who the router sends what."""
    domains = list(table)
    members = list(next(iter(table.values()), {}))
    if not domains or not members:
        return None
    grid = [[float(table[d].get(m, 0.0)) for m in members] for d in domains]
    fig = new_figure(1.6 + 0.75 * len(members), 1.2 + 0.45 * len(domains))
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
    return to_png(fig)
