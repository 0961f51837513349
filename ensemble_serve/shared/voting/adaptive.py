"""When to stop sampling: the stopping rule of adaptive fan-out (waves of chains, most trusted first).

After each wave the answers so far are counted (chains, not weights). With v1 chains for the
leading answer and v2 for the runner-up, Adaptive-Consistency (Aggarwal et al., 2023) models the
leader's share among the two as p ~ Beta(v1 + 1, v2 + 1) (a uniform prior) and stops once
P(p > 1/2) reaches the requested confidence. For integer counts that probability has a closed
form, the binomial identity of the regularized incomplete beta function:

    P(p > 1/2) = P(Binomial(v1 + v2 + 1, 1/2) <= v1)

so 2, 3, 4 and 5 agreeing chains and no dissent give 0.875, 0.9375, 0.969 and 0.984. Sampling
also stops when the chains left could not overturn the lead whatever they answer, and when none
are left. Counting chains (not vote weights) keeps the rule the paper's for every vote rule; the
vote itself then runs on the chains sampled, with the request's rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["STOP_REASONS", "leader_probability", "stop_reason", "wave_order", "waves"]

STOP_REASONS = ("confident", "decided", "exhausted")
"""confident: the leader reached the confidence; decided: the chains left cannot overturn it;
exhausted: every chain of the full fan-out was sampled."""


def leader_probability(leading: int, runner_up: int) -> float:
    """P(leader's share > runner-up's) under Beta(leading + 1, runner_up + 1): 0.5 on a tie, -> 1 as the lead grows."""
    if leading < 0 or runner_up < 0 or leading < runner_up:
        raise ValueError(f"need leading >= runner_up >= 0, got {leading} and {runner_up}")
    n = leading + runner_up + 1
    return sum(math.comb(n, j) for j in range(leading + 1)) / 2**n


def stop_reason(counts: Sequence[int], remaining: int, confidence: float) -> tuple[str | None, float]:
    """Whether to stop after a wave, and the leader's probability.

    `counts` are the chain counts of the answers so far (any order; chains with no answer are not
    counted); `remaining` the chains of the full fan-out not sampled yet. Returns (reason, p): reason
    None means sample the next wave.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    ranked = sorted((int(c) for c in counts if c > 0), reverse=True)
    leading = ranked[0] if ranked else 0
    runner_up = ranked[1] if len(ranked) > 1 else 0
    p = leader_probability(leading, runner_up)
    if leading > 0 and p >= confidence:
        return "confident", p
    if leading > runner_up + remaining:
        return "decided", p
    if remaining <= 0:
        return "exhausted", p
    return None, p


def wave_order(members: Sequence[str], samples: int, trust: dict[str, float]) -> list[tuple[str, int]]:
    """Every (member, sample) of the full fan-out, most trusted member first, one chain of each member
    before a second of any (ties keep the given order)."""
    ranked = sorted(range(len(members)), key=lambda i: (-trust.get(members[i], 0.0), i))
    return [(members[i], s) for s in range(samples) for i in ranked]


def waves(total: int, wave_size: int | None) -> int:
    """The wave size for a fan-out of `total` chains: the asked one, or half the fan-out rounded up (at least 2)."""
    if wave_size is not None:
        return wave_size
    return min(total, max(2, math.ceil(total / 2)))
