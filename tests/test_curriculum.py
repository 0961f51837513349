"""The curriculum's pure parts: proposers on scripted probes, back-off, peer labels, the label audit,
niche-aware selection and the epoch cap. Nothing here starts vLLM (the end-to-end runs are in
tests/test_curriculum_e2e.py).

A scripted probe answers every problem of a cell with chains whose agreement (and, where it
matters, correctness) the test sets, so each proposer decision is checked exactly.
"""

from __future__ import annotations

import dataclasses

import pytest
from lora_factories import make_lora
from pydantic import ValidationError

from ensemble_serve.shared.voting import candidate_from_text
from trainer.evolve.audit import label_audit
from trainer.evolve.calls import train_steps
from trainer.evolve.config import BackoffConfig, EvolveConfig
from trainer.evolve.curriculum import (
    PROPOSERS,
    CellStats,
    ProposerContext,
    after_self_play,
    backoff_signal,
    cell_stats,
    register_proposer,
)
from trainer.evolve.fitness import Evidence
from trainer.evolve.labels import labellers, member_labels, training_examples
from trainer.evolve.step import evolutionary_step, niche_keepers, niche_pool
from trainer.tasks.sandbox import Problem

DOMAINS = ("add", "sub")
LADDER = (1, 2, 3, 4)


def chains(answers: list[str | None], length: int = 10) -> list:
    """Candidates with these answers (None: a chain without one), each `length` tokens."""
    return [
        candidate_from_text("m", i, f"work\n#### {a}" if a is not None else "no idea", length, "auto")
        for i, a in enumerate(answers)
    ]


def agreeing(share: float, n: int = 10) -> list:
    """n chains, `share` of them on answer "1", the others each different."""
    k = round(share * n)
    return chains(["1"] * k + [str(100 + i) for i in range(n - k)])


def scripted(scores: dict[tuple[str, int], float], seen: list | None = None):
    """A probe that gives every problem of cell (domain, level) chains agreeing at the scripted share."""

    def probe(problems):
        if seen is not None:
            seen.extend(problems)
        return [agreeing(scores.get((p.domain, p.difficulty), 0.5)) for p in problems]

    return probe


def ctx(scores, state=None, visible=False, seen=None, **kw) -> ProposerContext:
    settings = dict(
        generation=1,
        seed=0,
        n_problems=20,
        domains=DOMAINS,
        ladder=LADDER,
        start_level=2,
        low=0.2,
        high=0.8,
        probe_problems=2,
        replay=0.2,
        labels_visible=visible,
        state=state or {},
        probe=scripted(scores, seen),
    )
    settings.update(kw)
    return ProposerContext(**settings)


# --------------------------------------------------------------------------- the frontier proposer


def test_frontier_practises_learnable_levels_and_moves_one_level_at_a_time():
    scores = {("add", 1): 1.0, ("add", 2): 0.5, ("add", 3): 0.1, ("sub", 1): 1.0, ("sub", 2): 0.9, ("sub", 3): 0.6}
    seen: list = []
    plan = PROPOSERS["frontier"](ctx(scores, seen=seen))
    assert plan.skipped is None
    # add: level 2 is learnable, so it stays; sub: level 2 is mastered, so it moves up to 3 (learnable)
    assert plan.cells == [("add", 2), ("sub", 3)]
    assert plan.state["levels"] == {"add": 2, "sub": 3}
    assert any("sub: level 2 mastered" in e for e in plan.events)
    # probed: each domain's level and its neighbours, never two levels away
    assert {(p.domain, p.difficulty) for p in seen} == {(d, lv) for d in DOMAINS for lv in (1, 2, 3)}
    # 20 problems: 4 replay from mastered levels below the frontier, the rest split over the cells
    assert plan.replay == 4 and len(plan.problems) == 20
    practised = [(p.domain, p.difficulty) for p in plan.problems]
    assert practised.count(("add", 2)) == 8 and practised.count(("sub", 3)) == 8
    assert {c for c in practised if c not in plan.cells} <= {("add", 1), ("sub", 1), ("sub", 2)}
    assert plan.probe["add:2"]["score"] == 0.5


def test_frontier_steps_down_from_a_level_that_is_too_hard():
    scores = {("add", 1): 0.5, ("add", 2): 0.1, ("add", 3): 0.0, ("sub", 2): 0.5}
    plan = PROPOSERS["frontier"](ctx(scores))
    assert ("add", 1) in plan.cells and plan.state["levels"]["add"] == 1
    assert any("add: level 2 too hard" in e for e in plan.events)


