"""Routing-only evolution (trainer/calibration/routing.py): the table's weights evolve, the members stay
frozen. Pure logic on fixed chains; calibrate runs it on the real engine in tests/test_calibration_e2e.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ensemble_serve.shared.population.reliability import ReliabilityTable
from ensemble_serve.shared.voting import candidate_from_text
from trainer.calibration.command import CalibrateConfig
from trainer.calibration.routing import evolve_routing, halves, vote_accuracy
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
