"""Tests of the evolve loop's pure parts and its run state, without the engine.

Fitness, pseudo-labels and training examples are checked on evidence built by hand
(exact numbers); the evolutionary step, the member/operator checks, the run state and
the commit run on a copy of the real tiny PEFT population from conftest; the two
executors run the real training and scoring tasks on the tiny substrate. Nothing here
starts vLLM.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_factories import same_weights
from pydantic import ValidationError

import ensemble_serve.shared.population.commit as population_module
from ensemble_serve.shared.lora import LoraWeights, check_compatible, load_lora, lora_from_bytes, lora_to_bytes
from ensemble_serve.shared.population import (
    PopulationError,
    load_population,
    read_manifest,
    write_manifest,
)
from ensemble_serve.shared.voting import candidate_from_text
from trainer.evolve import commit as commit_module
from trainer.evolve import operators, workers
from trainer.evolve.calls import failed_members, trained_weights
from trainer.evolve.commit import PENDING_FILE
from trainer.evolve.config import EvolutionConfig, EvolveConfig
from trainer.evolve.executors import (
    LocalExecutor,
    RayExecutor,
    TaskError,
    TaskFailed,
    score_member_task,
    train_member_task,
)
from trainer.evolve.fitness import (
    FITNESS_TERMS,
    Evidence,
    compute_fitness,
    term_consensus,
    term_contribution,
    term_correctness,
    term_cross_eval,
    term_diversity_hidden,
    term_diversity_output,
)
from trainer.evolve.labels import pseudo_labels, training_examples
from trainer.evolve.loop import Evolver, run_evolve
from trainer.evolve.nextgen import next_manifest
from trainer.evolve.problems import generation_problems, load_dataset
from trainer.evolve.run import RUN_FILE, EvolveError, load_members, prepare_run
from trainer.evolve.step import evolutionary_step
from trainer.tasks.sandbox import Problem, generate_problems

MEMBERS = ["m00", "m01", "m02"]
RANKS = {"m00": 4, "m01": 8, "m02": 4}

# --------------------------------------------------------------------------- helpers


def problems_with(answers: list[str | None]) -> list[Problem]:
    return [Problem(prompt=f"q{i}", answer=a, chain=None, domain="add", difficulty=1) for i, a in enumerate(answers)]


def chain_text(member: str, answer: str | None) -> str:
    return "no answer here" if answer is None else f"{member} works it out\n#### {answer}"


def evidence_from_texts(
    texts: dict[str, list[list[str]]], truth: list[str | None], visible: bool = True, **extra: object
) -> Evidence:
    """member -> per problem -> sample texts, as the self-play phase would have produced them."""
    candidates = {
        m: [[candidate_from_text(m, s, t, len(t), "auto") for s, t in enumerate(row)] for row in rows]
        for m, rows in texts.items()
    }
    return Evidence(
        members=list(texts),
        problems=problems_with(truth if visible else [None] * len(truth)),
        candidates=candidates,
        labels_visible=visible,
        **extra,
    )


def evidence_from_answers(
    answers: dict[str, list[str | None]], truth: list[str | None], visible: bool = True, **extra: object
) -> Evidence:
    """One sample per member and problem; None is a chain with no parseable answer."""
    texts = {m: [[chain_text(m, a)] for a in row] for m, row in answers.items()}
    return evidence_from_texts(texts, truth, visible, **extra)


# The hand-computed example: 3 members x 4 problems, answers 12, 7, 3, 5.
TRUTH = ["12", "7", "3", "5"]
ANSWERS: dict[str, list[str | None]] = {
    "m0": ["12", "7", "3", "5"],  # all right
    "m1": ["12", "7", "4", "6"],  # 2 right
    "m2": ["12", "8", "4", None],  # 1 right, one chain without an answer
}
# majority per problem: 12 (3/3), 7 (2/3), 4 (2/3), 5 vs 6 tie -> 5, first seen (1/2; the unparseable chain does not vote)
CONSENSUS = ["12", "7", "4", "5"]
AGREEMENT = [1.0, 2 / 3, 2 / 3, 0.5]


def copy_population(src: Path, dst: Path, substrate: Path) -> Path:
    """A writable copy of a population, its base model referenced by absolute path (valid wherever it lies)."""
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    base = manifest.base_model.model_copy(update={"path": str(substrate.resolve())})
    write_manifest(dst, manifest.model_copy(update={"base_model": base}))
    return dst


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def edit_adapter_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def cfg_for(population: Path, out: Path | None = None, **kw: object) -> EvolveConfig:
    return EvolveConfig(population=population, out=out, heldout_per_domain=0, **kw)


@pytest.fixture
def pop_copy(tiny_population: Path, tiny_substrate: Path, tmp_path: Path) -> Path:
    return copy_population(tiny_population, tmp_path / "pop", tiny_substrate)


@pytest.fixture(scope="module")
def pop_weights(tiny_population: Path) -> dict[str, LoraWeights]:
    population = load_population(tiny_population)
    return {name: load_lora(population.member_dir(name)) for name in population.names}


# --------------------------------------------------------------------------- 1. fitness


def test_fitness_terms_hand_computed() -> None:
    ev = evidence_from_answers(ANSWERS, TRUTH)
    assert ev.consensus == CONSENSUS
    assert ev.agreement == pytest.approx(AGREEMENT)
    assert term_correctness(ev) == pytest.approx({"m0": 1.0, "m1": 0.5, "m2": 0.25})
    assert term_consensus(ev) == pytest.approx({"m0": 0.75, "m1": 0.75, "m2": 0.5})
    # full vote right on 3/4; without m0: 2/4, without m1: 4/4, without m2: 4/4
    assert term_contribution(ev) == pytest.approx({"m0": 0.25, "m1": -0.25, "m2": -0.25})

    result = compute_fitness(ev, {"correctness": 1.0, "consensus": 1.0, "contribution": 2.0, "diversity_output": 5.0})
    # contribution is min-max scaled to (1, 0, 0); diversity_output has no evidence, so it is not used
    assert result.used == {"correctness": 1.0, "consensus": 1.0, "contribution": 2.0}
    assert set(result.terms) == {"correctness", "consensus", "contribution"}
    assert result.fitness == pytest.approx({"m0": 3.75 / 4, "m1": 1.25 / 4, "m2": 0.75 / 4})


def test_hidden_labels_never_read() -> None:
    ev = evidence_from_answers(ANSWERS, TRUTH, visible=False)
    assert all(p.answer is None for p in ev.problems)
    assert term_correctness(ev) is None
    with pytest.raises(RuntimeError, match="labels are hidden"):
        ev.correct("m0")
    result = compute_fitness(ev, {"consensus": 1.0})
    assert "correctness" not in result.terms
    assert result.used == {"consensus": 1.0}
    assert result.fitness == pytest.approx({"m0": 0.75, "m1": 0.75, "m2": 0.5})
    # leave-one-out against the consensus: every member's absence costs one problem of four
    assert result.terms["contribution"] == pytest.approx({"m0": 0.25, "m1": 0.25, "m2": 0.25})


def test_scaled_term_with_equal_values_contributes_nothing() -> None:
    ev = evidence_from_answers(ANSWERS, TRUTH, visible=False)
    assert FITNESS_TERMS["contribution"][1] is True and FITNESS_TERMS["consensus"][1] is False
    result = compute_fitness(ev, {"consensus": 1.0, "contribution": 1.0})
    assert result.used == {"consensus": 1.0, "contribution": 1.0}
    # contribution is 0.25 for everyone: scaled to 0, so only consensus / 2 is left
    assert result.fitness == pytest.approx({"m0": 0.375, "m1": 0.375, "m2": 0.25})


def test_scaled_term_is_min_max_scaled() -> None:
    judge = {
        "m0": {"m0": -0.5, "m1": -2.0, "m2": -4.0},
        "m1": {"m0": -1.0, "m1": -0.1, "m2": -3.0},
        "m2": {"m0": -2.0, "m1": -1.0, "m2": -0.2},
    }
    ev = evidence_from_answers(ANSWERS, TRUTH, judge_logprob=judge)
    raw = term_cross_eval(ev)  # mean over the *other* judges
    assert raw == pytest.approx({"m0": -1.5, "m1": -1.5, "m2": -3.5})
    result = compute_fitness(ev, {"cross_eval": 1.0})
    assert result.terms["cross_eval"] == pytest.approx(raw)
    assert result.fitness == pytest.approx({"m0": 1.0, "m1": 1.0, "m2": 0.0})


@pytest.mark.parametrize("visible", [True, False])
def test_no_parseable_chain_gives_finite_fitness(visible: bool) -> None:
    texts = {m: [["no answer here", "still nothing"] for _ in range(3)] for m in MEMBERS}
    ev = evidence_from_texts(texts, ["1", "2", "3"], visible=visible)
    assert ev.consensus == [None, None, None]
    assert ev.agreement == [0.0, 0.0, 0.0]
    weights = {"consensus": 1.0, "contribution": 1.0} | ({"correctness": 1.0} if visible else {})
    result = compute_fitness(ev, weights)
    assert result.fitness == {m: 0.0 for m in MEMBERS}
    assert all(math.isfinite(v) for v in result.fitness.values())
    assert result.terms["consensus"] == {m: 0.0 for m in MEMBERS}
    if visible:
        assert result.terms["correctness"] == {m: 0.0 for m in MEMBERS}
        assert result.terms["contribution"] == {m: 0.0 for m in MEMBERS}
    else:  # no consensus anywhere: nothing to measure a contribution against
        assert "contribution" not in result.terms
    assert pseudo_labels(ev, EvolveConfig(labels="hidden", fitness={"consensus": 1.0})) == [None, None, None]


def test_single_member_has_no_population_terms() -> None:
    rows = np.ones((5, 4))
    ev = evidence_from_answers(
        {"solo": ["12", "7", "9", None]},
        TRUTH,
        judge_logprob={"solo": {"solo": -1.0}},
        hidden={"solo": rows},
        output={"solo": rows},
        embeddings={"solo": rows.reshape(5, 1, 4)},
    )
    for name in ("cross_eval", "diversity_embedding", "diversity_hidden", "diversity_output", "contribution"):
        assert FITNESS_TERMS[name][0](ev) is None, name
    weights = {name: 1.0 for name in FITNESS_TERMS}
    result = compute_fitness(ev, weights)
    assert set(result.terms) == {"correctness", "consensus"}
    assert result.used == {"correctness": 1.0, "consensus": 1.0}
    # correctness 2/4; consensus 3/3: its answers are the consensus, and the problem nobody answered is left out
    assert result.terms["consensus"] == {"solo": 1.0}
    assert result.fitness == pytest.approx({"solo": (0.5 + 1.0) / 2})
    assert math.isfinite(compute_fitness(ev, {"diversity_hidden": 1.0}).fitness["solo"])


def test_diversity_member_at_the_mean_is_closest() -> None:
    rng = np.random.default_rng(0)
    centre = rng.normal(size=(6, 8))
    offset = rng.normal(size=(6, 8))
    vectors = {"m0": centre - offset, "m1": centre, "m2": centre + 2 * offset, "m3": centre - offset}
    # population mean is centre + offset / 4: move m1 onto it
    vectors["m1"] = np.mean([vectors["m0"], vectors["m2"], vectors["m3"]], axis=0)
    mean = np.mean(list(vectors.values()), axis=0)
    np.testing.assert_allclose(vectors["m1"], mean)
    answers = {m: ["12", "7", "3", "5"] for m in vectors}
    ev = evidence_from_answers(answers, TRUTH, hidden=vectors, output={m: v + 10.0 for m, v in vectors.items()})
    hidden = term_diversity_hidden(ev)
    assert hidden["m1"] == pytest.approx(0.0, abs=1e-12)
    assert min(hidden, key=hidden.get) == "m1"
    assert hidden["m0"] == pytest.approx(hidden["m3"])
    assert all(hidden[m] > 1e-3 for m in ("m0", "m2", "m3"))
    output = term_diversity_output(ev)
    assert min(output, key=output.get) == "m1"
    result = compute_fitness(ev, {"diversity_hidden": 1.0})
    assert result.fitness["m1"] == 0.0
    assert max(result.fitness.values()) == 1.0


def test_diversity_without_probe_rows_is_not_computed() -> None:
    empty = np.zeros((0, 0), dtype=np.float32)  # what score_member_task returns without probes
    ev = evidence_from_answers(ANSWERS, TRUTH, hidden={m: empty for m in ANSWERS}, output={m: empty for m in ANSWERS})
    assert term_diversity_hidden(ev) is None
    assert term_diversity_output(ev) is None
    result = compute_fitness(ev, {"consensus": 1.0, "diversity_hidden": 1.0, "diversity_output": 1.0})
    assert result.used == {"consensus": 1.0}


# --------------------------------------------------------------------------- 2. pseudo-labels and examples


def test_pseudo_labels_ground_truth_uses_the_answers() -> None:
    ev = evidence_from_answers(ANSWERS, TRUTH)
    cfg = EvolveConfig(min_agreement=0.9)
    assert pseudo_labels(ev, cfg) == TRUTH  # even where the consensus (4) is wrong or weak


def test_pseudo_labels_ground_truth_falls_back_to_consensus_for_unlabelled_rows() -> None:
    ev = evidence_from_answers(ANSWERS, ["12", None, None, "5"])
    assert pseudo_labels(ev, EvolveConfig(min_agreement=0.6)) == ["12", "7", "4", "5"]
    assert pseudo_labels(ev, EvolveConfig(min_agreement=0.7)) == ["12", None, None, "5"]


@pytest.mark.parametrize(
    ("min_agreement", "expected"),
    [(0.5, ["12", "7", "4", "5"]), (0.6, ["12", "7", "4", None]), (0.9, ["12", None, None, None])],
)
def test_pseudo_labels_hidden_need_agreement(min_agreement: float, expected: list[str | None]) -> None:
    ev = evidence_from_answers(ANSWERS, TRUTH, visible=False)
    cfg = EvolveConfig(labels="hidden", fitness={"consensus": 1.0}, min_agreement=min_agreement)
    assert pseudo_labels(ev, cfg) == expected


def test_pseudo_labels_hidden_ignore_zero_agreement() -> None:
    ev = evidence_from_answers({"m0": [None], "m1": [None]}, ["1"], visible=False)
    assert pseudo_labels(ev, EvolveConfig(labels="hidden", fitness={"consensus": 1.0}, min_agreement=0.0)) == [None]


def example_texts() -> dict[str, list[list[str]]]:
    shared = "7 + 5 = 12\n#### 12"
    return {
        "m0": [[shared], ["3 + 4 = 7\n#### 7"], ["1 + 2 = 3\n#### 3"], ["2 + 3 = 5\n#### 5"]],
        "m1": [[shared + "\n"], ["4 + 3 = 7\n#### 7"], ["2 + 2 = 4\n#### 4"], ["3 + 3 = 6\n#### 6"]],
        "m2": [[" " + shared], ["4 + 4 = 8\n#### 8"], ["2 + 2 = 4\n#### 4"], ["no answer here"]],
    }


def test_training_examples_verified_own_chains_only() -> None:
    ev = evidence_from_texts(example_texts(), TRUTH)
    cfg = EvolveConfig(share_chains=False)
    labels = pseudo_labels(ev, cfg)
    out = training_examples(ev, labels, cfg)
    assert out == {
        "m0": [
            ("q0", "7 + 5 = 12\n#### 12"),
            ("q1", "3 + 4 = 7\n#### 7"),
            ("q2", "1 + 2 = 3\n#### 3"),
            ("q3", "2 + 3 = 5\n#### 5"),
        ],
        "m1": [("q0", "7 + 5 = 12\n#### 12"), ("q1", "4 + 3 = 7\n#### 7")],
        "m2": [("q0", "7 + 5 = 12\n#### 12")],
    }


def test_training_examples_shared_and_deduplicated() -> None:
    ev = evidence_from_texts(example_texts(), TRUTH)
    cfg = EvolveConfig(share_chains=True)
    out = training_examples(ev, pseudo_labels(ev, cfg), cfg)
    # own chains first, then the others' in member order; the same (stripped) chain of q0 appears once
    assert out["m2"] == [
        ("q0", "7 + 5 = 12\n#### 12"),
        ("q1", "3 + 4 = 7\n#### 7"),
        ("q2", "1 + 2 = 3\n#### 3"),
        ("q3", "2 + 3 = 5\n#### 5"),
        ("q1", "4 + 3 = 7\n#### 7"),
    ]
    assert out["m0"] == [
        ("q0", "7 + 5 = 12\n#### 12"),
        ("q1", "3 + 4 = 7\n#### 7"),
        ("q2", "1 + 2 = 3\n#### 3"),
        ("q3", "2 + 3 = 5\n#### 5"),
        ("q1", "4 + 3 = 7\n#### 7"),
    ]
    assert all(len(set(v)) == len(v) for v in out.values())


def test_training_examples_hidden_labels_follow_the_consensus() -> None:
    ev = evidence_from_texts(example_texts(), TRUTH, visible=False)
    cfg = EvolveConfig(labels="hidden", fitness={"consensus": 1.0}, min_agreement=0.6, share_chains=False)
    labels = pseudo_labels(ev, cfg)
    assert labels == ["12", "7", "4", None]
    out = training_examples(ev, labels, cfg)
    # the consensus 4 on q2 is wrong, but it is all there is without labels; q3 (1/2 agreement) is skipped
    assert out["m0"] == [("q0", "7 + 5 = 12\n#### 12"), ("q1", "3 + 4 = 7\n#### 7")]
    assert out["m1"] == [("q0", "7 + 5 = 12\n#### 12"), ("q1", "4 + 3 = 7\n#### 7"), ("q2", "2 + 2 = 4\n#### 4")]
    assert out["m2"] == [("q0", "7 + 5 = 12\n#### 12"), ("q2", "2 + 2 = 4\n#### 4")]


# --------------------------------------------------------------------------- 3. evolutionary step


@pytest.mark.parametrize(
    ("fitness", "elite", "weakest"),
    [({"m00": 0.9, "m01": 0.5, "m02": 0.1}, 0, 2), ({"m00": 0.1, "m01": 0.9, "m02": 0.5}, 1, 0)],
)
def test_evolutionary_step_replaces_the_weakest(
    pop_weights: dict[str, LoraWeights], fitness: dict[str, float], elite: int, weakest: int
) -> None:
    cfg = EvolveConfig(evolution=EvolutionConfig(elite=1, offspring=1, replacement="weakest"))
    elites, replaced, children = evolutionary_step(MEMBERS, pop_weights, fitness, cfg, generation=3)
    assert elites == [elite]
    assert replaced == [weakest]
    assert len(children) == 1
    child = children[0]
    assert child.name == "g3c0"
    assert child.operators == ["weighted_average", "gaussian"]
    assert child.parents and set(child.parents) <= set(MEMBERS)
    assert len(set(child.parents)) == len(child.parents)
    fitter = max(child.parents, key=lambda p: (fitness[p], -MEMBERS.index(p)))
    assert child.weights.rank == RANKS[fitter] == pop_weights[fitter].rank
    assert child.weights.alpha / child.weights.rank == pytest.approx(pop_weights[fitter].alpha / RANKS[fitter])
    assert child.weights.config["r"] == child.weights.rank
    # the child can live in the population: same base model, modules and shapes
    check_compatible([*pop_weights.values(), child.weights], [*MEMBERS, child.name])


def test_evolutionary_step_child_rank(pop_weights: dict[str, LoraWeights]) -> None:
    cfg = EvolveConfig(evolution=EvolutionConfig(elite=1, offspring=1, child_rank=16))
    _, _, children = evolutionary_step(MEMBERS, pop_weights, {"m00": 0.9, "m01": 0.5, "m02": 0.1}, cfg, 1)
    child = children[0].weights
    assert child.rank == 16
    assert child.alpha == pytest.approx(32.0)  # alpha / rank = 2 as in every member
    assert all(a.shape[0] == 16 and b.shape[1] == 16 for a, b in child.factors.values())


def test_evolutionary_step_without_crossover_has_one_parent(pop_weights: dict[str, LoraWeights]) -> None:
    cfg = EvolveConfig(evolution=EvolutionConfig(elite=1, offspring=1, crossover="none"))
    _, _, children = evolutionary_step(MEMBERS, pop_weights, {"m00": 0.9, "m01": 0.5, "m02": 0.1}, cfg, 1)
    child = children[0]
    assert len(child.parents) == 1
    assert child.operators == ["gaussian"]
    assert child.weights.rank == RANKS[child.parents[0]]


def test_evolutionary_step_is_deterministic(pop_weights: dict[str, LoraWeights]) -> None:
    before = {m: {k: (a.clone(), b.clone()) for k, (a, b) in w.factors.items()} for m, w in pop_weights.items()}
    fitness = {"m00": 0.9, "m01": 0.5, "m02": 0.1}
    cfg = EvolveConfig(evolution=EvolutionConfig(elite=1, offspring=1))
    first = evolutionary_step(MEMBERS, pop_weights, fitness, cfg, generation=2)
    again = evolutionary_step(MEMBERS, pop_weights, fitness, cfg, generation=2)
    other = evolutionary_step(MEMBERS, pop_weights, fitness, cfg, generation=5)
    assert first[:2] == again[:2]
    (a,), (b,), (c,) = first[2], again[2], other[2]
    assert (a.name, a.parents, a.operators) == (b.name, b.parents, b.operators)
    assert same_weights(a.weights, b.weights)
    assert c.name == "g5c0"
    assert not same_weights(a.weights, c.weights)
    # the step is pure: the population's own tensors are untouched
    for m, w in pop_weights.items():
        assert all(
            torch.equal(w.factors[k][0], x) and torch.equal(w.factors[k][1], y) for k, (x, y) in before[m].items()
        )


@pytest.mark.parametrize(
    "evolution",
    [EvolutionConfig(enabled=False), EvolutionConfig(offspring=0), EvolutionConfig(elite=3, offspring=2)],
    ids=["disabled", "no-offspring", "all-elite"],
)
def test_evolutionary_step_without_children(pop_weights: dict[str, LoraWeights], evolution: EvolutionConfig) -> None:
    cfg = EvolveConfig(evolution=evolution)
    elites, replaced, children = evolutionary_step(MEMBERS, pop_weights, {"m00": 0.9, "m01": 0.5, "m02": 0.1}, cfg, 1)
    assert replaced == [] and children == []
    assert elites == ([0, 1, 2] if evolution.enabled and evolution.offspring else [])


def test_evolutionary_step_generational_replaces_every_non_elite(pop_weights: dict[str, LoraWeights]) -> None:
    cfg = EvolveConfig(evolution=EvolutionConfig(elite=1, offspring=2, replacement="generational"))
    elites, replaced, children = evolutionary_step(MEMBERS, pop_weights, {"m00": 0.1, "m01": 0.9, "m02": 0.5}, cfg, 4)
    assert elites == [1]
    assert replaced == [0, 2]
    assert [c.name for c in children] == ["g4c0", "g4c1"]


# --------------------------------------------------------------------------- 4. operator checks


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records any attempt to start the engine or an executor (none is expected)."""
    started: list[str] = []
    monkeypatch.setattr(workers, "OfflineEngine", lambda *a, **k: started.append("engine"))
    monkeypatch.setattr(workers, "make_executor", lambda *a, **k: started.append("executor"))
    return started