def test_hidden_labels_plan_carries_no_answers_and_scores_by_agreement():
    scores = {(d, lv): 0.5 for d in DOMAINS for lv in LADDER}
    seen: list = []
    plan = PROPOSERS["frontier"](ctx(scores, seen=seen))
    assert all(p.answer is None and p.chain is None for p in plan.problems + seen)
    assert all("solve_rate" not in v for v in plan.probe.values())
    # the audit's answers exist, kept apart from the batch
    assert len(plan.truth) == len(plan.problems) and all(t is not None for t in plan.truth)


def test_visible_labels_score_by_the_consensus_solve_rate():
    # the chains agree on "1" at 0.5; with answers visible the score is whether "1" is the answer
    plan = PROPOSERS["frontier"](ctx({}, visible=True))
    assert all(v["solve_rate"] == 0.0 and v["score"] == 0.0 for v in plan.probe.values())
    assert plan.skipped is not None  # nothing solved: nothing learnable


def test_no_learnable_cell_skips_with_a_clear_message():
    plan = PROPOSERS["frontier"](ctx({}, low=0.999, high=1.0))
    assert plan.cells == [] and plan.problems == []
    assert plan.skipped.startswith("no learnable cell")
    assert "low (0.999)" in plan.skipped and "add:2 0.50" in plan.skipped


def test_a_cooling_domain_does_not_climb():
    scores = {("add", 2): 1.0, ("add", 3): 0.5, ("sub", 2): 0.5}
    plan = PROPOSERS["frontier"](ctx(scores, state={"levels": {"add": 2}, "cooldown": {"add": 1}}))
    assert ("add", 3) not in plan.cells and plan.state["levels"]["add"] == 2
    assert plan.state["cooldown"]["add"] == 0  # one generation waited


def test_a_state_off_the_ladder_is_refused():
    with pytest.raises(ValueError, match="not on the ladder"):
        PROPOSERS["frontier"](ctx({}, state={"levels": {"add": 9}}))


def test_the_same_generation_plans_the_same_problems():
    scores = {(d, lv): 0.5 for d in DOMAINS for lv in LADDER}
    a = PROPOSERS["frontier"](ctx(scores))
    b = PROPOSERS["frontier"](ctx(scores))
    assert [p.prompt for p in a.problems] == [p.prompt for p in b.problems]
    c = PROPOSERS["frontier"](ctx(scores, generation=2))
    assert [p.prompt for p in a.problems] != [p.prompt for p in c.problems]


# --------------------------------------------------------------------------- the agreement proposer


def test_agreement_proposer_runs_on_a_dataset_without_levels_or_answers():
    rows = [Problem(f"question {i}?", None, None, "user", 0) for i in range(40)]
    shares = {r.prompt: (0.5 if i % 2 else 1.0) for i, r in enumerate(rows)}

    def probe(problems):
        return [agreeing(shares[p.prompt]) for p in problems]

    plan = PROPOSERS["agreement"](ctx({}, dataset=rows, probe=probe, n_problems=10, probe_problems=4))
    assert plan.cells == [("all", 0)] and plan.skipped is None
    learnable = [p for p in plan.problems if shares[p.prompt] == 0.5]
    assert len(learnable) == 8 and plan.replay == 2 and len(plan.problems) == 10
    assert plan.truth == [None] * 10
    assert plan.probe["all:0"]["learnable"] == 20 and plan.probe["all:0"]["mastered"] == 20


def test_agreement_proposer_skips_when_no_row_is_learnable():
    rows = [Problem(f"q{i}", None, None, "user", 0) for i in range(8)]
    plan = PROPOSERS["agreement"](ctx({}, dataset=rows, probe=lambda ps: [agreeing(1.0) for _ in ps]))
    assert plan.skipped.startswith("no learnable problem") and plan.problems == []


def test_a_user_proposer_plugs_in_by_name():
    @register_proposer("easiest-first")
    def easiest(c):
        return PROPOSERS["agreement"](c)

    try:
        cfg = EvolveConfig(curriculum={"enabled": True, "proposer": "easiest-first"})
        assert cfg.curriculum.proposer == "easiest-first"
    finally:
        del PROPOSERS["easiest-first"]
    with pytest.raises(ValidationError, match="unknown proposer 'easiest-first'"):
        EvolveConfig(curriculum={"enabled": True, "proposer": "easiest-first"})


