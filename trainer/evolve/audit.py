"""The label audit: how good a generation's labels were, against answers the run never read.

Reported in the generation's history record (``labels_audit``) and in the report's label plot;
nothing reads it back to train or to choose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ensemble_serve.shared.voting.answers import answers_equal
from trainer.evolve.fitness import Evidence


def label_audit(
    ev: Evidence, labels: Mapping[str, Sequence[str | None]], truth: Sequence[str | None]
) -> dict[str, Any] | None:
    """Label precision and recall against the hidden answers, for the record only (None without answers).

    Over (member, problem) pairs whose answer is known: coverage = labelled / pairs; precision =
    right labels / labels; recall = right labels on pairs where some chain of the population reached
    the answer / those pairs (what a perfect judge of these chains could label). Also per cell
    (domain:level).
    Nothing reads it back: it is reported, never trained on, never used to choose.
    """
    if not truth or all(t is None for t in truth):
        return None
    reached = [
        t is not None and any(c.valid and answers_equal(c.answer, t) for m in ev.members for c in ev.candidates[m][i])
        for i, t in enumerate(truth)
    ]
    cells: dict[str, list[int]] = {}
    for i, p in enumerate(ev.problems):
        cells.setdefault(f"{p.domain}:{p.difficulty}", []).append(i)

    def figures(rows: Sequence[int]) -> dict[str, Any]:
        pairs = [(m, i) for m in ev.members for i in rows if truth[i] is not None]
        given = [(m, i) for m, i in pairs if labels[m][i] is not None]
        right = [(m, i) for m, i in given if answers_equal(labels[m][i], truth[i])]
        reachable = sum(reached[i] for _, i in pairs)
        return {
            "pairs": len(pairs),
            "labelled": len(given),
            "coverage": round(len(given) / len(pairs), 4) if pairs else None,
            "precision": round(len(right) / len(given), 4) if given else None,
            "recall": round(sum(reached[i] for _, i in right) / reachable, 4) if reachable else None,
        }

    return {**figures(range(len(truth))), "cells": {k: figures(v) for k, v in sorted(cells.items())}}
