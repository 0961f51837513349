"""Voting: grouping, the three rules, tie-breaks, the winner chain and early stopping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ensemble_serve.shared.voting import (
    VOTE_RULES,
    Candidate,
    ExactGrouper,
    SemanticGrouper,
    VoteContext,
    VoteResult,
    candidate_from_text,
    decided,
    get_vote_rule,
    outcome_groups,
    remaining_weight,
    vote,
)


def ok(member: str, answer: str, sample: int = 0, lp: float | None = None) -> Candidate:
    return Candidate(member, sample, f"reasoning...\n#### {answer}", answer, "ok", 12, lp)


def bad(member: str, status: str, sample: int = 0) -> Candidate:
    return Candidate(member, sample, "no final answer", None, status, 7)


# --- majority ----------------------------------------------------------------


def test_majority_clear_winner():
    cands = [ok("a", "42"), ok("b", "42"), ok("c", "7"), ok("d", "42")]
    r = get_vote_rule("majority")(cands, VoteContext())
    assert r == VoteResult(
        answer="42",
        agreement=0.75,
        votes={"42": 3.0, "7": 1.0},
        groups=[[0, 1, 3], [2]],
        winner=0,
        excluded=[],
        rule="majority",
    )
    assert list(r.votes) == ["42", "7"]


def test_tie_goes_to_the_group_that_appears_first_and_votes_sort_by_answer():
    r = vote([ok("a", "B"), ok("b", "A")], "majority")
    assert (r.answer, r.agreement, r.winner) == ("B", 0.5, 0)
    assert r.votes == {"A": 1.0, "B": 1.0} and list(r.votes) == ["A", "B"]
    assert r.groups == [[1], [0]]
    flipped = vote([ok("b", "A"), ok("a", "B")], "majority")
    assert (flipped.answer, flipped.winner) == ("A", 0)
    assert [vote([ok("a", "B"), ok("b", "A")], "majority") for _ in range(3)] == [r, r, r]


def test_excluded_candidates_are_reported_and_not_counted():
    cands = [
        candidate_from_text("a", 0, "so\n#### 5", 20, "marked"),
        candidate_from_text("b", 0, "I am not sure.", 9, "marked"),
        candidate_from_text("c", 0, "x\n#### 5", 4, "marked"),
        candidate_from_text("d", 0, "x\n####   \n", 4, "marked"),
        bad("e", "failed"),
        candidate_from_text("f", 0, "x\n#### 6", 4, "marked"),
    ]
    assert [c.status for c in cands] == ["ok", "missing", "ok", "malformed", "failed", "ok"]
    r = vote(cands, "majority")
    assert r.answer == "5"
    assert r.agreement == 2 / 3
    assert r.votes == {"5": 2.0, "6": 1.0}
    assert r.groups == [[0, 2], [5]]
    assert r.excluded == [1, 3, 4]
    assert r.winner == 0


@pytest.mark.parametrize("rule", ["majority", "weighted", "cross"])
def test_no_valid_candidate(rule):
    cands = [bad("a", "missing"), bad("b", "malformed"), bad("c", "failed")]
    ctx = VoteContext(member_weights={"a": 2.0}, cross_scores={"j": []})
    r = get_vote_rule(rule)(cands, ctx)
    assert r == VoteResult(None, 0.0, {}, [], None, [0, 1, 2], rule)
    assert vote([], rule, ctx) == VoteResult(None, 0.0, {}, [], None, [], rule)


# --- weighted -----------------------------------------------------------------


def test_weighted_changes_the_winner():
    cands = [ok("a", "1"), ok("b", "1"), ok("c", "2")]
    ctx = VoteContext(member_weights={"a": 1.0, "c": 3.0})  # b is not listed: weight 1.0
    assert vote(cands, "majority", ctx).answer == "1"
    r = vote(cands, "weighted", ctx)
    assert r == VoteResult("2", 0.6, {"2": 3.0, "1": 2.0}, [[2], [0, 1]], 2, [], "weighted")


def test_weighted_all_zero_weights_falls_back_to_one_each():
    cands = [ok("a", "x"), ok("b", "y"), ok("c", "y"), bad("d", "failed")]
    ctx = VoteContext(member_weights={"a": 0.0, "b": 0, "c": 0.0, "d": 5.0})
    r = vote(cands, "weighted", ctx)
    assert r == VoteResult("y", 2 / 3, {"y": 2.0, "x": 1.0}, [[1, 2], [0]], 1, [3], "weighted")


def test_weighted_some_zero_weights_count_zero():
    r = vote([ok("a", "x"), ok("b", "y")], "weighted", VoteContext(member_weights={"a": 0.0}))
    assert (r.answer, r.agreement, r.votes, r.winner) == ("y", 1.0, {"y": 1.0, "x": 0.0}, 1)


@pytest.mark.parametrize("w", [-1.0, math.nan, math.inf, "2", True])
def test_member_weights_must_be_finite_and_non_negative(w):
    with pytest.raises(ValueError, match="member_weights must be finite numbers >= 0; bad: \\['a'\\]"):
        VoteContext(member_weights={"a": w, "b": 1.0})


# --- cross ----------------------------------------------------------------------


def test_cross_averages_jurors_softmax():
    # Groups in first-appearance order: "10" (a, b, c), then "20" (d).
    cands = [ok("a", "10"), ok("b", "10"), ok("c", "10"), ok("d", "20")]
    # j1: softmax([0, ln 9]) = [1/10, 9/10]; j2: softmax([ln 2, ln 6]) = [2/8, 6/8] = [1/4, 3/4].
    scores = {"j1": [0.0, math.log(9)], "j2": [math.log(2), math.log(6)]}
    r = vote(cands, "cross", VoteContext(cross_scores=scores))
    # "20": (0.9 + 0.75) / 2 = 0.825; "10": (0.1 + 0.25) / 2 = 0.175 -- overturns the 3-to-1 majority.
    assert r.answer == "20"
    assert r.rule == "cross"
    assert list(r.votes) == ["20", "10"]
    assert r.votes["20"] == pytest.approx(0.825, abs=1e-12)
    assert r.votes["10"] == pytest.approx(0.175, abs=1e-12)
    assert math.fsum(r.votes.values()) == pytest.approx(1.0, abs=1e-12)
    assert r.agreement == pytest.approx(0.825, abs=1e-12)
    assert r.groups == [[3], [0, 1, 2]]
    assert r.winner == 3


def test_cross_three_groups_by_hand():
    cands = [ok("a", "A"), ok("b", "B"), ok("c", "C"), ok("d", "B")]
    # One juror, scores ln(1), ln(2), ln(5): probabilities 1/8, 2/8, 5/8.
    r = vote(cands, "cross", VoteContext(cross_scores={"a": [0.0, math.log(2), math.log(5)]}))
    assert r.answer == "C"
    assert [round(v, 12) for v in r.votes.values()] == [0.625, 0.25, 0.125]
    assert list(r.votes) == ["C", "B", "A"]
    assert r.groups == [[2], [1, 3], [0]]


def test_cross_skips_non_finite_jurors():
    cands = [ok("a", "10"), ok("b", "20")]
    good = {"j1": [math.log(3), 0.0]}  # [3/4, 1/4]
    noisy = {**good, "j2": [math.nan, 0.0], "j3": [0.0, math.inf], "j4": [-math.inf, 0.0]}
    r_good = vote(cands, "cross", VoteContext(cross_scores=good))
    r_noisy = vote(cands, "cross", VoteContext(cross_scores=noisy))
    assert r_noisy == r_good
    assert r_good.answer == "10"
    assert r_good.votes["10"] == pytest.approx(0.75, abs=1e-12)
    assert r_good.votes["20"] == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("scores", [{}, {"j": [math.nan, 1.0]}])
def test_cross_without_usable_jurors_falls_back_to_majority(scores):
    cands = [ok("a", "1"), ok("b", "2"), ok("c", "2")]
    r = vote(cands, "cross", VoteContext(cross_scores=scores))
    assert r == VoteResult("2", 2 / 3, {"2": 2.0, "1": 1.0}, [[1, 2], [0]], 1, [], "cross->majority")


def test_cross_needs_scores():
    with pytest.raises(ValueError, match="^cross vote needs cross_scores$"):
        vote([ok("a", "1")], "cross", VoteContext())


def test_cross_scores_must_match_the_groups():
    with pytest.raises(ValueError, match="juror 'j' has 3 cross scores for 2 outcome groups"):
        vote([ok("a", "1"), ok("b", "2")], "cross", VoteContext(cross_scores={"j": [0.0, 0.0, 0.0]}))
    with pytest.raises(ValueError, match="must be a sequence of numbers"):
        VoteContext(cross_scores={"j": "01"})


# --- registry ------------------------------------------------------------------------


def test_unknown_rule():
    assert list(VOTE_RULES) == ["majority", "weighted", "cross", "calibrated"]
    with pytest.raises(ValueError, match="unknown vote rule 'plurality'; valid rules: majority, weighted, cross"):
        get_vote_rule("plurality")
    with pytest.raises(ValueError, match="unknown vote rule 'borda'"):
        remaining_weight(["a"], "borda", {})


# --- the winner chain ---------------------------------------------------------------


def test_winner_chain_prefers_highest_mean_logprob_then_member_order():
    cands = [
        ok("a", "7", 0, lp=-0.5),
        ok("a", "7", 1, lp=-0.2),
        ok("b", "7", 0, lp=None),
        ok("b", "7", 1, lp=-0.2),
        ok("c", "8", 0, lp=-0.01),
    ]
    assert vote(cands, "majority").winner == 1  # -0.2 ties between a/1 and b/1: member a appears first
    # Weighted: the heaviest member first, then its best logprob.
    assert vote(cands, "weighted", VoteContext(member_weights={"b": 2.0})).winner == 3
    assert vote(cands, "weighted", VoteContext(member_weights={"b": 2.0, "a": 2.0})).winner == 1


def test_winner_chain_without_logprobs_is_first_member_lowest_sample():
    cands = [ok("b", "9", 1), ok("a", "9", 0), ok("b", "9", 0), ok("a", "1", 3)]
    r = vote(cands, "majority")
    assert (r.answer, r.winner) == ("9", 2)  # member b appears first; its sample 0


# --- grouping -----------------------------------------------------------------------


def test_numbers_group_numerically():
    cands = [ok("a", "42.0"), ok("b", "42"), ok("c", "42"), ok("d", "+42"), ok("e", "4.2")]
    groups, reps = outcome_groups(cands, ExactGrouper())
    assert groups == [[0, 1, 2, 3], [4]]
    assert reps == ["42", "4.2"]  # the most frequent spelling
    r = vote(cands, "majority")
    assert (r.answer, r.votes, r.agreement) == ("42", {"42": 4.0, "4.2": 1.0}, 0.8)


def test_representative_ties_go_to_first_seen():
    assert outcome_groups([ok("a", "42.0"), ok("b", "42")])[1] == ["42.0"]
    assert outcome_groups([ok("a", "Paris."), ok("b", "Paris")]) == ([[0, 1]], ["Paris."])


def test_outcome_groups_are_in_first_appearance_order():
    cands = [bad("x", "failed"), ok("a", "B"), ok("b", "A"), ok("c", "A"), ok("d", "C")]
    assert outcome_groups(cands, ExactGrouper()) == ([[1], [2, 3], [4]], ["B", "A", "C"])
    assert outcome_groups([bad("x", "missing")]) == ([], [])


class _IdGrouper:
    def __init__(self, ids):
        self.ids = ids

    def group(self, answers):
        return list(self.ids)


def test_custom_grouper_ids_are_renumbered_and_checked():
    cands = [ok("a", "p"), ok("b", "q"), ok("c", "r")]
    ctx = VoteContext(grouper=_IdGrouper([7, 3, 7]))
    assert vote(cands, "majority", ctx).groups == [[0, 2], [1]]
    with pytest.raises(ValueError, match="the grouper returned 2 group ids for 3 answers"):
        vote(cands, "majority", VoteContext(grouper=_IdGrouper([0, 1])))


class _TableEmbedder:
    """Fixed 2-D unit vectors at the given angles (degrees); records what it was asked."""

    def __init__(self, angles: dict[str, float]):
        self.angles = angles
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        rad = [math.radians(self.angles[t]) for t in texts]
        return np.array([[math.cos(r), math.sin(r)] for r in rad], dtype=np.float32)


def test_semantic_grouper_compares_with_each_groups_first_answer():
    # cos 25 deg = 0.906 (same group at 0.8), cos 50 deg = 0.643 (not).
    emb = _TableEmbedder({"A": 0.0, "B": 25.0, "C": 50.0, "D": 90.0})
    grouper = SemanticGrouper(emb, threshold=0.8)
    assert grouper.group(["A", "B", "C", "A.", "D", "C"]) == [0, 0, 1, 0, 2, 1]
    assert emb.calls == [["A", "B", "C", "D"]]  # normalized, de-duplicated
    assert SemanticGrouper(emb, threshold=0.95).group(["A", "B"]) == [0, 1]
    assert grouper.group([]) == []


def test_semantic_grouper_exact_answers_share_a_group_at_any_threshold():
    emb = _TableEmbedder({"x": 0.0, "y": 1.0})
    assert SemanticGrouper(emb, threshold=1.0).group(["x", "y", "x ", "y"]) == [0, 1, 0, 1]


@pytest.mark.parametrize("t", [1.5, -2.0, math.nan, "0.8"])
def test_semantic_grouper_threshold_checked(t):
    with pytest.raises(ValueError, match="threshold must be a number in \\[-1, 1\\]"):
        SemanticGrouper(_TableEmbedder({}), threshold=t)


# --- early stopping ------------------------------------------------------------------


def test_decided():
    assert decided({"a": 3.0, "b": 1.0}, 1.0) is True
    assert decided({"a": 3.0, "b": 1.0}, 2.0) is False  # 3 > 1 + 2 fails: a tie is still possible
    assert decided({"b": 1.0, "a": 3.0, "c": 0.5}, 1.5) is True
    assert decided({"a": 2.0}, 1.0) is True
    assert decided({"a": 2.0}, 2.0) is False
    assert decided({}, 0.0) is False
    assert decided({"a": 0.825, "b": 0.175}, math.inf) is False
    with pytest.raises(ValueError, match="remaining must be a number >= 0"):
        decided({"a": 1.0}, -1.0)


def test_remaining_weight():
    pending = ["m1", "m1", "m2"]
    assert remaining_weight(pending, "majority", {"m1": 0.5}) == 3.0
    assert remaining_weight(pending, "weighted", {"m1": 0.5}) == 2.0
    assert remaining_weight(pending, "weighted", {"m1": 0.0, "m2": 0.0}) == 0.0
    assert remaining_weight([], "weighted", {}) == 0.0
    assert remaining_weight(pending, "cross", {}) == math.inf
    with pytest.raises(ValueError, match="member_weights must be finite numbers >= 0; bad: \\['m1'\\]"):
        remaining_weight(pending, "weighted", {"m1": -1.0})


def test_early_stop_agrees_with_the_final_vote():
    done = [ok("a", "5"), ok("b", "5"), ok("c", "5"), ok("d", "6")]
    ctx = VoteContext(member_weights={"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 1.0})
    partial = vote(done, "weighted", ctx)
    assert decided(partial.votes, remaining_weight(["e"], "weighted", ctx.member_weights)) is True
    for late in ("5", "6", "7"):
        assert vote([*done, ok("e", late)], "weighted", ctx).answer == "5"


# --- candidates -----------------------------------------------------------------------


def test_candidate_from_text():
    c = candidate_from_text("m0", 2, "3 * 411 = 1233, plus 1\n#### 1,234\n", 31, "marked", mean_logprob=-0.3)
    assert c == Candidate("m0", 2, "3 * 411 = 1233, plus 1\n#### 1,234\n", "1234", "ok", 31, -0.3)
    assert c.valid
    m = candidate_from_text("m0", 0, "no idea", 5, "auto")
    assert (m.answer, m.status, m.valid) == (None, "missing", False)


def test_candidate_checks_its_fields():
    with pytest.raises(ValueError, match="status 'ok' needs a non-empty answer"):
        Candidate("a", 0, "", None, "ok", 1)
    with pytest.raises(ValueError, match="unknown candidate status 'bogus'; valid statuses: ok, missing"):
        Candidate("a", 0, "", None, "bogus", 1)
    with pytest.raises(ValueError, match="status 'failed' must have answer None"):
        Candidate("a", 0, "", "1", "failed", 1)
    with pytest.raises(ValueError, match="tokens must be an integer >= 0"):
        Candidate("a", 0, "", "1", "ok", -1)
    with pytest.raises(ValueError, match="mean_logprob must be a number"):
        Candidate("a", 0, "", "1", "ok", 1, math.nan)
