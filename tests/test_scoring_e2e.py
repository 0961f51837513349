"""End to end on one real vLLM engine: `eval`, evolve's held-out evaluation, `router` and `calibrate` share it.

The module starts one engine on the tiny population's base model and hands it to each command
(``engine=``): `eval` and evolve's held-out evaluation give the same figures on the same members and
problems, and the router and calibrate commands run on the same engine, which is still serving
after all of them (a command never drops a caller's engine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_population import copy_population

from ensemble_serve.shared.population import load_population, read_manifest
from trainer.engines import attach
from trainer.evaluate import EvalConfig, eval_problems, run_eval
from trainer.evolve.config import EvolveConfig
from trainer.evolve.evaluation import HELDOUT_MAX_TOKENS, evaluate_heldout
from trainer.evolve.problems import heldout_problems

pytestmark = pytest.mark.engine

DOMAINS = ("add", "sort")


@pytest.fixture()
def engine(tiny_engine):
    """The session's engine on the tiny substrate (tests/conftest.py), with private adapter snapshots."""
    return tiny_engine


def test_eval_and_the_held_out_evaluation_agree_on_one_engine(engine, tiny_population: Path, tmp_path: Path) -> None:
    pop = copy_population(tiny_population, tmp_path / "pop")
    common = {"domains": DOMAINS, "difficulties": (1, 2)}
    cfg = EvalConfig(population=pop, per_domain=3, seed=21, include_base=False, max_tokens=HELDOUT_MAX_TOKENS, **common)
    evo = EvolveConfig(heldout_per_domain=3, eval_seed=21, **common)
    problems = heldout_problems(evo)
    assert eval_problems(cfg) == problems

    result = run_eval(cfg, update_manifest=True, engine=engine)
    population = load_population(pop)
    heldout = evaluate_heldout(attach(engine, population), population.names, problems, evo.answer)

    assert result["engine_load_seconds"] < 5  # no engine was started
    assert result["accuracy"] == heldout["members"]
    names = population.names
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    mean = sum(result["disagreement"][a][b] for a, b in pairs) / len(pairs)
    assert mean == pytest.approx(heldout["disagreement"], abs=1e-4)
    scores = {m.name: m.domain_scores for m in read_manifest(pop).members}
    assert scores == {m: {d: v for d, v in heldout["members"][m].items() if d != "all"} for m in names}


def test_router_and_calibrate_run_on_the_same_engine(engine, tiny_population: Path, tmp_path: Path) -> None:
    from vllm import SamplingParams

    from trainer.calibration.command import CalibrateConfig, run_calibrate
    from trainer.router.command import run_router
    from trainer.router.config import RouterCommandConfig

    pop = copy_population(tiny_population, tmp_path / "pop")
    report = run_calibrate(
        CalibrateConfig(population=pop, per_domain=2, domains=DOMAINS, difficulties=(1,), max_tokens=48),
        engine=engine,
    )
    assert report["method"] == "labelled" and (pop / "reliability.json").is_file()

    cfg = RouterCommandConfig(
        population=pop, per_domain=3, heldout_per_domain=2, domains=DOMAINS, steps=10, max_tokens=48
    )
    result = run_router(cfg, progress=False, engine=engine)
    assert result["installed"] and result["problems"] == {"train": 6, "heldout": 4}
    assert read_manifest(pop).router is not None

    # the caller's engine is still up and serving the last population's members
    out = engine.generate(
        [engine.chat_prompt("add 2+3")], [load_population(pop).names[0]], SamplingParams(max_tokens=8)
    )
    assert out[0][0].tokens > 0
