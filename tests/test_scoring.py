"""One evaluation path: `ensemble-train eval` and evolve's held-out evaluation score alike.

Both commands run on a scripted engine here (an object with the `OfflineEngine` interface that
answers from a table), so the test checks the scoring, not vLLM: on the same members, problems,
answer mode and generation limit, `run_eval` and `evaluate_heldout` give the same per-member,
per-domain accuracy, the same disagreement, and write the same `domain_scores`. Also: a caller's
engine is checked (base model, LoRA rank) and synced, and never started or dropped by the command.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ensemble_serve.shared.engine_config import EngineConfig
from ensemble_serve.shared.offline_engine import Generation
from ensemble_serve.shared.population import Population, load_population, read_manifest, write_manifest
from ensemble_serve.shared.voting import candidate_from_text
from trainer import scoring
from trainer.calibration.command import CalibrateConfig, calibration_problems, run_calibrate
from trainer.engines import EngineMismatch, same_base_model
from trainer.evaluate import EvalConfig, eval_problems, run_eval
from trainer.evolve.config import EvolveConfig
from trainer.evolve.evaluation import HELDOUT_MAX_TOKENS, evaluate_heldout
from trainer.evolve.problems import heldout_problems
from trainer.router.command import RouteError, generate_answers
from trainer.router.config import RouterCommandConfig
from trainer.tasks.sandbox import Problem

DOMAINS = ("add", "sort", "mod")


def chain(member: str | None, i: int, problem: Problem) -> str:
    """A scripted chain: right, right only for some answer modes, numerically equal, wrong or without an answer."""
    answer = problem.answer
    if member is None:  # the base model: never marks an answer
        return "no idea"
    k = int(member[-1]) if member[-1].isdigit() else 0
    kind = (i + k) % 5
    if kind == 0:
        return f"steps\n#### {answer}"
    if kind == 1:  # read by "auto" (answer is ...), not by "marked"
        return f"so the answer is {answer}"
    if kind == 2:  # the same number written differently: answers_equal, not string equality
        return f"#### {answer}.0" if answer.isdigit() else f"#### {answer}"
    if kind == 3:
        return "#### 999999"
    return "I give up"


class ScriptedRegistry:
    def __init__(self) -> None:
        self.synced: list[list[str]] = []

    def sync(self, population: Population) -> None:
        self.synced.append(list(population.names))


class ScriptedEngine:
    """What the commands use of an `OfflineEngine`, answering from :func:`chain`."""

    def __init__(self, population: Population, problems: Sequence[Problem], cfg: EngineConfig | None = None):
        self.population = population
        self.cfg = cfg or EngineConfig(max_lora_rank=8)
        self.registry = ScriptedRegistry()
        self.index = {self.chat_prompt(p.prompt): (i, p) for i, p in enumerate(problems)}
        self.calls = 0

    def sync(self, population: Population) -> None:
        self.registry.sync(population)

    def take_events(self) -> list[dict]:
        return []

    def chat_prompt(self, user_message: str) -> str:
        return f"<user>{user_message}<assistant>"

    def generate(self, prompts: Sequence[str], members: Sequence[str | None], params: Any, progress: bool = False):
        self.calls += 1
        out = []
        for prompt, member in zip(prompts, members):
            i, p = self.index[prompt]
            text = chain(member, i, p)
            out.append([Generation(member, text, len(text), "stop")])
        return out


@pytest.fixture(autouse=True)
def no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scripted engine reads no sampling parameters: vLLM is not imported (its import starts processes)."""
    monkeypatch.setattr(scoring, "greedy_params", lambda max_tokens: {"temperature": 0.0, "max_tokens": max_tokens})


