"""How the router's population is judged: which member answers verify, and the held-out accuracy of each method.

:func:`correctness` gives the training targets' source (``[problems, members]`` booleans);
:func:`heldout_report` scores every way to use the population on the held-out problems, keyed by
:data:`METHODS`: the routed top-1 member, the routed top-k vote (ties go to the larger summed
gate, :func:`routed_vote`), the vote of all members, the best single member and the oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ensemble_serve.shared.router import top_k
from ensemble_serve.shared.voting import Candidate, vote
from trainer.scoring import accuracy, answer_is_right, is_right
from trainer.tasks.sandbox import Problem

__all__ = ["METHODS", "correctness", "heldout_report", "routed_vote"]

METHODS = ("routed_top1", "routed_top_k", "all_vote", "best_member", "oracle")
"""Keys of the held-out accuracies, in the order the report prints them."""


def correctness(problems: Sequence[Problem], answers: Sequence[Sequence[Candidate]]) -> torch.Tensor:
    """``[N, M]`` booleans: whether member ``m``'s chain is right on problem ``n`` (:func:`trainer.scoring.is_right`)."""
    if len(problems) != len(answers):
        raise ValueError(f"{len(answers)} answer rows for {len(problems)} problems")
    rows = [[is_right(p, c) for c in row] for p, row in zip(problems, answers)]
    width = len(answers[0]) if answers else 0
    return torch.tensor(rows, dtype=torch.bool).reshape(len(problems), width)


def routed_vote(candidates: Sequence[Candidate], gates: Sequence[float]) -> str | None:
    """Majority answer of the routed members' chains; equal counts go to the answer with the larger summed gate.

    ``gates[i]`` is the gate of ``candidates[i]``'s member. A plain majority vote would break a
    tie by which chain came first; the router's confidence is the better tie-break.
    """
    if len(candidates) != len(gates):
        raise ValueError(f"{len(gates)} gates for {len(candidates)} candidates")
    result = vote(candidates, "majority")
    if result.answer is None:
        return None
    answers = list(result.votes)
    best = max(
        range(len(result.groups)),
        key=lambda g: (len(result.groups[g]), sum(gates[i] for i in result.groups[g]), -g),
    )
    return answers[best]


def heldout_report(
    problems: Sequence[Problem],
    answers: Sequence[Sequence[Candidate]],
    gates: torch.Tensor,
    members: Sequence[str],
    k: int,
) -> dict[str, Any]:
    """Held-out accuracy (per domain and "all") of each way to use the population; see :data:`METHODS`.

    ``best_member`` is the member with the best held-out accuracy (ties: manifest order), an
    optimistic baseline: it is chosen on the very problems it is scored on.
    """
    if not problems:
        raise ValueError("no held-out problems to evaluate on")
    correct = correctness(problems, answers)
    if tuple(gates.shape) != (len(problems), len(members)):
        raise ValueError(f"gates must be [{len(problems)}, {len(members)}], got {list(gates.shape)}")
    routed_top1: list[bool] = []
    routed_k: list[bool] = []
    all_vote: list[bool] = []
    chosen = dict.fromkeys(members, 0)
    for n, p in enumerate(problems):
        row = gates[n]
        first = top_k(row, 1)[0]
        chosen[members[first]] += 1
        routed_top1.append(bool(correct[n, first]))
        picks = top_k(row, k)
        answer = routed_vote([answers[n][j] for j in picks], [float(row[j]) for j in picks])
        routed_k.append(answer_is_right(answer, p))
        result = vote(list(answers[n]), "majority")
        all_vote.append(answer_is_right(result.answer, p))
    per_member = {m: accuracy(correct[:, j].tolist(), problems) for j, m in enumerate(members)}
    best = max(members, key=lambda m: (per_member[m]["all"], -members.index(m)))
    oracle = correct.any(dim=1).tolist()
    return {
        "problems": len(problems),
        "top_k": k,
        "accuracy": {
            "routed_top1": accuracy(routed_top1, problems),
            "routed_top_k": accuracy(routed_k, problems),
            "all_vote": accuracy(all_vote, problems),
            "best_member": per_member[best],
            "oracle": accuracy(oracle, problems),
        },
        "best_member": best,
        "members": per_member,
        "routed_top1_choice": chosen,
    }