def test_a_tournament_larger_than_the_population_is_refused_before_any_work(
    pop_copy: Path, tmp_path: Path, no_engine: list[str]
) -> None:
    evo = EvolutionConfig(elite=1, offspring=1, selection_options={"size": 4})
    cfg, root, run = prepare_run(cfg_for(pop_copy, tmp_path / "run", evolution=evo), resume=False)
    with pytest.raises(EvolveError, match=r"selection_options.size 4 is larger than the population \(3 members\)"):
        Evolver(cfg, root, run, progress=False)
    assert no_engine == []


@pytest.mark.parametrize("crossover", ["svd_interpolate", "layer_wise"])
def test_rank_policy_error_refused_before_any_work(
    pop_copy: Path, tmp_path: Path, no_engine: list[str], crossover: str
) -> None:
    evo = EvolutionConfig(crossover=crossover, rank_policy="error")
    cfg, root, run = prepare_run(cfg_for(pop_copy, tmp_path / "run", evolution=evo), resume=False)
    with pytest.raises(EvolveError, match="rank_policy") as info:
        Evolver(cfg, root, run, progress=False)
    assert crossover in str(info.value)
    assert "[4, 8]" in str(info.value)
    assert no_engine == []


@pytest.mark.parametrize("crossover", ["svd_interpolate", "layer_wise"])
def test_rank_policy_truncate_accepted(pop_copy: Path, tmp_path: Path, no_engine: list[str], crossover: str) -> None:
    evo = EvolutionConfig(crossover=crossover, rank_policy="truncate")
    evolver = Evolver(*prepare_run(cfg_for(pop_copy, tmp_path / "run", evolution=evo), resume=False), progress=False)
    try:
        assert evolver.population.names == MEMBERS
        assert evolver.engine is None and evolver.executor is None
    finally:
        evolver.close()
    assert no_engine == []