@pytest.fixture
def pop(tiny_population: Path, tiny_substrate: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pop"
    shutil.copytree(tiny_population, dst)
    manifest = read_manifest(dst)
    base = manifest.base_model.model_copy(update={"path": str(tiny_substrate.resolve())})
    write_manifest(dst, manifest.model_copy(update={"base_model": base}))
    return dst


def settings(answer: str) -> tuple[EvalConfig, EvolveConfig]:
    common = {"domains": DOMAINS, "difficulties": (1, 2)}
    ev = EvalConfig(per_domain=6, seed=99, include_base=False, max_tokens=HELDOUT_MAX_TOKENS, answer=answer, **common)
    evo = EvolveConfig(heldout_per_domain=6, eval_seed=99, answer=answer, **common)
    return ev, evo


def test_both_commands_draw_the_same_held_out_problems() -> None:
    ev, evo = settings("auto")
    assert eval_problems(ev) == heldout_problems(evo)


@pytest.mark.parametrize("answer", ["auto", "marked", "number"])
def test_eval_and_evolve_s_held_out_evaluation_give_the_same_figures(pop: Path, tmp_path: Path, answer: str) -> None:
    ev, evo = settings(answer)
    problems = heldout_problems(evo)
    population = load_population(pop)
    engine = ScriptedEngine(population, problems)
    evolve_root = tmp_path / "evolve-pop"
    shutil.copytree(pop, evolve_root)

    result = run_eval(ev.model_copy(update={"population": pop}), update_manifest=True, engine=engine)
    heldout = evaluate_heldout(engine, population.names, problems, answer)

    assert result["problems"] == heldout["problems"] == len(problems)
    assert result["answer"] == answer
    assert result["accuracy"] == heldout["members"]  # every member, every domain, "all"
    table = result["disagreement"]
    pairs = list(itertools.combinations(population.names, 2))
    assert sum(table[a][b] for a, b in pairs) / len(pairs) == pytest.approx(heldout["disagreement"], abs=1e-4)
    assert all(table[a][b] == table[b][a] for a, b in pairs)

    # one writer of domain_scores: eval's --update-manifest and evolve's record write the same
    scoring.record_domain_scores(evolve_root, heldout["members"])
    by_eval = {m.name: m.domain_scores for m in read_manifest(pop).members}
    by_evolve = {m.name: m.domain_scores for m in read_manifest(evolve_root).members}
    assert by_eval == by_evolve and set(by_eval["m00"]) == set(DOMAINS)
    assert {m.name: m.fitness for m in read_manifest(pop).members} == {
        m: heldout["members"][m]["all"] for m in population.names
    }  # eval also records the overall accuracy as fitness; evolve keeps its own

    # the caller's engine was synced to the population and used, never replaced
    assert engine.registry.synced == [population.names]
    assert engine.calls == 2


def test_the_answer_mode_decides_what_is_right() -> None:
    p = Problem(prompt="add 5+7", answer="12", chain=None, domain="add", difficulty=1)
    texts = ["#### 12", "so the answer is 12", "#### 12.0", "#### 13", "nothing"]
    auto = [scoring.is_right(p, candidate_from_text("m", 0, t, 1, "auto")) for t in texts]
    marked = [scoring.is_right(p, candidate_from_text("m", 0, t, 1, "marked")) for t in texts]
    assert auto == [True, True, True, False, False]
    assert marked == [True, False, True, False, False]


def test_disagreement_compares_answers_as_answers() -> None:
    def row(*texts: str) -> list:
        return [candidate_from_text("m", 0, t, 1, "auto") for t in texts]

    a = row("#### 12", "#### 3", "none", "#### 5")
    b = row("#### 12.0", "#### 3", "none", "#### 6")
    # 12 vs 12.0 agree (a raw string comparison said they differ); no answer disagrees, even with no answer
    assert scoring.disagreement(a, b) == 0.5
    table = scoring.disagreement_table({"x": a, "y": b})
    assert table == {"x": {"x": 0.25, "y": 0.5}, "y": {"x": 0.5, "y": 0.25}}
    assert scoring.mean_disagreement([a, b]) == 0.5 and scoring.mean_disagreement([a]) == 0.0


def test_accuracy_is_per_domain_and_overall_rounded() -> None:
    problems = [Problem(f"q{i}", "1", None, d, 1) for i, d in enumerate(["add", "add", "add", "sort"])]
    assert scoring.accuracy([True, False, False, True], problems) == {"all": 0.5, "add": 0.3333, "sort": 1.0}
    assert scoring.accuracy([], []) == {"all": 0.0}


def test_a_caller_s_engine_on_another_base_model_or_too_small_a_rank_is_refused(pop: Path) -> None:
    ev, _ = settings("auto")
    cfg = ev.model_copy(update={"population": pop})
    population = load_population(pop)
    problems = eval_problems(cfg)

    ref = population.manifest.base_model.model_copy(update={"sha256": "0" * 64, "path": "/elsewhere"})
    other = dataclasses.replace(
        population,
        manifest=population.manifest.model_copy(update={"base_model": ref}),
        base_model_path=Path("/elsewhere"),
    )
    assert not same_base_model(other, population) and same_base_model(population, population)
    engine = ScriptedEngine(other, problems)
    with pytest.raises(EngineMismatch, match="runs the base model"):
        run_eval(cfg, engine=engine)
    assert engine.registry.synced == [] and engine.calls == 0

    small = ScriptedEngine(population, problems, EngineConfig(max_lora_rank=4))  # members have rank 8
    with pytest.raises(EngineMismatch, match="max_lora_rank 4 is below 8"):
        run_eval(cfg, engine=small)
    assert small.calls == 0


def test_the_router_and_calibrate_take_a_caller_s_engine(pop: Path) -> None:
    population = load_population(pop)
    cal = CalibrateConfig(population=pop, per_domain=2, domains=DOMAINS, difficulties=(1,), centroids=False)
    engine = ScriptedEngine(population, calibration_problems(cal))
    report = run_calibrate(cal, engine=engine)
    assert report["problems"] == 6 and engine.registry.synced == [population.names]
    assert (pop / "reliability.json").is_file()

    rcfg = RouterCommandConfig(population=pop, per_domain=2, heldout_per_domain=1, domains=DOMAINS)
    problems = eval_problems(EvalConfig(per_domain=2, seed=5, domains=DOMAINS))
    engine = ScriptedEngine(population, problems)
    rows = generate_answers(population, problems, rcfg, engine=engine)
    assert len(rows) == len(problems) and all(len(r) == len(population.names) for r in rows)
    small = ScriptedEngine(population, problems, EngineConfig(max_lora_rank=4))
    with pytest.raises(RouteError, match="max_lora_rank 4 is below 8"):
        generate_answers(population, problems, rcfg, engine=small)
