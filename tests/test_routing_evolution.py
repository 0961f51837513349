"""Routing-only evolution (trainer/calibration/routing.py): the table's weights evolve, the members stay
frozen. Pure logic on fixed chains; calibrate runs it on the real engine in tests/test_calibration_e2e.py."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from ensemble_serve.shared.population.reliability import ReliabilityTable
from ensemble_serve.shared.voting import candidate_from_text
from trainer.calibration.command import CalibrateConfig
from trainer.calibration.routing import GateChoice, evolve_routing, halves, vote_accuracy
from trainer.tasks.sandbox import Problem


def _chain(member: str, answer: str):
    return candidate_from_text(member, 0, f"#### {answer}", 3, "auto")


def _twins_outvote_the_expert(n: int = 200):
    """Member a is wrong on every 5th problem; b and c are wrong together, with the same wrong answer,
    on 3 of every 10 others. b and c look good alone (p 0.7) and outvote a (p 0.8) when both are wrong."""
    problems = [Problem(f"add {i}+{i}", str(2 * i), None, "add", 1) for i in range(n)]
    cands = {"a": [], "b": [], "c": []}
    for i, p in enumerate(problems):
        a_wrong = i % 5 == 0
        twins_wrong = not a_wrong and i % 10 in (1, 2, 3)
        cands["a"].append(_chain("a", "x" if a_wrong else p.answer))
        for m in ("b", "c"):
            cands[m].append(_chain(m, "y" if twins_wrong else p.answer))
    return problems, cands


def test_halves_split_every_problem_once_and_the_same_way_every_time():
    problems, _ = _twins_outvote_the_expert()
    fit, check = halves(problems)
    assert sorted(fit + check) == list(range(len(problems))) and fit and check
    assert halves(problems) == (fit, check)


def test_evolution_learns_that_the_twins_are_one_voice():
    problems, cands = _twins_outvote_the_expert()
    start = {"add": {"a": 0.8, "b": 0.7, "c": 0.7}}
    every = list(range(len(problems)))
    assert vote_accuracy(problems, cands, start, every) == pytest.approx(0.7)  # the twins win: wrong on 30%

    result = evolve_routing(problems, cands, start, generations=15, size=12, sigma=0.5, seed=3)
    assert result.check_accuracy["start"] < result.check_accuracy["evolved"] and result.kept
    assert vote_accuracy(problems, cands, result.p, every) == pytest.approx(0.8)  # the expert wins
    assert result.best_per_generation == sorted(result.best_per_generation)  # elitism: never worse
    again = evolve_routing(problems, cands, start, generations=15, size=12, sigma=0.5, seed=3)
    assert again == result  # deterministic
    ReliabilityTable.model_validate(  # the evolved p are a valid table
        {
            "base_model": "b",
            "members": ["a", "b", "c"],
            "method": "evolved",
            "domains": {d: {m: {"p": p, "n": 200} for m, p in row.items()} for d, row in result.p.items()},
            "overall": {m: {"p": 0.5, "n": 200} for m in "abc"},
        }
    )


def test_a_table_that_cannot_be_beaten_is_not_kept():
    problems = [Problem(f"add {i}+1", str(i + 1), None, "add", 1) for i in range(40)]
    cands = {m: [_chain(m, p.answer) for p in problems] for m in ("a", "b")}  # always right together
    result = evolve_routing(problems, cands, {"add": {"a": 0.9, "b": 0.9}}, generations=3, seed=0)
    assert result.check_accuracy == {"start": 1.0, "evolved": 1.0} and not result.kept


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"routing_generations": 5, "labels": "hidden"}, "needs labels: ground_truth"),
        ({"routing_generations": -1}, "routing_generations"),
        ({"routing_population": 3}, "routing_population"),
        ({"routing_sigma": 0}, "routing_sigma"),
        ({"routing_sigma": float("inf")}, "routing_sigma"),
        ({"routing_gates": True}, "set routing_generations too"),
    ],
)
def test_bad_routing_settings_are_refused_when_the_config_is_read(settings, message):
    with pytest.raises(ValidationError, match=message):
        CalibrateConfig(**settings)


def test_too_small_a_search_is_refused():
    problems, cands = _twins_outvote_the_expert(20)
    with pytest.raises(ValueError, match="at least 1 generation"):
        evolve_routing(problems, cands, {"add": {"a": 0.8, "b": 0.7, "c": 0.7}}, generations=0)


def test_held_out_calibration_problems_fall_in_both_halves():
    """The sandbox's held-out split is a function of the prompt's sha256: the halves must not be."""
    from trainer.calibration.command import calibration_problems

    fit, check = halves(calibration_problems(CalibrateConfig(per_domain=4)))
    assert len(fit) > 30 and len(check) > 30


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def test_evolution_moves_the_router_to_the_expert():
    """The router sends every prompt to twin b alone (k = 1): no table can fix a vote of one. The router's
    offsets evolve with the table, and the routed vote learns to ask the expert a instead."""
    problems, cands = _twins_outvote_the_expert()
    logits = np.tile([0.0, 1.0, 0.5], (len(problems), 1))  # b, then c, then a
    router = GateChoice(logits=logits, gates=_sigmoid, k=1)
    assert router.chosen(list(cands)) == [["b"]] * len(problems)
    start = {"add": {"a": 0.8, "b": 0.7, "c": 0.7}}

    table_only = evolve_routing(problems, cands, start, generations=15, size=12, sigma=0.5, seed=3, router=None)
    assert table_only.offsets is None
    result = evolve_routing(problems, cands, start, generations=15, size=12, sigma=0.5, seed=3, router=router)
    assert result.check_accuracy["start"] == pytest.approx(0.7, abs=0.1) and result.kept
    a, b, c = result.offsets
    assert a > b + 1.0 and a > c + 0.5  # a's gate is now the largest
    every = list(range(len(problems)))
    assert vote_accuracy(problems, cands, result.p, every, router.chosen(list(cands), np.array(result.offsets))) == (
        pytest.approx(0.8)
    )
    again = evolve_routing(problems, cands, start, generations=15, size=12, sigma=0.5, seed=3, router=router)
    assert again == result  # deterministic


def test_gate_choice_takes_the_top_k_as_the_server_does():
    logits = np.array([[0.0, 2.0, 2.0], [1.0, 0.0, np.nan]])
    choice = GateChoice(logits=logits, gates=_sigmoid, k=2)
    # ties go to the lower index; a row whose gates are not finite is voted by every member (unrouted)
    assert choice.chosen(["a", "b", "c"]) == [["b", "c"], ["a", "b", "c"]]
    assert choice.chosen(["a", "b", "c"], np.array([3.0, 0.0, -1.0]))[0] == ["a", "b"]  # voters in slot order


@pytest.mark.parametrize(
    "logits, k, message",
    [
        (np.zeros((4, 3)), 3, "k=3 of 3 members"),
        (np.zeros((4, 3)), 0, "k=0 of 3 members"),
        (np.zeros(3), 1, "must be \\[problems, members\\]"),
    ],
)
def test_a_router_with_nothing_to_choose_is_refused(logits, k, message):
    with pytest.raises(ValueError, match=message):
        GateChoice(logits=logits, gates=_sigmoid, k=k)


def test_router_logits_of_another_shape_are_refused():
    problems, cands = _twins_outvote_the_expert(20)
    router = GateChoice(logits=np.zeros((19, 3)), gates=_sigmoid, k=1)
    with pytest.raises(ValueError, match="for 20 problems and 3 members"):
        evolve_routing(problems, cands, {"add": {"a": 0.8, "b": 0.7, "c": 0.7}}, generations=1, router=router)


def test_routing_gates_without_a_router_is_refused_before_the_engine_starts(tmp_path):
    """No router, a broken one, or a default request that names its members: refused with the reason before the
    engine is asked anything; nothing is written."""
    from ensemble_serve.shared.population import read_manifest, write_manifest
    from ensemble_serve.testing.servers import copy_embedded
    from trainer.calibration.command import run_calibrate

    pop = copy_embedded(tmp_path, as_shipped=True)
    cfg = CalibrateConfig(population=pop, per_domain=1, routing_generations=2, routing_gates=True)
    before = (pop / "reliability.json").read_bytes()
    manifest = read_manifest(pop)
    named = {**(manifest.ensemble_defaults or {}), "members": ["m00", "m01"]}  # a list bypasses the router
    write_manifest(pop, manifest.model_copy(update={"ensemble_defaults": named}))
    with pytest.raises(ValueError, match="names its members, so the router chooses none"):
        run_calibrate(cfg, engine=object())
    write_manifest(pop, manifest)
    (pop / "router" / "router.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="the population's router cannot be used"):
        run_calibrate(cfg, engine=object())  # never reached: the router is checked first
    write_manifest(pop, manifest.model_copy(update={"router": None}))
    with pytest.raises(ValueError, match="this population has none"):
        run_calibrate(cfg, engine=object())
    assert (pop / "reliability.json").read_bytes() == before
