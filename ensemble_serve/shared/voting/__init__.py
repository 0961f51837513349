"""Voting over members' chains: extraction (`answers.py`), voters (`candidates.py`), outcome groups
(`grouping.py`) and the registered vote rules (`rules.py`). The public names of the last three, re-exported."""

from __future__ import annotations

from ensemble_serve.shared.voting.candidates import (
    STATUSES,
    Candidate,
    candidate_from_text,
    is_real,
)
from ensemble_serve.shared.voting.grouping import (
    ExactGrouper,
    Grouper,
    SemanticGrouper,
    outcome_groups,
)
from ensemble_serve.shared.voting.rules import (
    VOTE_RULES,
    VoteContext,
    VoteResult,
    VoteRule,
    decided,
    get_vote_rule,
    remaining_weight,
    vote,
    vote_cross,
    vote_majority,
    vote_weighted,
    winner_key,
)

__all__ = [
    "Candidate",
    "ExactGrouper",
    "Grouper",
    "STATUSES",
    "SemanticGrouper",
    "VOTE_RULES",
    "VoteContext",
    "VoteResult",
    "VoteRule",
    "candidate_from_text",
    "decided",
    "get_vote_rule",
    "is_real",
    "outcome_groups",
    "remaining_weight",
    "vote",
    "vote_cross",
    "vote_majority",
    "vote_weighted",
    "winner_key",
]
