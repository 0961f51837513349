"""Outcome groups: which extracted answers count as the same outcome.

:class:`ExactGrouper` groups equal normalized answers (numbers compared numerically);
:class:`SemanticGrouper` groups free-form answers by embedding similarity. :func:`outcome_groups`
gives the valid candidates' groups in first-appearance order with each group's representative
(its most frequent answer, ties to the first seen): the order the cross vote's jurors score in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ensemble_serve.shared.embeddings import Embedder
from ensemble_serve.shared.voting.answers import normalize_answer
from ensemble_serve.shared.voting.candidates import Candidate, is_real

# ---------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------


@runtime_checkable
class Grouper(Protocol):
    """Assigns each answer an outcome-group id; ids are numbered 0, 1, ... by first appearance."""

    def group(self, answers: Sequence[str]) -> list[int]: ...


def _first_appearance_ids(keys: Sequence[object]) -> list[int]:
    """Ids for hashable keys, numbered by first appearance."""
    ids: dict[object, int] = {}
    return [ids.setdefault(k, len(ids)) for k in keys]


@dataclass(frozen=True)
class ExactGrouper:
    """Groups answers that are equal in the sense of :func:`~ensemble_serve.shared.voting.answers.answers_equal`.

    Numbers compare numerically ("42" and "42.0" share a group), text after normalization.
    """

    def group(self, answers: Sequence[str]) -> list[int]:
        # normalize_answer yields one canonical form per number, so equal keys <=> answers_equal.
        return _first_appearance_ids([normalize_answer(a) for a in answers])


@dataclass(frozen=True)
class SemanticGrouper:
    """Groups free-form answers by embedding similarity.

    Answers are taken in order; each joins the first existing group whose representative (the
    group's first answer) has cosine similarity >= `threshold` with it, else starts a new group.
    Answers that are equal after normalization always share a group (and are embedded once).
    """

    embedder: Embedder
    threshold: float = 0.8

    def __post_init__(self) -> None:
        if not is_real(self.threshold) or not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a number in [-1, 1], got {self.threshold!r}")

    def group(self, answers: Sequence[str]) -> list[int]:
        keys = [normalize_answer(a) for a in answers]
        distinct = list(dict.fromkeys(keys))
        if not distinct:
            return []
        vecs = np.asarray(self.embedder.encode(distinct), dtype=np.float64)
        if vecs.ndim != 2 or vecs.shape[0] != len(distinct):
            raise ValueError(f"the embedder returned shape {vecs.shape} for {len(distinct)} texts")
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        vecs = np.divide(vecs, norms, out=np.zeros_like(vecs), where=norms > 0)
        reps: list[np.ndarray] = []
        group_of: dict[str, int] = {}
        for key, vec in zip(distinct, vecs):
            gid = next((g for g, rep in enumerate(reps) if float(rep @ vec) >= self.threshold), None)
            if gid is None:
                gid = len(reps)
                reps.append(vec)
            group_of[key] = gid
        return [group_of[k] for k in keys]


def _checked_ids(ids: Sequence[int], n: int) -> list[int]:
    """A grouper's ids, checked and renumbered by first appearance."""
    ids = list(ids)
    if len(ids) != n:
        raise ValueError(f"the grouper returned {len(ids)} group ids for {n} answers")
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if bad:
        raise ValueError(f"group ids must be integers, got {bad[:5]!r}")
    return _first_appearance_ids([int(i) for i in ids])


def _representative(answers: Sequence[str]) -> str:
    """The most frequent answer; ties go to the first seen (Counter keeps insertion order)."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a, c in counts.items() if c == best)


def outcome_groups(
    candidates: Sequence[Candidate], grouper: Grouper | None = None
) -> tuple[list[list[int]], list[str]]:
    """The valid candidates' outcome groups, in first-appearance order, and each group's representative.

    ``groups[g]`` lists candidate indices (into `candidates`); ``representatives[g]`` is that group's
    most frequent answer. This is the order ``VoteContext.cross_scores`` uses.
    """
    grouper = ExactGrouper() if grouper is None else grouper
    valid = [i for i, c in enumerate(candidates) if c.valid]
    if not valid:
        return [], []
    answers = [candidates[i].answer for i in valid]
    ids = _checked_ids(grouper.group(answers), len(valid))
    groups: list[list[int]] = [[] for _ in range(max(ids) + 1)]
    for i, gid in zip(valid, ids):
        groups[gid].append(i)
    reps = [_representative([candidates[i].answer for i in g]) for g in groups]
    return groups, reps