def test_rank_policy_error_with_equal_ranks(pop_copy: Path, tmp_path: Path, no_engine: list[str]) -> None:
    evo = EvolutionConfig(crossover="layer_wise", rank_policy="error")
    cfg = cfg_for(pop_copy, tmp_path / "one-rank", members=("m00", "m02"), evolution=evo)
    evolver = Evolver(*prepare_run(cfg, resume=False), progress=False)
    evolver.close()
    assert [m.rank for m in evolver.population.manifest.members] == [4, 4]
    # a child rank other than the members' brings a second rank back
    evo = EvolutionConfig(crossover="layer_wise", rank_policy="error", child_rank=8)
    cfg = cfg_for(pop_copy, tmp_path / "child-rank", members=("m00", "m02"), evolution=evo)
    with pytest.raises(EvolveError, match=r"ranks are \[4, 8\]"):
        Evolver(*prepare_run(cfg, resume=False), progress=False)
    assert no_engine == []


# --------------------------------------------------------------------------- 5. members that disagree


def test_members_with_other_target_modules_refused(pop_copy: Path, no_engine: list[str]) -> None:
    edit_adapter_config(pop_copy / "members" / "m01", target_modules=["q_proj", "v_proj"])
    cfg, root, run = prepare_run(cfg_for(pop_copy), resume=False)
    with pytest.raises(EvolveError, match="target_modules") as info:
        Evolver(cfg, root, run, progress=False)
    message = str(info.value)
    assert "(m01)" in message and "(m00, m02)" in message
    assert no_engine == []


