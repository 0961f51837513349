"""Held-out evaluation of a generation: greedy chains of every member, alone and voting together.

Every committed generation (and the starting one) is evaluated on the same held-out problems,
never trained on: member accuracy (overall and per domain), the ensemble's majority-vote
accuracy, the oracle (any member right), the same per level (the vote, the best member overall,
the mean member, the oracle) and the members' pairwise disagreement. The figures go into the generation's history
record, and each member's per-domain accuracy into the manifest (``domain_scores``, written by
:func:`trainer.scoring.record_domain_scores`), where the router and the server can read it.

Chains, right answers, accuracy and disagreement come from :mod:`trainer.scoring`, the code
`ensemble-train eval` scores with, so both give the same figures for the same members, problems,
answer mode and generation limit (:data:`HELDOUT_MAX_TOKENS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.voting import vote
from trainer.evolve.labels import niche_group
from trainer.scoring import accuracy, answer_is_right, greedy_candidates, hits, mean_disagreement, share
from trainer.tasks.sandbox import Problem

HELDOUT_MAX_TOKENS = 160
"""Generation limit of the held-out evaluation's greedy chains."""


def evaluate_heldout(
    engine: OfflineEngine,
    members: Sequence[str],
    problems: Sequence[Problem],
    answer: str,
    progress: bool = False,
    niches: Mapping[str, str | None] | None = None,
) -> dict:
    """Greedy chains of every member on the held-out problems: member, ensemble-vote and oracle accuracy.

    With `niches` ({member: focus domain}) also the niche vote: the majority of the members whose
    focus domain is the problem's domain (every member's where none is)."""
    if not problems:
        return {}
    cands = greedy_candidates(engine, members, problems, HELDOUT_MAX_TOKENS, answer, progress)
    domains = sorted({p.domain for p in problems})

    def acc(flags: Sequence[bool], subset: Sequence[int]) -> float:
        return share([flags[i] for i in subset])

    by_domain = {d: [i for i, p in enumerate(problems) if p.domain == d] for d in domains}
    every = list(range(len(problems)))
    member_hits = {m: hits(problems, cands[m]) for m in members}
    per_member = {m: accuracy(member_hits[m], problems) for m in members}
    vote_hits, agreement = [], []
    for i, p in enumerate(problems):
        result = vote([cands[m][i] for m in members], "majority")
        vote_hits.append(answer_is_right(result.answer, p))
        agreement.append(round(result.agreement, 4))
    oracle = [any(member_hits[m][i] for m in members) for i in every]
    niche_hits = None
    if niches and any(niches.get(m) for m in members):
        niche_hits = []
        for i, p in enumerate(problems):
            result = vote([cands[m][i] for m in niche_group(members, niches, p.domain)], "majority")
            niche_hits.append(answer_is_right(result.answer, p))
    member_all = [per_member[m]["all"] for m in members]
    levels = {
        lv: [i for i, p in enumerate(problems) if p.difficulty == lv] for lv in sorted({p.difficulty for p in problems})
    }
    best = max(members, key=lambda m: per_member[m]["all"])  # the best member overall (first on ties)
    per_level = {
        str(lv): {
            "problems": len(ix),
            "ensemble_vote": acc(vote_hits, ix),
            "best_member": acc(member_hits[best], ix),
            "mean_member": round(sum(acc(member_hits[m], ix) for m in members) / len(members), 4),
            "oracle": acc(oracle, ix),
            **({"niche_vote": acc(niche_hits, ix)} if niche_hits is not None else {}),
        }
        for lv, ix in levels.items()
        if lv > 0
    }
    return {
        "problems": len(problems),
        "best_member": max(member_all),
        "mean_member": round(sum(member_all) / len(member_all), 4),
        "ensemble_vote": acc(vote_hits, every),
        "oracle": acc(oracle, every),
        **({"niche_vote": acc(niche_hits, every)} if niche_hits is not None else {}),
        "vote_agreement": agreement,
        "ensemble_domains": {d: acc(vote_hits, ix) for d, ix in by_domain.items()},
        **({"levels": per_level} if per_level else {}),
        "disagreement": mean_disagreement([cands[m] for m in members]),
        "members": per_member,
    }


def heldout_summary(heldout: dict[str, Any]) -> dict[str, Any]:
    """The history record's held-out figures: everything but the per-member accuracies."""
    return {k: v for k, v in heldout.items() if k != "members"}


def add_heldout(record: dict[str, Any], heldout: dict[str, Any]) -> None:
    """Put the held-out figures into a generation's history record (each member's into its entry)."""
    for m in record["members"]:
        m["heldout"] = heldout["members"].get(m["name"])
    record["heldout"] = heldout_summary(heldout)