# --------------------------------------------------------------------------- signals and back-off


def test_cell_stats_measure_agreement_margin_and_length():
    p = Problem("q", "1", None, "add", 2)
    s = cell_stats([p, p], [chains(["1", "1", "1", "2"], 8), chains(["3", "4", None, None], 12)], labels_visible=True)
    assert s.problems == 2
    assert s.agreement == pytest.approx((0.75 + 0.25) / 2)
    assert s.margin == pytest.approx((0.5 + 0.0) / 2)
    assert s.length == pytest.approx(10)
    assert s.solve_rate == 0.5
    hidden = cell_stats([p], [chains(["1"])], labels_visible=False)
    assert hidden.solve_rate is None


@pytest.mark.parametrize(
    "now, reason",
    [
        (CellStats(4, 0.50, 0.40, 20.0), "agreement fell"),
        (CellStats(4, 0.70, 0.10, 20.0), "margin fell"),
        (CellStats(4, 0.70, 0.40, 40.0), "chain length drifted"),
        (CellStats(4, 0.70, 0.40, 21.0), None),
    ],
)
def test_backoff_signal(now, reason):
    before = {"agreement": 0.75, "margin": 0.45, "length": 20.0}
    got = backoff_signal(before, now, 0.15, 0.2, 0.5)
    assert (got is None) if reason is None else got.startswith(reason)


def test_a_collapse_of_the_label_free_signals_backs_off():
    scores = {(d, lv): 0.5 for d in DOMAINS for lv in LADDER}
    plan = PROPOSERS["frontier"](ctx(scores, state={"levels": {"add": 3, "sub": 2}}))
    plan.state["last"]["add:3"] = {"problems": 8, "agreement": 0.9, "margin": 0.8, "length": 30.0}
    rows = [agreeing(0.3) if p.domain == "add" else agreeing(0.5) for p in plan.problems]
    entry = after_self_play(plan, rows, BackoffConfig(cooldown=2), LADDER)
    assert entry["signals"]["add:3"]["backoff"].startswith("agreement fell 0.90 -> 0.30")
    assert "backoff" not in entry["signals"]["sub:2"]  # no earlier generation to compare with
    assert plan.state["levels"]["add"] == 2 and plan.state["cooldown"]["add"] == 2
    assert any(e.startswith("add: back off from level 3") for e in entry["events"])
    assert plan.state["last"]["sub:2"]["agreement"] == 0.5  # remembered for the next generation


# --------------------------------------------------------------------------- peer labels


def _evidence(answers: dict[str, list[str | None]], domains: list[str]) -> Evidence:
    problems = [Problem(f"q{i}", None, None, d, 3) for i, d in enumerate(domains)]
    cands = {m: [chains([a]) for a in row] for m, row in answers.items()}
    return Evidence(members=list(answers), problems=problems, candidates=cands, labels_visible=False)


HIDDEN = dict(labels="hidden", fitness={"consensus": 1.0})


def test_leave_self_out_labels_ignore_the_members_own_chains():
    ev = _evidence({"a": ["1", "5"], "b": ["2", "5"], "c": ["2", "6"]}, ["add", "add"])
    cfg = EvolveConfig(**HIDDEN, label_rule="leave_self_out", min_agreement=0.6)
    labels = member_labels(ev, cfg)
    assert labels["a"] == ["2", None]  # b and c agree on 2; on problem 2 they split 5/6
    assert labels["b"] == [None, None]  # a and c split
    assert labels["c"] == [None, "5"]
    examples = training_examples(ev, labels, cfg.model_copy(update={"share_chains": False}))
    assert examples == {"a": [], "b": [], "c": []}  # nobody's own chain matches its peers' label


def test_niche_peers_label_their_domain():
    focus = {"a": "add", "b": "add", "c": "sub", "d": "sub"}
    ev = _evidence({"a": ["1"], "b": ["1"], "c": ["9"], "d": ["9"]}, ["add"])
    cfg = EvolveConfig(**HIDDEN, label_rule="leave_self_out", label_peers="niche", min_agreement=0.7)
    assert labellers(ev.problems, ev.members, cfg, focus) == [["a", "b"]]
    labels = member_labels(ev, cfg, focus)
    # the add members label each other; the sub members are labelled by the add members, not by each other
    assert labels == {"a": ["1"], "b": ["1"], "c": ["1"], "d": ["1"]}
    # without niche peers c's peers (a, b, d) agree at 2 of 3, below the threshold
    assert member_labels(ev, cfg.model_copy(update={"label_peers": "all"}), focus)["c"] == [None]