def test_member_with_other_base_model_refused(pop_copy: Path, tmp_path: Path) -> None:
    edit_adapter_config(pop_copy / "members" / "m02", base_model_name_or_path="some-other-model")
    config_file = str(pop_copy / "members" / "m02" / "adapter_config.json")
    with pytest.raises(PopulationError, match="wrong base model") as info:
        load_population(pop_copy)
    assert config_file in str(info.value) and "some-other-model" in str(info.value)
    # starting a run on a copy says the same, as an EvolveError
    with pytest.raises(EvolveError, match="wrong base model") as info:
        run_evolve(cfg_for(pop_copy, tmp_path / "run"), progress=False)
    assert config_file in str(info.value)
    assert not (tmp_path / "run").exists()


def test_member_with_other_base_model_in_place_is_an_evolve_error(
    pop_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Evolver, "run_all", lambda self: [])
    edit_adapter_config(pop_copy / "members" / "m02", base_model_name_or_path="some-other-model")
    with pytest.raises(EvolveError, match="m02"):
        run_evolve(cfg_for(pop_copy), progress=False)


@pytest.mark.parametrize("copy", [True, False], ids=["out", "in-place"])
def test_refused_start_leaves_no_run_behind(
    pop_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy: bool
) -> None:
    monkeypatch.setattr(Evolver, "run_all", lambda self: [])
    out = tmp_path / "run" if copy else None
    bad = EvolutionConfig(crossover="svd_interpolate", rank_policy="error")
    with pytest.raises(EvolveError, match="rank_policy"):
        run_evolve(cfg_for(pop_copy, out, evolution=bad), progress=False)
    # nothing ran, so the corrected start is a new run, not a resume
    _, records = run_evolve(cfg_for(pop_copy, out), progress=False)
    assert records == []


