"""Members' accuracies from who agrees with whom, without labels: a one-coin Dawid-Skene model fitted by EM.

Each member j answers an item correctly with probability p_j; when it is wrong, its answer is one of
`wrong_answers` equally likely wrong ones (or none at all). The true answer of an item is one of the
answers given for it, or an answer nobody gave. EM alternates:

- E-step: for each item, the posterior of each candidate truth t, proportional to
  prod_j [p_j if a_j == t else (1 - p_j) / wrong_answers] over the members that answered (a member
  with no answer says nothing about which t is true);
- M-step: p_j = (expected number of items j got right + 1) / (items j was asked + 2), Laplace-smoothed
  like the labelled estimate (`ensemble_serve.shared.population.reliability.smoothed`).

Why not crowd-kit's `DawidSkene`: it models one set of classes shared by every item, with a
confusion matrix per worker over those classes; the answers here are open (numbers, texts) and differ
from item to item, which is the one-coin model with per-item candidate sets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

WRONG_ANSWERS = 10  # how many distinct wrong answers a mistaken member spreads over (the model's K - 1)
OTHER = "\x00other"  # the candidate "the truth is an answer nobody gave"


@dataclass(frozen=True)
class AgreementFit:
    """Each member's estimated accuracy, the items it was asked, the posterior of each item's answers."""

    accuracy: dict[str, float]
    asked: dict[str, int]
    posteriors: list[dict[str, float]]
    iterations: int


def fit_one_coin(
    answers: Sequence[Mapping[str, str | None]],
    members: Sequence[str],
    *,
    wrong_answers: int = WRONG_ANSWERS,
    iterations: int = 100,
    tolerance: float = 1e-6,
    start: float = 0.7,
) -> AgreementFit:
    """Fit p_j from `answers[i][member]` (an answer, or None for no answer; a member may be absent from an item)."""
    if wrong_answers < 1:
        raise ValueError(f"wrong_answers must be >= 1, got {wrong_answers}")
    p = {m: start for m in members}
    asked = {m: sum(1 for item in answers if m in item) for m in members}
    posteriors: list[dict[str, float]] = []
    done = 0
    while done < iterations:
        done += 1
        posteriors = [_posterior(item, p, wrong_answers) for item in answers]
        new = {m: _m_step(m, answers, posteriors, asked[m]) for m in members}
        change = max((abs(new[m] - p[m]) for m in members), default=0.0)
        p = new
        if change < tolerance:
            break
    return AgreementFit(accuracy=p, asked=asked, posteriors=posteriors, iterations=done)


def _posterior(item: Mapping[str, str | None], p: Mapping[str, float], wrong_answers: int) -> dict[str, float]:
    """The posterior over one item's candidate truths (the answers given, and OTHER), uniform prior."""
    given = [(m, a) for m, a in item.items() if a is not None and m in p]
    candidates = list(dict.fromkeys(a for _, a in given)) + [OTHER]
    logs = {}
    for t in candidates:
        total = 0.0
        for m, a in given:
            q = min(max(p[m], 1e-6), 1 - 1e-6)
            total += math.log(q) if a == t else math.log((1 - q) / wrong_answers)
        logs[t] = total
    top = max(logs.values())
    weights = {t: math.exp(v - top) for t, v in logs.items()}
    norm = math.fsum(weights.values())
    return {t: w / norm for t, w in weights.items()}


def _m_step(member: str, answers: Sequence[Mapping[str, str | None]], posteriors: Sequence[dict], asked: int) -> float:
    right = math.fsum(
        post.get(item[member], 0.0) for item, post in zip(answers, posteriors) if item.get(member) is not None
    )
    return (right + 1.0) / (asked + 2.0)
