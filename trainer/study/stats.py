"""Statistics of the factorial ablation: balanced log-perplexity and per-factor effects with paired t-tests.

The metric is *balanced* log-perplexity: the mean over domains of each domain's log-PPL (mean
token negative log-likelihood), i.e. the log of the geometric mean of the per-domain
perplexities, so a large easy domain cannot hide a small hard one.

A factor's effect is measured the way the decomposition paper reports it:
``delta = log PPL_ref - log PPL_test`` (positive = the factor's "on" level improves), where, for
each seed, ``ref`` averages the cells with the factor off and ``test`` the cells with it on (all
other factors balanced by the design). The per-seed deltas are paired by seed; their mean,
standard error and a paired t-test (scipy's ``ttest_rel``) are reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Effect", "balanced_log_ppl", "factor_effects", "paired_effect"]


def balanced_log_ppl(per_domain: Mapping[str, tuple[float, int]]) -> float:
    """Mean over domains of log-PPL, from each domain's (sum of token NLL, token count).

    Raises ValueError for no domains, a domain without tokens, or a non-finite NLL.
    """
    if not per_domain:
        raise ValueError("balanced log-PPL needs at least one domain")
    logs = []
    for domain, (nll, tokens) in per_domain.items():
        if tokens <= 0:
            raise ValueError(f"domain {domain!r} has no tokens")
        if not math.isfinite(nll):
            raise ValueError(f"domain {domain!r} has a non-finite NLL ({nll})")
        logs.append(nll / tokens)
    return sum(logs) / len(logs)


@dataclass(frozen=True)
class Effect:
    """The effect of one factor: per-seed deltas (ref - test, positive = improvement) and their test."""

    deltas: tuple[float, ...]
    mean: float
    se: float | None
    t: float | None
    p: float | None

    @property
    def n(self) -> int:
        return len(self.deltas)

    def as_dict(self) -> dict[str, object]:
        return {"n": self.n, "mean": self.mean, "se": self.se, "t": self.t, "p": self.p, "deltas": list(self.deltas)}


def paired_effect(ref: Sequence[float], test: Sequence[float]) -> Effect:
    """Paired comparison of `ref` and `test` (same seeds, same order): mean of ref - test, SE, t, p.

    With one pair there is no test (t and p are None). With identical deltas (zero variance) the
    test is degenerate: p is 1.0 when every delta is 0 and 0.0 otherwise (t = +-inf).
    """
    if len(ref) != len(test):
        raise ValueError(f"paired samples differ in length: {len(ref)} vs {len(test)}")
    if not ref:
        raise ValueError("no pairs")
    values = [*ref, *test]
    if not all(math.isfinite(x) for x in values):
        raise ValueError("paired samples must be finite")
    deltas = tuple(float(r) - float(t) for r, t in zip(ref, test))
    n = len(deltas)
    mean = sum(deltas) / n
    if n < 2:
        return Effect(deltas, mean, None, None, None)
    var = sum((d - mean) ** 2 for d in deltas) / (n - 1)
    se = math.sqrt(var / n)
    if se == 0.0:
        if mean == 0.0:
            return Effect(deltas, mean, 0.0, 0.0, 1.0)
        return Effect(deltas, mean, 0.0, math.copysign(math.inf, mean), 0.0)
    from scipy.stats import ttest_rel

    result = ttest_rel(ref, test)
    return Effect(deltas, mean, se, float(result.statistic), float(result.pvalue))


def factor_effects(
    cells: Mapping[tuple[tuple[str, bool], ...], Mapping[int, float]], factors: Sequence[str]
) -> dict[str, Effect]:
    """Main effect of each factor from a (full or fractional, balanced) two-level design.

    `cells` maps a cell's levels, as a sorted tuple of (factor, on) pairs, to {seed: log-PPL}.
    For each factor and seed: ref = mean log-PPL of the cells with the factor off, test = with it
    on; only seeds present in every cell used are paired. A factor with no cell at one of its
    levels, or no seed common to both, is a ValueError naming it.
    """
    out: dict[str, Effect] = {}
    for factor in factors:
        off = [dict(c) for c in cells if not dict(c).get(factor, False)]
        on = [dict(c) for c in cells if dict(c).get(factor, False)]
        if not off or not on:
            raise ValueError(f"factor {factor!r} has no cell at its {'on' if not on else 'off'} level")
        lookup = {tuple(sorted(dict(c).items())): v for c, v in cells.items()}
        off_vals = [lookup[tuple(sorted(c.items()))] for c in off]
        on_vals = [lookup[tuple(sorted(c.items()))] for c in on]
        seeds = sorted(set.intersection(*(set(v) for v in off_vals + on_vals)))
        if not seeds:
            raise ValueError(f"factor {factor!r}: no seed is present in every cell")
        ref = [sum(v[s] for v in off_vals) / len(off_vals) for s in seeds]
        test = [sum(v[s] for v in on_vals) / len(on_vals) for s in seeds]
        out[factor] = paired_effect(ref, test)
    return out