@pytest.mark.parametrize(
    "evolution",
    [
        {"selection": "roulette"},
        {"crossover": "svd"},
        {"mutation": "noise"},
        {"replacement": "oldest"},
        {"rank_policy": "shrink"},
        {"replacement": "generational", "elite": 1, "offspring": 1},
    ],
    ids=["selection", "crossover", "mutation", "replacement", "rank-policy", "generational-count"],
)
def test_unusable_operators_refused_before_any_work(
    pop_copy: Path, tmp_path: Path, pop_weights: dict[str, LoraWeights], no_engine: list[str], evolution: dict
) -> None:
    # The config refuses the unknown names when it is read (tests/test_registries.py); built unchecked
    # here, the step and the Evolver must refuse them too.
    cfg = cfg_for(pop_copy, tmp_path / "run", evolution=EvolutionConfig.model_construct(**evolution))
    with pytest.raises(operators.OperatorError):  # what the first generation would meet after all its work
        evolutionary_step(MEMBERS, pop_weights, {"m00": 0.9, "m01": 0.5, "m02": 0.1}, cfg, 1)
    with pytest.raises(EvolveError):
        Evolver(*prepare_run(cfg, resume=False), progress=False).close()
    assert no_engine == []


# --------------------------------------------------------------------------- 6. datasets


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = [
    json.dumps({"prompt": "add 1+2", "answer": "3"}),
    json.dumps({"prompt": "add 2+2", "answer": 4}),
    json.dumps({"prompt": "what is up", "domain": "chat"}),
]


def test_load_dataset_names_malformed_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "data.jsonl", [GOOD[0], "{not json", GOOD[1], json.dumps({"answer": "1"}), GOOD[2]])
    with pytest.raises(EvolveError, match=r"2 invalid line\(s\)") as info:
        load_dataset(path, skip_invalid=False)
    message = str(info.value)
    assert str(path) in message
    assert "line 2: invalid JSON" in message and "line 4: missing required field 'prompt'" in message
    with pytest.warns(UserWarning, match="skipped 2 invalid line"):
        problems = load_dataset(path, skip_invalid=True)
    assert [(p.prompt, p.answer, p.domain) for p in problems] == [
        ("add 1+2", "3", "user"),
        ("add 2+2", "4", "user"),
        ("what is up", None, "chat"),
    ]


