"""Held-out evaluation of a generation: greedy chains of every member, alone and voting together.

Every committed generation (and the starting one) is evaluated on the same held-out problems,
never trained on: member accuracy (overall and per domain), the ensemble's majority-vote
accuracy, and the oracle (any member right). The figures go into the generation's history
record, and each member's per-domain accuracy into the manifest (``domain_scores``), where the
router and the server can read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.population import Population, load_population, read_manifest, write_manifest
from ensemble_serve.shared.voting import vote
from ensemble_serve.shared.voting.answers import answers_equal
from trainer.evaluate import greedy_candidates
from trainer.tasks.sandbox import Problem

HELDOUT_MAX_TOKENS = 160
"""Generation limit of the held-out evaluation's greedy chains."""


def evaluate_heldout(
    engine: OfflineEngine, members: Sequence[str], problems: Sequence[Problem], answer: str, progress: bool = False
) -> dict:
    """Greedy chains of every member on the held-out problems: member, ensemble-vote and oracle accuracy."""
    if not problems:
        return {}
    cands = greedy_candidates(engine, members, problems, HELDOUT_MAX_TOKENS, answer, progress)
    domains = sorted({p.domain for p in problems})

    def acc(hits: Sequence[bool], subset: Sequence[int]) -> float:
        return round(sum(hits[i] for i in subset) / len(subset), 4) if subset else 0.0

    by_domain = {d: [i for i, p in enumerate(problems) if p.domain == d] for d in domains}
    every = list(range(len(problems)))
    per_member = {}
    member_hits = {}
    for m in members:
        hits = [cands[m][i].valid and answers_equal(cands[m][i].answer, p.answer) for i, p in enumerate(problems)]
        member_hits[m] = hits
        per_member[m] = {"all": acc(hits, every), **{d: acc(hits, ix) for d, ix in by_domain.items()}}
    vote_hits, agreement = [], []
    for i, p in enumerate(problems):
        result = vote([cands[m][i] for m in members], "majority")
        vote_hits.append(result.answer is not None and answers_equal(result.answer, p.answer))
        agreement.append(round(result.agreement, 4))
    oracle = [any(member_hits[m][i] for m in members) for i in every]
    member_all = [per_member[m]["all"] for m in members]
    return {
        "problems": len(problems),
        "best_member": max(member_all),
        "mean_member": round(sum(member_all) / len(member_all), 4),
        "ensemble_vote": acc(vote_hits, every),
        "oracle": acc(oracle, every),
        "vote_agreement": agreement,
        "ensemble_domains": {d: acc(vote_hits, ix) for d, ix in by_domain.items()},
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


def record_domain_scores(root: Path, per_member: dict[str, dict[str, float]]) -> Population:
    """Write each member's held-out accuracy per domain into the manifest; returns the population reloaded."""
    manifest = read_manifest(root)
    members = [
        m.model_copy(update={"domain_scores": {d: v for d, v in per_member[m.name].items() if d != "all"}})
        if m.name in per_member
        else m
        for m in manifest.members
    ]
    write_manifest(root, manifest.model_copy(update={"members": members}))
    return load_population(root, check_weights=False)
