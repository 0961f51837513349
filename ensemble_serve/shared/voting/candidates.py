"""A chain as a voter: the answer extracted from it and whether it votes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ensemble_serve.shared.voting.answers import AnswerSpec, extract_answer

STATUSES = ("ok", "missing", "malformed", "failed")


def is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One generated chain and the answer extracted from it.

    ``answer`` is set exactly when ``status`` is "ok"; "failed" marks a generation error.
    """

    member: str
    sample: int  # sample index within the member
    text: str
    answer: str | None  # extracted, normalized answer (None if none parseable)
    status: str  # "ok" | "missing" | "malformed" | "failed"
    tokens: int
    mean_logprob: float | None = None  # mean token logprob of the chain, if known (tie-breaks)

    def __post_init__(self) -> None:
        if not isinstance(self.member, str) or not self.member:
            raise ValueError(f"member must be a non-empty string, got {self.member!r}")
        if isinstance(self.sample, bool) or not isinstance(self.sample, int) or self.sample < 0:
            raise ValueError(f"sample must be an integer >= 0, got {self.sample!r}")
        if not isinstance(self.text, str):
            raise TypeError(f"text must be a string, got {type(self.text).__name__}")
        if self.status not in STATUSES:
            raise ValueError(f"unknown candidate status {self.status!r}; valid statuses: {', '.join(STATUSES)}")
        if self.status == "ok":
            if not isinstance(self.answer, str) or not self.answer:
                raise ValueError(f"a candidate with status 'ok' needs a non-empty answer, got {self.answer!r}")
        elif self.answer is not None:
            raise ValueError(f"a candidate with status {self.status!r} must have answer None, got {self.answer!r}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 0:
            raise ValueError(f"tokens must be an integer >= 0, got {self.tokens!r}")
        if self.mean_logprob is not None and (not is_real(self.mean_logprob) or math.isnan(self.mean_logprob)):
            raise ValueError(f"mean_logprob must be a number (not NaN) or None, got {self.mean_logprob!r}")

    @property
    def valid(self) -> bool:
        """Whether this chain votes: it has a parseable answer and did not fail."""
        return self.status == "ok" and self.answer is not None


def candidate_from_text(
    member: str,
    sample: int,
    text: str,
    tokens: int,
    spec: AnswerSpec,
    mean_logprob: float | None = None,
    finished: bool = True,
) -> Candidate:
    """A candidate for a chain, its answer extracted from `text` with the extractor `spec`.

    A chain cut off by its token limit (`finished` False) states no final answer of its own: under
    `natural`, only what `auto` reads (a marker or "the answer is") counts there, not its last number.
    """
    if not finished and spec == "natural":
        spec = "auto"
    ex = extract_answer(text, spec)
    return Candidate(member, sample, text, ex.value, ex.status, tokens, mean_logprob)