def test_load_dataset_all_invalid_or_empty(tmp_path: Path) -> None:
    bad = write_lines(tmp_path / "bad.jsonl", ["[1, 2]", "{oops", json.dumps({"prompt": ""})])
    with pytest.warns(UserWarning, match="skipped 3 invalid line"):
        with pytest.raises(EvolveError, match=r"no (valid )?problems") as info:
            load_dataset(bad, skip_invalid=True)
    assert str(bad) in str(info.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(EvolveError, match="no problems") as info:
        load_dataset(empty, skip_invalid=False)
    assert str(empty) in str(info.value)
    with pytest.raises(EvolveError, match="not found"):
        load_dataset(tmp_path / "missing.jsonl", skip_invalid=True)


def test_generation_problems_hidden_labels_strip_answers() -> None:
    visible = generation_problems(EvolveConfig(problems_per_generation=6), 1, None)
    hidden = generation_problems(
        EvolveConfig(labels="hidden", fitness={"consensus": 1.0}, problems_per_generation=6), 1, None
    )
    assert len(hidden) == 6
    assert all(p.answer is not None and p.chain is not None for p in visible)
    assert all(p.answer is None and p.chain is None for p in hidden)
    assert [p.prompt for p in hidden] == [p.prompt for p in visible]
    assert generation_problems(EvolveConfig(problems_per_generation=6), 2, None) != visible


def test_generation_problems_from_a_dataset_are_seeded() -> None:
    dataset = [
        Problem(prompt=f"p{i}", answer=str(i), chain=f"#### {i}", domain="user", difficulty=0) for i in range(20)
    ]
    cfg = EvolveConfig(problems_per_generation=5, seed=3)
    first = generation_problems(cfg, 1, dataset)
    assert len(first) == 5
    assert len({p.prompt for p in first}) == 5
    assert all(p in dataset for p in first)
    assert generation_problems(cfg, 1, dataset) == first
    assert generation_problems(cfg, 2, dataset) != first
    assert generation_problems(cfg.model_copy(update={"seed": 4}), 1, dataset) != first
    hidden = EvolveConfig(problems_per_generation=5, seed=3, labels="hidden", fitness={"consensus": 1.0})
    stripped = generation_problems(hidden, 1, dataset)
    assert [p.prompt for p in stripped] == [p.prompt for p in first]
    assert all(p.answer is None and p.chain is None for p in stripped)
    # a dataset smaller than a generation gives all its rows
    assert sorted(p.prompt for p in generation_problems(cfg, 1, dataset[:3])) == ["p0", "p1", "p2"]


# --------------------------------------------------------------------------- 7. config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": "hidden"}, "`correctness` fitness term must have weight 0"),
        ({"labels": "oracle"}, "labels must be ground_truth or hidden"),
        ({"fitness": {"accuracy": 1.0}}, r"unknown fitness term\(s\) \['accuracy'\]"),
        ({"fitness": {"correctness": 0.0, "consensus": 0.0}}, "at least one fitness term needs a weight > 0"),
        ({"fitness": {"correctness": -1.0, "consensus": 1.0}}, r"finite and >= 0; bad: \['correctness'\]"),
        ({"fitness": {"consensus": float("inf")}}, r"finite and >= 0; bad: \['consensus'\]"),
        ({"members": ("m01",)}, "needs `out`"),
        ({"executor": "gpu"}, "executor must be local or ray"),
        ({"evolution": {"elite": 1, "mutations": "gaussian"}}, "Extra inputs are not permitted"),
    ],
)
def test_config_refusals(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        EvolveConfig(**kwargs)


def test_config_hidden_labels_with_consensus_accepted() -> None:
    cfg = EvolveConfig(labels="hidden", fitness={"correctness": 0.0, "consensus": 1.0})
    assert cfg.labels == "hidden" and cfg.fitness == {"correctness": 0.0, "consensus": 1.0}


# --------------------------------------------------------------------------- 8. run state


def test_prepare_run_copies_the_population(pop_copy: Path, tmp_path: Path) -> None:
    original = tree_bytes(pop_copy)
    out = tmp_path / "run"
    cfg, root, run = prepare_run(cfg_for(pop_copy, out, generations=3), resume=False)
    assert root == out
    assert tree_bytes(pop_copy) == original
    copied = load_population(out)
    assert copied.names == MEMBERS
    assert copied.base_model_path == load_population(pop_copy).base_model_path
    for name in MEMBERS:
        for fname in ("adapter_config.json", "adapter_model.safetensors"):
            assert (copied.member_dir(name) / fname).read_bytes() == original[f"members/{name}/{fname}"]
    stored = json.loads((out / RUN_FILE).read_text())
    assert stored == run
    assert run["start_generation"] == 0 and run["target_generation"] == 3
    assert EvolveConfig.model_validate(run["config"]) == cfg
    with pytest.raises(EvolveError, match="already exists"):
        prepare_run(cfg_for(pop_copy, out, generations=3), resume=False)


def test_prepare_run_resume(pop_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg, _, run = prepare_run(cfg_for(pop_copy, out, seed=5, generations=2), resume=False)
    resumed, root, again = prepare_run(cfg_for(pop_copy, out, seed=5, generations=2), resume=True)
    assert (root, again) == (out, run)
    assert resumed == cfg
    # only --population/--out: the stored settings are used
    resumed, _, _ = prepare_run(EvolveConfig(population=pop_copy, out=out), resume=True)
    assert resumed.seed == 5 and resumed.heldout_per_domain == 0
    with pytest.raises(EvolveError, match="other settings"):
        prepare_run(cfg_for(pop_copy, out, seed=6, generations=2), resume=True)
    with pytest.raises(EvolveError, match="no population to resume"):
        prepare_run(cfg_for(pop_copy, tmp_path / "elsewhere"), resume=True)
    (out / RUN_FILE).unlink()
    with pytest.raises(EvolveError, match=f"{RUN_FILE} is missing"):
        prepare_run(cfg_for(pop_copy, out, seed=5, generations=2), resume=True)


def test_prepare_run_in_place_refuses_to_restart_an_unfinished_run(pop_copy: Path) -> None:
    _, root, run = prepare_run(cfg_for(pop_copy, generations=2), resume=False)
    assert root == pop_copy and run["target_generation"] == 2
    with pytest.raises(EvolveError, match="interrupted run"):
        prepare_run(cfg_for(pop_copy, generations=2), resume=False)
    (pop_copy / RUN_FILE).write_text("{not json")
    with pytest.raises(EvolveError, match="not a valid run file"):
        prepare_run(cfg_for(pop_copy), resume=False)


def test_prepare_run_member_subset(pop_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "solo"
    prepare_run(cfg_for(pop_copy, out, members=("m01",)), resume=False)
    copied = load_population(out)
    assert copied.names == ["m01"]
    assert copied.manifest.members[0].rank == 8
    assert sorted(p.name for p in (out / "members").iterdir()) == ["m01"]
    with pytest.raises(EvolveError, match=r"\['m09'\] not in"):
        prepare_run(cfg_for(pop_copy, tmp_path / "none", members=("m09",)), resume=False)


def test_a_copy_keeps_the_router_and_the_table_and_a_subset_drops_them(tmp_path: Path) -> None:
    """`--out` copies what the server loads beside the members; a subset cannot use either (positional gates,
    one row a member) and its manifest no longer names them."""
    from ensemble_serve.shared.embedded import EMBEDDED_POPULATION
    from ensemble_serve.shared.population.reliability import read_reliability
    from ensemble_serve.shared.router import load_router

    source = load_population(EMBEDDED_POPULATION)
    out = tmp_path / "whole"
    prepare_run(EvolveConfig(population=EMBEDDED_POPULATION, out=out), resume=False)
    copied = load_population(out)
    assert copied.manifest.router == source.manifest.router
    assert load_router(out / "router", expected_members=copied.names).members == source.names
    assert read_reliability(out / "reliability.json", copied.names, copied.manifest.base_model.name)
    assert not list(out.glob(".*tmp*"))
    part = tmp_path / "part"
    prepare_run(EvolveConfig(population=EMBEDDED_POPULATION, out=part, members=("m00", "m01")), resume=False)
    sub = load_population(part)
    assert sub.names == ["m00", "m01"] and sub.manifest.router is None and sub.manifest.reliability is None
    assert not (part / "router").exists() and not (part / "reliability.json").exists()


# --------------------------------------------------------------------------- 9. commit


@pytest.fixture
def evolver(pop_copy: Path, tmp_path: Path):
    cfg, root, run = prepare_run(cfg_for(pop_copy, tmp_path / "run"), resume=False)
    evolver = Evolver(cfg, root, run, progress=False)
    try:
        yield evolver
    finally:
        evolver.close()


def next_generation(evolver: Evolver):
    """Generation 1: m00 gets new (mutated) weights in a new folder, the others stay."""
    pop = evolver.population
    members = [m.model_copy(update={"path": "members/m00-g1"}) if m.name == "m00" else m for m in pop.manifest.members]
    manifest = pop.manifest.model_copy(update={"generation": 1, "members": members})
    weights = operators.gaussian(load_lora(pop.member_dir("m00")), 0.1, torch.Generator().manual_seed(0))
    record = {"generation": 1, "run_id": evolver.run["run_id"], "members": []}
    return manifest, weights, record


def test_commit_writes_the_next_generation(evolver: Evolver) -> None:
    manifest, weights, record = next_generation(evolver)
    evolver._commit(manifest, {"m00": weights}, record)
    root = evolver.root
    assert evolver.population.manifest.generation == 1
    loaded = load_population(root)
    assert loaded.manifest.generation == 1
    assert loaded.member_dir("m00") == root / "members" / "m00-g1"
    assert same_weights(load_lora(loaded.member_dir("m00")), weights)
    assert sorted(p.name for p in (root / "members").iterdir()) == ["m00-g1", "m01", "m02"]
    assert json.loads((root / PENDING_FILE).read_text()) == record


class RecordingExecutor:
    """Stands in for the executor: records the task calls, returns the adapters untrained."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def map(self, fn, calls, on_done=None, errors="raise"):
        self.calls.extend(calls)
        return [{"adapter": c["adapter"], "losses": [], "trained": False} for c in calls]

    def take_retries(self) -> list[dict]:
        return []

    def shutdown(self) -> None:
        pass


def test_next_generation_manifest_and_commit(evolver: Evolver, pop_weights: dict[str, LoraWeights]) -> None:
    pop = evolver.population
    fitness = {"m00": 0.9, "m01": 0.5, "m02": 0.1}
    elite, replaced, children = evolutionary_step(pop.names, pop_weights, fitness, evolver.cfg, 1)
    (child,) = children
    trained = dict(pop_weights)
    trained["m00"] = operators.gaussian(pop_weights["m00"], 0.1, torch.Generator().manual_seed(1))
    losses = {"m00": [1.0, 0.5], "m01": [], "m02": [0.7]}
    seed, config = evolver.cfg.seed, evolver.run["config_hash"]
    manifest, adapters, info = next_manifest(pop, 1, trained, losses, fitness, elite, replaced, children, seed, config)
    assert manifest.generation == 1
    assert manifest.names == ["m00", "m01", "g1c0"]
    m00, m01, born = manifest.members
    assert (m00.path, m00.fitness, m00.info["train_loss"]) == ("members/m00-g1", 0.9, 0.5)
    assert (m01.path, m01.fitness, m01.info["train_loss"]) == ("members/m01", 0.5, None)
    fitter = max(child.parents, key=lambda p: (fitness[p], -MEMBERS.index(p)))
    assert born.parents == child.parents and born.born_generation == 1
    assert (born.rank, born.alpha) == (child.weights.rank, child.weights.alpha)
    assert born.fitness == pytest.approx(sum(fitness[p] for p in child.parents) / len(child.parents))
    assert born.info["replaced"] == "m02"
    assert born.info["lr"] == pop.member(fitter).info["lr"]
    assert set(adapters) == {"m00", "g1c0"}
    assert [i["status"] for i in info] == ["elite", "elite", "child"]  # default: 2 elites, 1 free slot

    evolver._commit(manifest, adapters, {"generation": 1, "members": info})
    loaded = load_population(evolver.root)
    assert loaded.names == ["m00", "m01", "g1c0"]
    assert sorted(p.name for p in (evolver.root / "members").iterdir()) == ["g1c0", "m00-g1", "m01"]
    assert same_weights(load_lora(loaded.member_dir("g1c0")), child.weights)
    assert same_weights(load_lora(loaded.member_dir("m00")), trained["m00"])

    # the next gradient phase trains every member of generation 1 with its own lr and a derived seed
    evolver.executor = RecordingExecutor()
    weights = load_members(loaded)
    new, got_losses = evolver._train(loaded, weights, {m: [("q", "#### 1")] for m in loaded.names}, 2)
    lrs = [c["lr"] for c in evolver.executor.calls]
    assert lrs == [m.info["lr"] for m in loaded.manifest.members]
    assert len({c["seed"] for c in evolver.executor.calls}) == 3
    assert got_losses == {m: [] for m in loaded.names}
    assert all(new[m] is weights[m] for m in loaded.names)


def test_child_of_a_member_without_lr_can_be_trained(
    pop_copy: Path, tmp_path: Path, pop_weights: dict[str, LoraWeights]
) -> None:
    manifest = read_manifest(pop_copy)
    members = [m.model_copy(update={"info": {k: v for k, v in m.info.items() if k != "lr"}}) for m in manifest.members]
    write_manifest(pop_copy, manifest.model_copy(update={"members": members}))
    evolver = Evolver(*prepare_run(cfg_for(pop_copy, tmp_path / "run"), resume=False), progress=False)
    try:
        pop = evolver.population
        fitness = {"m00": 0.9, "m01": 0.5, "m02": 0.1}
        elite, replaced, children = evolutionary_step(pop.names, pop_weights, fitness, evolver.cfg, 1)
        losses = {m: [] for m in MEMBERS}
        seed, config = evolver.cfg.seed, evolver.run["config_hash"]
        manifest, adapters, _ = next_manifest(
            pop, 1, pop_weights, losses, fitness, elite, replaced, children, seed, config
        )
        evolver._commit(manifest, adapters, {"generation": 1})
        evolver.executor = RecordingExecutor()
        weights = load_members(evolver.population)
        evolver._train(evolver.population, weights, {m: [] for m in manifest.names}, 2)
        assert [c["lr"] for c in evolver.executor.calls] == [2e-3] * 3
    finally:
        evolver.close()


def _fail_on_call(real, n: int, exc: OSError):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) >= n:
            raise exc
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(
    ("target", "fail_at", "exc", "reason"),
    [
        ("copy_file_durable", 1, OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        ("copy_file_durable", 2, OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        ("copy_file_durable", 2, PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
        ("atomic_write_text", 1, OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ],
    ids=["disk-full-first-file", "disk-full-second-file", "permission-second-file", "disk-full-manifest"],
)
def test_commit_failure_keeps_the_previous_generation(
    evolver: Evolver, monkeypatch: pytest.MonkeyPatch, target: str, fail_at: int, exc: OSError, reason: str
) -> None:
    root = evolver.root
    before = tree_bytes(root)
    manifest, weights, record = next_generation(evolver)
    wrapper = _fail_on_call(getattr(population_module, target), fail_at, exc)
    monkeypatch.setattr(population_module, target, wrapper)
    with pytest.raises(EvolveError, match="generation 0 is intact") as info:
        evolver._commit(manifest, {"m00": weights}, record)
    assert reason in str(info.value) and "could not write generation 1" in str(info.value)
    assert isinstance(info.value.__cause__, type(exc))
    monkeypatch.undo()
    assert evolver.population.manifest.generation == 0
    assert load_population(root).manifest.generation == 0
    assert tree_bytes(root) == before  # every member file, the manifest and the run file
    assert sorted(p.name for p in (root / "members").iterdir()) == MEMBERS  # no m00-g1, no temp folder
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    assert not (root / PENDING_FILE).exists()


def test_commit_failure_in_the_temp_folder(evolver: Evolver, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest, weights, record = next_generation(evolver)
    monkeypatch.setattr(
        commit_module, "save_lora", _fail_on_call(commit_module.save_lora, 1, OSError(errno.ENOSPC, "full"))
    )
    with pytest.raises(EvolveError, match="generation 0 is intact"):
        evolver._commit(manifest, {"m00": weights}, record)


# --------------------------------------------------------------------------- 10. executors


@pytest.fixture
def ray_executor():
    pytest.importorskip("ray")
    executor = RayExecutor(None, 2, threads=1)
    try:
        yield executor
    finally:
        executor.shutdown()


@pytest.mark.evolve  # starts a local Ray cluster
def test_local_and_ray_executors_agree(
    tiny_substrate: Path, pop_weights: dict[str, LoraWeights], ray_executor: RayExecutor
) -> None:
    examples = [(p.prompt, p.chain) for p in generate_problems(8, seed=0)]
    base = str(tiny_substrate)
    adapters = {m: lora_to_bytes(pop_weights[m]) for m in ("m00", "m01")}
    train_calls = [
        dict(base=base, adapter=a, examples=examples, steps=2, batch_size=4, lr=1e-3, seed=7, threads=1)
        for a in adapters.values()
    ]
    score_calls = [
        dict(base=base, adapter=a, chains=examples[:5], probes=examples[5:], threads=1) for a in adapters.values()
    ]
    local = LocalExecutor()
    done: list[int] = []
    local_train = local.map(train_member_task, train_calls, on_done=lambda: done.append(1))
    ray_train = ray_executor.map(train_member_task, train_calls, on_done=lambda: done.append(1))
    local_score = local.map(score_member_task, score_calls)
    ray_score = ray_executor.map(score_member_task, score_calls)
    assert len(done) == 4

    for name, lt, rt in zip(adapters, local_train, ray_train):
        assert lt["trained"] and rt["trained"]
        assert len(lt["losses"]) == 2 and all(math.isfinite(x) for x in lt["losses"])
        assert lt["losses"] == rt["losses"]
        assert lt["adapter"]["safetensors"] == rt["adapter"]["safetensors"]
        assert lt["adapter"]["config"] == rt["adapter"]["config"] == adapters[name]["config"]
        assert lt["adapter"]["safetensors"] != adapters[name]["safetensors"]
        trained = lora_from_bytes(lt["adapter"])
        assert trained.rank == RANKS[name] and trained.modules() == pop_weights[name].modules()
        assert not same_weights(trained, pop_weights[name])

    for ls, rs in zip(local_score, ray_score):
        assert len(ls["logprob"]) == 5 and all(lp < 0 for lp in ls["logprob"])
        assert ls["logprob"] == rs["logprob"]
        assert ls["hidden"].shape[0] == ls["output"].shape[0] > 0
        np.testing.assert_array_equal(ls["hidden"], rs["hidden"])
        np.testing.assert_array_equal(ls["output"], rs["output"])
        np.testing.assert_allclose(ls["output"].sum(-1), 1.0, rtol=1e-5)
    # two members judge differently
    assert local_score[0]["logprob"] != local_score[1]["logprob"]


def _bad_input(value: int) -> dict:
    if value < 0:
        raise ValueError(f"bad value {value}")
    return {"value": value}


def test_a_task_that_fails_for_its_own_reasons_stops_or_is_returned_as_an_error():
    local = LocalExecutor()
    calls = [{"value": 1}, {"value": -2}]
    with pytest.raises(TaskFailed, match=r"_bad_input \(task 1\) failed: ValueError: bad value -2"):
        local.map(_bad_input, calls)
    results = local.map(_bad_input, calls, errors="return")
    assert results[0] == {"value": 1} and results[1] == TaskError("_bad_input", 1, "ValueError: bad value -2")
    assert local.take_retries() == []


def test_a_failed_training_task_keeps_the_members_weights(pop_weights: dict[str, LoraWeights]):
    names = ["m00", "m01"]
    new = lora_to_bytes(pop_weights["m01"])
    results = [
        TaskError("train_member_task", 0, "FloatingPointError: nan"),
        {"adapter": new, "losses": [0.5], "trained": True},
    ]
    weights = {"m00": pop_weights["m00"], "m01": pop_weights["m00"]}
    trained, losses = trained_weights(names, weights, results)
    assert trained["m00"] is weights["m00"] and losses["m00"] == []
    assert same_weights(trained["m01"], pop_weights["m01"]) and losses["m01"] == [0.5]
    assert failed_members(names, results) == [{"member": "m00", "error": "FloatingPointError: nan"}]


def test_a_diverging_training_task_fails_instead_of_writing_nan_weights(
    tiny_substrate: Path, pop_weights: dict[str, LoraWeights]
):
    examples = [(p.prompt, p.chain) for p in generate_problems(4, seed=0)]
    adapter = lora_to_bytes(pop_weights["m00"])
    call = dict(
        base=str(tiny_substrate), adapter=adapter, examples=examples, steps=4, batch_size=2, lr=1e30, seed=0, threads=1
    )
    with pytest.raises(FloatingPointError, match="training loss is nan"):
        train_member_task(**call)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"on_train_error": "retry"}, "on_train_error"),
        ({"ray_max_retries": -1}, "ray_max_retries"),
        ({"ray_cpus_per_task": 0}, "ray_cpus_per_task"),
    ],
)
def test_bad_fault_settings_are_refused(kwargs: dict, words: str, tiny_population: Path):
    with pytest.raises(ValidationError, match=words):
        EvolveConfig(population=tiny_population, **kwargs)


@pytest.mark.evolve  # starts a local Ray cluster
def test_a_lost_ray_worker_is_retried_with_the_same_inputs_and_recorded(ray_executor: RayExecutor, tmp_path: Path):
    def dies_once(marker: str, value: int) -> dict:
        import os
        from pathlib import Path

        if value == 2 and not Path(marker).exists():
            Path(marker).write_text("died")
            os._exit(1)  # the worker process dies, as a killed or crashed worker would
        if value < 0:
            raise ValueError(f"bad value {value}")
        return {"value": value * 10}

    marker = str(tmp_path / "died-once")
    calls = [{"marker": marker, "value": v} for v in (1, 2, 3)]
    assert ray_executor.map(dies_once, calls) == [{"value": 10}, {"value": 20}, {"value": 30}]
    assert ray_executor.take_retries() == [
        {"task": "dies_once", "call": 1, "attempt": 1, "error": "WorkerCrashedError"}
    ]
    # a task's own error is not retried: it stops the map, or takes the result's place
    bad = [{"marker": marker, "value": 1}, {"marker": marker, "value": -1}]
    with pytest.raises(TaskFailed, match="bad value -1"):
        ray_executor.map(dies_once, bad)
    results = ray_executor.map(dies_once, bad, errors="return")
    assert results[0] == {"value": 10} and isinstance(results[1], TaskError) and "bad value -1" in results[1].error
    assert ray_executor.take_retries() == []


def test_training_without_examples_returns_the_adapter(
    tiny_substrate: Path, pop_weights: dict[str, LoraWeights]
) -> None:
    adapter = lora_to_bytes(pop_weights["m00"])
    call = dict(
        base=str(tiny_substrate), adapter=adapter, examples=[], steps=3, batch_size=4, lr=1e-3, seed=0, threads=1
    )
    (result,) = LocalExecutor().map(train_member_task, [call])
    assert result == {"adapter": adapter, "losses": [], "trained": False}


def test_evolutionary_step_selects_each_childs_parents_with_its_domain_held_out(pop_weights) -> None:
    # truncation keeps the best half: globally m00 and m01; with "add" held out m02 and m01; with "sub" m00 and m02
    cfg = EvolveConfig(
        evolution=EvolutionConfig(elite=1, offspring=2, selection="truncation", selection_options={"fraction": 0.5})
    )
    fitness = {"m00": 0.9, "m01": 0.5, "m02": 0.1}
    held_out = {"add": {"m00": 0.1, "m01": 0.5, "m02": 0.9}, "sub": {"m00": 0.9, "m01": 0.1, "m02": 0.5}}
    elites, replaced, children = evolutionary_step(MEMBERS, pop_weights, fitness, cfg, 0, held_out)
    assert elites == [0] and replaced == [2, 1]  # elites and replacement use the scalar fitness
    assert [c.held_out for c in children] == ["add", "sub"]  # domains in turn: (g * offspring + k) % D
    assert set(children[0].parents) <= {"m02", "m01"} and children[0].fitter in {"m02", "m01"}
    assert set(children[1].parents) <= {"m00", "m02"} and children[1].fitter in {"m00", "m02"}
    # globally the pool would be m00 and m01: the held-out fitness changed who could be a parent
    assert "m02" in {*children[0].parents, *children[1].parents}
    # the next generation starts the turn where this one stopped
    _, _, later = evolutionary_step(MEMBERS, pop_weights, fitness, cfg, 1, {**held_out, "mod": fitness})
    assert [c.held_out for c in later] == ["sub", "add"]
    # without held-out fitness nothing is held out
    _, _, plain = evolutionary_step(MEMBERS, pop_weights, fitness, cfg, 0)
    assert [c.held_out for c in plain] == [None, None]
