"""Voting over members' chains: group the extracted answers into outcomes and pick the consensus.

Pure logic (no engine, no HTTP). A request fans out to members; each chain becomes a
:class:`Candidate` (see :func:`candidate_from_text`). A vote rule from :data:`VOTE_RULES`
(:func:`get_vote_rule`) turns the candidates into a :class:`VoteResult`:

* Only *valid* candidates vote: status "ok" with an answer. The others ("missing", "malformed",
  "failed") are listed in ``VoteResult.excluded``.
* A :class:`Grouper` puts the valid answers into outcome groups (:class:`ExactGrouper`: equal
  normalized answers, numbers compared numerically; :class:`SemanticGrouper`: embedding
  similarity, for free-form answers). A group's representative is its most frequent answer
  (ties: first seen).
* Each group gets a weight; the heaviest group wins, equal weights going to the group whose first
  candidate comes first. ``votes`` lists the groups by weight (descending), then by answer.
* The winner chain is the candidate of the winning group that best carries the consensus (see
  :func:`winner_key`).

:func:`outcome_groups` gives the groups (in first-appearance order) before voting, so the server
can have jurors score each distinct answer for the "cross" rule. :func:`decided` and
:func:`remaining_weight` support stopping generation early once no running chain can change the
winner.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from ensemble_serve.shared.voting.candidates import Candidate, is_real
from ensemble_serve.shared.voting.grouping import ExactGrouper, Grouper, outcome_groups

# ---------------------------------------------------------------------------
# Context and result
# ---------------------------------------------------------------------------


def _check_weights(weights: Mapping[str, float], what: str) -> dict[str, float]:
    if not isinstance(weights, Mapping):
        raise TypeError(f"{what} must be a mapping of member name to weight, got {type(weights).__name__}")
    bad = sorted(str(k) for k, w in weights.items() if not (is_real(w) and math.isfinite(w) and w >= 0))
    if bad:
        raise ValueError(f"{what} must be finite numbers >= 0; bad: {bad}")
    return {k: float(w) for k, w in weights.items()}


@dataclass(frozen=True)
class VoteContext:
    """What a vote rule may use besides the candidates.

    * ``member_weights``: for "weighted", a member's weight (a member not listed weighs 1.0);
      finite and >= 0.
    * ``grouper``: how answers are grouped into outcomes.
    * ``cross_scores``: for "cross", juror name -> one log-likelihood score per outcome group, in the
      order of :func:`outcome_groups` (first appearance), *not* the weight order of ``VoteResult.groups``.
    """

    member_weights: Mapping[str, float] = field(default_factory=dict)
    grouper: Grouper = field(default_factory=ExactGrouper)
    cross_scores: Mapping[str, Sequence[float]] | None = None

    def __post_init__(self) -> None:
        weights = _check_weights(self.member_weights, "member_weights")
        object.__setattr__(self, "member_weights", MappingProxyType(weights))
        if not callable(getattr(self.grouper, "group", None)):
            raise TypeError(f"grouper must have a group(answers) method, got {type(self.grouper).__name__}")
        if self.cross_scores is not None:
            if not isinstance(self.cross_scores, Mapping):
                raise TypeError(f"cross_scores must be a mapping, got {type(self.cross_scores).__name__}")
            scores: dict[str, tuple[float, ...]] = {}
            for juror, row in self.cross_scores.items():
                if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or not all(map(is_real, row)):
                    raise ValueError(f"cross_scores[{juror!r}] must be a sequence of numbers, got {row!r}")
                scores[juror] = tuple(float(x) for x in row)
            object.__setattr__(self, "cross_scores", MappingProxyType(scores))


@dataclass(frozen=True)
class VoteResult:
    """The outcome of a vote."""

    answer: str | None  # representative answer of the winning group (None if no valid candidate)
    agreement: float  # winning weight / total valid weight (0.0 if none)
    votes: dict[str, float]  # representative answer -> weight, sorted by weight desc then answer
    groups: list[list[int]]  # candidate indices per outcome group (same order as `votes` keys)
    winner: int | None  # index of the chain that best carries the consensus
    excluded: list[int]  # candidates with no parseable answer or status "failed"
    rule: str


def _member_order(candidates: Sequence[Candidate]) -> dict[str, int]:
    order: dict[str, int] = {}
    for c in candidates:
        order.setdefault(c.member, len(order))
    return order


def winner_key(
    candidates: Sequence[Candidate], member_weight: Callable[[str], float] | None = None
) -> Callable[[int], tuple]:
    """Sort key (smallest first) for choosing the winner chain among candidate indices.

    Highest member weight first when `member_weight` is given (the "weighted" rule), then highest
    ``mean_logprob`` (None lowest), then the member that appears first in `candidates`, then the
    lowest sample index, then the lowest candidate index.
    """
    order = _member_order(candidates)

    def key(i: int) -> tuple:
        c = candidates[i]
        lp = -math.inf if c.mean_logprob is None else float(c.mean_logprob)
        w = member_weight(c.member) if member_weight is not None else 0.0
        return (-w, -lp, order[c.member], c.sample, i)

    return key


def _result(
    candidates: Sequence[Candidate],
    groups: list[list[int]],
    reps: list[str],
    weights: list[float],
    rule: str,
    key: Callable[[int], tuple],
) -> VoteResult:
    """Assemble a result from groups in first-appearance order and their weights."""
    excluded = [i for i, c in enumerate(candidates) if not c.valid]
    if not groups:
        return VoteResult(None, 0.0, {}, [], None, excluded, rule)
    best = max(range(len(groups)), key=lambda g: (weights[g], -g))  # equal weights: first group wins
    total = math.fsum(weights)
    agreement = weights[best] / total if total > 0 else 0.0
    order = sorted(range(len(groups)), key=lambda g: (-weights[g], reps[g]))
    return VoteResult(
        answer=reps[best],
        agreement=agreement,
        votes={reps[g]: weights[g] for g in order},
        groups=[list(groups[g]) for g in order],
        winner=min(groups[best], key=key),
        excluded=excluded,
        rule=rule,
    )


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------


def _majority(candidates: Sequence[Candidate], ctx: VoteContext, rule: str) -> VoteResult:
    groups, reps = outcome_groups(candidates, ctx.grouper)
    weights = [float(len(g)) for g in groups]
    return _result(candidates, groups, reps, weights, rule, winner_key(candidates))


def vote_majority(candidates: Sequence[Candidate], ctx: VoteContext) -> VoteResult:
    """Each valid candidate weighs 1."""
    return _majority(candidates, ctx, "majority")


def vote_weighted(candidates: Sequence[Candidate], ctx: VoteContext) -> VoteResult:
    """Each valid candidate weighs its member's weight (``ctx.member_weights``, default 1.0).

    If every valid candidate's weight is 0, each counts 1 instead (a plain majority vote, still
    reported as rule "weighted"). The winner chain prefers the heaviest member.
    """
    groups, reps = outcome_groups(candidates, ctx.grouper)

    valid = [i for g in groups for i in g]
    all_zero = bool(valid) and all(ctx.member_weights.get(candidates[i].member, 1.0) == 0.0 for i in valid)

    def weight(member: str) -> float:
        return 1.0 if all_zero else ctx.member_weights.get(member, 1.0)

    weights = [math.fsum(weight(candidates[i].member) for i in g) for g in groups]
    return _result(candidates, groups, reps, weights, "weighted", winner_key(candidates, weight))


def vote_calibrated(candidates: Sequence[Candidate], ctx: VoteContext) -> VoteResult:
    """Each valid candidate weighs its member's reliability weight: log(p / (1 - p)) for the member's
    accuracy p on this kind of item, the optimal weighted majority of independent voters.

    The weights come in ``ctx.member_weights`` (the server computes them from the population's
    reliability table, see ``ensemble_serve.shared.population.reliability``). A member without one
    weighs 0: neutral, it neither supports nor opposes. If every valid candidate weighs 0 (no table,
    or no member better than a coin flip here), it is a plain majority vote, reported as rule
    "calibrated->majority". The winner chain prefers the most reliable member.
    """
    groups, reps = outcome_groups(candidates, ctx.grouper)
    valid = [i for g in groups for i in g]

    def weight(member: str) -> float:
        return ctx.member_weights.get(member, 0.0)

    if valid and all(weight(candidates[i].member) == 0.0 for i in valid):
        return _majority(candidates, ctx, "calibrated->majority")
    weights = [math.fsum(weight(candidates[i].member) for i in g) for g in groups]
    return _result(candidates, groups, reps, weights, "calibrated", winner_key(candidates, weight))


def _softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = math.fsum(exps)
    return [e / total for e in exps]


def vote_cross(candidates: Sequence[Candidate], ctx: VoteContext) -> VoteResult:
    """Jurors score each outcome; a group's weight is the jurors' mean softmax probability for it.

    ``ctx.cross_scores`` maps each juror to one log-likelihood per group of :func:`outcome_groups`
    (ValueError if absent or of the wrong length). Each juror's scores are softmaxed into a
    distribution over the groups; the weights (which sum to 1) are the mean over jurors. Jurors
    with a non-finite score are skipped; with no usable juror the vote falls back to majority and
    the result's rule is "cross->majority".
    """
    if ctx.cross_scores is None:
        raise ValueError("cross vote needs cross_scores")
    groups, reps = outcome_groups(candidates, ctx.grouper)
    if not groups:
        return _result(candidates, groups, reps, [], "cross", winner_key(candidates))
    dists: list[list[float]] = []
    for juror, scores in ctx.cross_scores.items():
        if len(scores) != len(groups):
            raise ValueError(f"juror {juror!r} has {len(scores)} cross scores for {len(groups)} outcome groups")
        if all(math.isfinite(s) for s in scores):
            dists.append(_softmax(scores))
    if not dists:
        return _majority(candidates, ctx, "cross->majority")
    weights = [math.fsum(d[g] for d in dists) / len(dists) for g in range(len(groups))]
    return _result(candidates, groups, reps, weights, "cross", winner_key(candidates))


@dataclass(frozen=True)
class VoteRule:
    """A registered vote rule: its function and what the server needs to know about it.

    `weighs_members`: candidates count their member's weight (router gates, or the manifest's weights),
    so early stop counts the running chains with those weights. `needs_jury`: members score each
    outcome before the rule runs (the server asks the engine), and no count can settle the vote early.
    `by_reliability`: the member weights are the reliability table's log-odds for the prompt's domain.
    """

    name: str
    apply: Callable[[Sequence[Candidate], VoteContext], VoteResult]
    weighs_members: bool = False
    needs_jury: bool = False
    by_reliability: bool = False

    def __call__(self, candidates: Sequence[Candidate], ctx: VoteContext) -> VoteResult:
        return self.apply(candidates, ctx)

    def remaining(self, pending_members: Sequence[str], member_weights: Mapping[str, float]) -> float:
        """The most weight chains still running (one entry per chain: its member) can add to one outcome."""
        if self.needs_jury:
            return math.inf
        if self.weighs_members:
            return math.fsum(member_weights.get(m, 1.0) for m in pending_members)
        return float(len(pending_members))


VOTE_RULES: dict[str, VoteRule] = {
    rule.name: rule
    for rule in (
        VoteRule("majority", vote_majority),
        VoteRule("weighted", vote_weighted, weighs_members=True),
        VoteRule("cross", vote_cross, needs_jury=True),
        VoteRule("calibrated", vote_calibrated, weighs_members=True, by_reliability=True),
    )
}


def get_vote_rule(name: str) -> VoteRule:
    """The vote rule registered as `name`; ValueError naming the valid rules otherwise."""
    try:
        return VOTE_RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown vote rule {name!r}; valid rules: {', '.join(VOTE_RULES)}") from None


def vote(candidates: Sequence[Candidate], rule: str = "majority", ctx: VoteContext | None = None) -> VoteResult:
    """Run the vote rule named `rule` (default context: no weights, exact grouping, no jurors)."""
    return get_vote_rule(rule)(candidates, VoteContext() if ctx is None else ctx)


# ---------------------------------------------------------------------------
# Early stopping
# ---------------------------------------------------------------------------


def decided(weights: Mapping[str, float], remaining: float) -> bool:
    """Whether the chains still running can no longer change the winner.

    True when the leading outcome's weight exceeds the runner-up's (0 if there is none) plus
    `remaining`, the most weight the running chains could still add (see :func:`remaining_weight`);
    a possible tie is not decided. Pass raw weights: for "weighted", the member weights of the
    finished valid chains, not the counts of an all-zero fallback.
    """
    if not is_real(remaining) or math.isnan(remaining) or remaining < 0:
        raise ValueError(f"remaining must be a number >= 0, got {remaining!r}")
    values = sorted(_check_weights(weights, "weights").values(), reverse=True)
    leading = values[0] if values else 0.0
    runner_up = values[1] if len(values) > 1 else 0.0
    return leading > runner_up + remaining


def remaining_weight(
    pending_members: Sequence[str], rule: str, member_weights: Mapping[str, float] | None = None
) -> float:
    """The most weight the pending chains (one entry per running chain: its member) can add under `rule`.

    "majority": one per chain; "weighted": the sum of their members' weights (missing -> 1.0);
    "cross": infinity, since jurors re-weigh every outcome (so :func:`decided` never stops early).
    """
    registered = get_vote_rule(rule)
    weights = _check_weights({} if member_weights is None else member_weights, "member_weights")
    if isinstance(pending_members, str):
        raise TypeError("pending_members must be a sequence of member names, not a single string")
    return registered.remaining(pending_members, weights)