def test_every_label_below_the_threshold_gives_no_examples():
    ev = _evidence({"a": ["1", "2"], "b": ["3", "4"], "c": ["5", "6"]}, ["add", "sub"])
    cfg = EvolveConfig(**HIDDEN, label_rule="leave_self_out", min_agreement=0.6)
    labels = member_labels(ev, cfg)
    assert all(lab is None for row in labels.values() for lab in row)
    assert training_examples(ev, labels, cfg) == {"a": [], "b": [], "c": []}


def test_niche_sharing_keeps_each_specialist_to_its_domain():
    focus = {"a": "add", "b": "add", "c": "sub", "d": None}
    ev = _evidence({"a": ["1", "7"], "b": ["1", "7"], "c": ["2", "7"], "d": ["1", "7"]}, ["add", "sub"])
    for m in ev.members:  # tell the chains apart by author
        ev.candidates[m] = [[dataclasses.replace(c, text=f"{m}: {c.text}") for c in row] for row in ev.candidates[m]]
    cfg = EvolveConfig(**HIDDEN, share_chains="niche")
    got = training_examples(ev, ["1", "7"], cfg, focus)
    authors = {m: sorted(text.split(":")[0] for _, text in ex) for m, ex in got.items()}
    assert authors["a"] == ["a", "b"] and authors["b"] == ["a", "b"]  # add only: its own and its peer's
    assert authors["c"] == ["c"]  # sub only: its own right chain (no sub peer)
    assert authors["d"] == ["a", "a", "b", "b", "c", "d", "d"]  # no niche: every verified chain


def test_length_filter_drops_truncated_and_long_chains():
    p = [Problem("q", None, None, "add", 1)]
    row = [
        candidate_from_text("a", 0, "w\n#### 1", 10, "auto"),
        candidate_from_text("a", 1, "ww\n#### 1", 12, "auto"),
        candidate_from_text("a", 2, "w w\n#### 1", 14, "auto"),
        candidate_from_text("a", 3, "www\n#### 1", 40, "auto"),  # 40 > 2 x the median 14
        candidate_from_text("a", 4, "wwww\n#### 1", 128, "auto"),  # cut off at max_tokens
    ]
    ev = Evidence(members=["a"], problems=p, candidates={"a": [row]}, labels_visible=False)
    cfg = EvolveConfig(**HIDDEN, max_length_ratio=2.0, max_tokens=128)
    assert len(training_examples(ev, ["1"], cfg)["a"]) == 3
    assert len(training_examples(ev, ["1"], cfg.model_copy(update={"max_length_ratio": None}))["a"]) == 5


def test_label_audit_reports_precision_and_recall_against_hidden_answers():
    ev = _evidence({"a": ["1", "5", "9"], "b": ["1", "6", "8"]}, ["add", "add", "sub"])
    labels = {"a": ["1", "5", None], "b": ["1", "6", None]}
    audit = label_audit(ev, labels, ["1", "6", "9"])
    # 6 pairs; labelled 4; right 3 (1, 1, 6); reachable: every pair (each answer was reached by some chain)
    assert audit["pairs"] == 6 and audit["labelled"] == 4
    assert audit["precision"] == 0.75 and audit["recall"] == 0.5 and audit["coverage"] == pytest.approx(0.6667)
    assert audit["cells"]["sub:3"]["precision"] is None
    assert label_audit(ev, labels, [None, None, None]) is None  # no answers: nothing to report
    # truth labels where no chain reached the answer (the verifier arm) do not count toward recall
    verifier = label_audit(ev, {"a": ["1", "6", "7"], "b": ["1", "6", "7"]}, ["1", "6", "7"])
    assert verifier["precision"] == 1.0 and verifier["recall"] == 1.0


# --------------------------------------------------------------------------- niches in selection, epochs


def test_niche_keepers_and_pools():
    names = ["a", "b", "c", "d", "e"]
    fit = [0.1, 0.5, 0.9, 0.2, 0.3]
    niches = {"a": "add", "b": "add", "c": "sub", "d": "sub", "e": None}
    assert niche_keepers(names, fit, niches) == [1, 2]
    assert niche_pool(names, 0, niches) == [0, 1]  # a's slot is refilled from the add niche
    assert niche_pool(names, 4, niches) == [0, 1, 2, 3, 4]  # no niche: anyone


