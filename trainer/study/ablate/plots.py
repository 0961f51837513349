"""The ablation report's plots: each factor's effect with its SE and p-value, and the effects per domain.

Drawn with :func:`trainer.plotting.new_figure` (matplotlib's Agg canvas, imported only
when a plot is drawn); a plot without data is None.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from trainer.plotting import new_figure, to_png
from trainer.study.ablate.markdown import fmt_p

__all__ = ["plot_domain_effects", "plot_effects"]


def plot_effects(s: Mapping[str, Any]) -> bytes | None:
    """Bar chart of each factor's mean effect with +-1 SE bars and the p-value on top.

    With the base-perturbation probe, each factor gets a second, hatched bar: its effect on the
    perturbed base.
    """
    rows = [(f, e) for f, e in s["effects"].items() if e.get("n")]
    if not rows:
        return None
    probe = (s.get("perturbed") or {}).get("effects", {})
    series = [("plain base", [e for _, e in rows], "")]
    if any((probe.get(f) or {}).get("n") for f, _ in rows):
        series.append(
            (f"perturbed base (sigma {s['perturbed']['sigma']:g})", [probe.get(f) or {} for f, _ in rows], "//")
        )
    width = 0.8 / len(series)
    fig = new_figure(max(4.4, 1.6 + 1.3 * len(rows) * len(series) ** 0.5), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    for k, (label, effects, hatch) in enumerate(series):
        for i, e in enumerate(effects):
            if not e.get("n"):
                continue
            x = i + (k - (len(series) - 1) / 2) * width
            m, err = e["mean"], e["se"] or 0.0
            ax.bar(
                x, m, width=width, yerr=err, color="tab:green" if m > 0 else "tab:red", capsize=4, alpha=0.8,
                hatch=hatch, edgecolor="black" if hatch else None, label=label if i == 0 else None,
            )  # fmt: skip
            ax.annotate(
                f"p={fmt_p(e['p'])}",
                (x, m + (err if m >= 0 else -err)),
                ha="center",
                va="bottom" if m >= 0 else "top",
                fontsize=7 if len(series) > 1 else 8,
            )
    ax.axhline(0.0, color="black", lw=0.8)
    xs = range(len(rows))
    ax.set_xticks(list(xs), [f"{f}\n{s['factors'][f][0]}->{s['factors'][f][1]}" for f, _ in rows], fontsize=8)
    ax.set_ylabel("delta log-PPL (positive = improves)")
    ax.set_title("Effect on balanced log-PPL\n(mean +- SE over seeds)", fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return to_png(fig)


def plot_domain_effects(s: Mapping[str, Any]) -> bytes | None:
    """Heat map of the mean effect per factor (rows) and domain (columns)."""
    factors = list(s["domain_effects"])
    domains = sorted({d for per in s["domain_effects"].values() for d in per})
    if not factors or not domains:
        return None
    grid = [[(s["domain_effects"][f].get(d) or {}).get("mean") for d in domains] for f in factors]
    flat = [abs(v) for row in grid for v in row if v is not None]
    if not flat:
        return None
    lim = max(flat) or 1.0
    fig = new_figure(max(4.4, 1.5 + 0.9 * len(domains)), 1.6 + 0.5 * len(factors))
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
    return to_png(fig)