def test_niche_selection_keeps_every_niches_best():
    names = ["a", "b", "c", "d"]
    weights = {n: make_lora(4, seed=i) for i, n in enumerate(names)}
    fitness = {"a": 0.1, "b": 0.2, "c": 0.9, "d": 0.8}  # the add niche (a, b) is the weakest
    niches = {"a": "add", "b": "add", "c": "sub", "d": "sub"}
    cfg = EvolveConfig(evolution={"elite": 1, "offspring": 2, "crossover": "weighted_average", "mutation": "none"})
    elite, replaced, children = evolutionary_step(names, weights, fitness, cfg, 1)
    assert sorted(replaced) == [0, 1]  # without niches both add members go
    elite, replaced, children = evolutionary_step(names, weights, fitness, cfg, 1, niches=niches)
    assert 1 in elite and 2 in elite  # the best of each niche stays
    assert sorted(replaced) == [0, 3]
    for slot, child in zip(replaced, children):
        assert set(child.parents) <= {n for n in names if niches[n] == niches[names[slot]]}


def test_train_epochs_caps_the_steps():
    cfg = EvolveConfig(train_steps=16, train_batch_size=8, train_epochs=2)
    assert train_steps(cfg, 20) == 5 and train_steps(cfg, 200) == 16 and train_steps(cfg, 0) == 0
    assert train_steps(cfg.model_copy(update={"train_epochs": None}), 20) == 16


# --------------------------------------------------------------------------- config refusals


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"curriculum": {"enabled": True, "low": 0.8, "high": 0.2}}, "leave nothing learnable"),
        ({"curriculum": {"enabled": True, "low": 0.5, "high": 0.5}}, "leave nothing learnable"),
        ({"curriculum": {"enabled": True, "proposer": "nope"}}, "unknown proposer"),
        ({"curriculum": {"enabled": True, "start_level": 7}}, "start_level 7 is not one of"),
        ({"curriculum": {"enabled": True}, "data": "x.jsonl"}, "use curriculum.proposer: agreement"),
        ({"curriculum": {"enabled": True, "replay": 1.0}}, "replay"),
        ({"curriculum": {"enabled": True, "backoff": {"agreement_drop": 0}}}, "agreement_drop"),
        ({"label_rule": "majority"}, "label_rule"),
        ({"label_peers": "some"}, "label_peers"),
        ({"share_chains": "everyone"}, "share_chains"),
        ({"max_length_ratio": 0.5}, "max_length_ratio"),
        ({"train_epochs": 0}, "train_epochs"),
        ({"temperature": 50.0}, "temperature"),
    ],
)
def test_bad_curriculum_settings_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        EvolveConfig(**settings)


def test_plan_problems_are_frozen_copies():
    scores = {(d, lv): 0.5 for d in DOMAINS for lv in LADDER}
    plan = PROPOSERS["frontier"](ctx(scores))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.problems[0].answer = "1"  # type: ignore[misc]


def test_a_niche_of_one_is_labelled_by_everyone_else():
    focus = {"a": "add", "b": "sub", "c": "sub"}
    ev = _evidence({"a": ["4"], "b": ["4"], "c": ["4"]}, ["add"])
    cfg = EvolveConfig(**HIDDEN, label_rule="leave_self_out", label_peers="niche", min_agreement=0.6)
    labels = member_labels(ev, cfg, focus)
    assert labels == {"a": ["4"], "b": ["4"], "c": ["4"]}  # a by b and c; b and c by a


def test_expert_sharing_teaches_every_family_by_its_specialists():
    focus = {"a": "add", "c": "sub", "d": None}
    ev = _evidence({"a": ["1", "7"], "c": ["1", "7"], "d": ["1", "7"]}, ["add", "sub"])
    for m in ev.members:
        ev.candidates[m] = [[dataclasses.replace(c, text=f"{m}: {c.text}") for c in row] for row in ev.candidates[m]]
    got = training_examples(ev, ["1", "7"], EvolveConfig(**HIDDEN, share_chains="experts"), focus)
    authors = {m: sorted(text.split(":")[0] for _, text in ex) for m, ex in got.items()}
    assert authors["d"] == ["a", "c", "d", "d"]  # add from a, sub from c, and its own
    assert authors["a"] == ["a", "a", "c"]  # its own two, and sub from c (not d's chains)
