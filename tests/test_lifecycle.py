"""Tests of the adapter lifecycle (`trainer.evolve.lifecycle`) and the per-domain leave-one-out fitness scope.

The lifecycle runs on the real tiny PEFT population from conftest (and copies of its members
made distinct by the project's own mutation operators); the weights of the inheritance test are
built from those members so the nearest neighbour and the exact blended update are known. The
scope tests use evidence built by hand with hand-computed values. Nothing here starts vLLM.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from lora_factories import same_weights
from pydantic import ValidationError

from ensemble_serve.shared.lora import LoraWeights, check_compatible, load_lora
from ensemble_serve.shared.population import load_population, read_manifest, write_manifest
from ensemble_serve.shared.voting import candidate_from_text
from trainer.evolve import operators
from trainer.evolve.config import EvolutionConfig, EvolveConfig
from trainer.evolve.fitness import Evidence, compute_fitness, term_consensus, term_correctness
from trainer.evolve.lifecycle import (
    LifecycleConfig,
    LifecycleResult,
    choose_deaths,
    fresh_adapter,
    lifecycle_step,
    update_distance,
)
from trainer.evolve.loop import Evolver
from trainer.evolve.nextgen import apply_lifecycle, next_manifest, run_lifecycle
from trainer.evolve.records import lifecycle_summary
from trainer.evolve.run import config_hash, prepare_run
from trainer.evolve.step import evolutionary_step
from trainer.settings import RemoteSettings
from trainer.tasks.sandbox import Problem

MEMBERS = ["m00", "m01", "m02"]

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pop_weights(tiny_population: Path) -> dict[str, LoraWeights]:
    population = load_population(tiny_population)
    return {name: load_lora(population.member_dir(name)) for name in population.names}


@pytest.fixture(scope="module")
def six(pop_weights: dict[str, LoraWeights]) -> dict[str, LoraWeights]:
    """Six distinct members p0..p5: the three real ones, then Gaussian-mutated copies of them."""
    out = {}
    for k in range(6):
        src = pop_weights[MEMBERS[k % 3]]
        out[f"p{k}"] = src if k < 3 else operators.gaussian(src, 0.3, torch.Generator().manual_seed(k))
    return out


SIX = [f"p{k}" for k in range(6)]


def assert_update(w: LoraWeights, expected: dict[str, torch.Tensor]) -> None:
    for m in w.modules():
        want = expected[m].double()
        torch.testing.assert_close(w.delta(m).double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-9)


def pad_rank(w: LoraWeights, rank: int) -> LoraWeights:
    """The same update at a higher rank: extra A rows random, extra B columns zero, alpha keeping the scale."""
    gen = torch.Generator().manual_seed(7)
    factors = {}
    for m, (a, b) in w.factors.items():
        extra = rank - w.rank
        factors[m] = (
            torch.cat([a, torch.randn(extra, a.shape[1], generator=gen)]),
            torch.cat([b, torch.zeros(b.shape[0], extra)], dim=1),
        )
    return w.with_factors(factors, rank, w.alpha / w.rank * rank)


def scale_b(w: LoraWeights, factor: float) -> LoraWeights:
    return w.with_factors({m: (a, b * factor) for m, (a, b) in w.factors.items()}, w.rank, w.alpha)


def step(
    weights: dict[str, LoraWeights],
    fitness: dict[str, float],
    cfg: LifecycleConfig,
    *,
    ages: dict[str, int] | None = None,
    elite: list[int] | None = None,
    generation: int = 3,
    seed: int = 0,
) -> LifecycleResult:
    names = list(weights)
    return lifecycle_step(
        names,
        weights,
        fitness,
        ages or dict.fromkeys(names, 1),
        elite if elite is not None else [],
        cfg,
        generation,
        seed,
    )


FIT6 = {"p0": 0.9, "p1": 0.2, "p2": 0.1, "p3": 0.15, "p4": 0.8, "p5": 0.3}


# --------------------------------------------------------------------------- off


@pytest.mark.parametrize(
    "cfg",
    [
        LifecycleConfig(enabled=False, death_fitness=1.0, max_age=1, inherit_alpha=0.5, svd_mutation=0.5),
        LifecycleConfig(enabled=True),  # on, but no death rule and no mutation: nothing qualifies
    ],
    ids=["disabled", "enabled-without-rules"],
)
def test_lifecycle_without_rules_changes_nothing(six: dict[str, LoraWeights], cfg: LifecycleConfig) -> None:
    result = step(six, FIT6, cfg, ages=dict.fromkeys(SIX, 9))
    assert result.empty
    assert (result.deaths, result.inherited, result.mutated, result.changed, result.newborn) == ([], {}, [], {}, [])


# --------------------------------------------------------------------------- death


def test_death_by_fitness_weakest_first_capped_never_elite(six: dict[str, LoraWeights]) -> None:
    cfg = LifecycleConfig(enabled=True, death_fitness=0.25, max_deaths=2)
    # below 0.25: p1 (0.2), p2 (0.1), p3 (0.15); weakest first, two at most
    result = step(six, FIT6, cfg, elite=[0, 4])
    assert result.deaths == ["p2", "p3"]
    assert [(b.slot, b.name) for b in result.newborn] == [(2, "g3r0"), (3, "g3r1")]
    # an elite below the threshold survives; the next weakest takes its place
    assert step(six, FIT6, cfg, elite=[2]).deaths == ["p3", "p1"]
    assert step(six, FIT6, cfg.model_copy(update={"max_deaths": 3})).deaths == ["p2", "p3", "p1"]


def test_death_by_age(six: dict[str, LoraWeights]) -> None:
    ages = {"p0": 5, "p1": 1, "p2": 3, "p3": 4, "p4": 2, "p5": 6}
    cfg = LifecycleConfig(enabled=True, max_age=3, max_deaths=2)
    # older than 3: p0 (0.9, elite), p3 (0.15), p5 (0.3); p2 is exactly 3 and stays
    assert step(six, FIT6, cfg, ages=ages, elite=[0]).deaths == ["p3", "p5"]
    assert step(six, FIT6, cfg.model_copy(update={"max_deaths": 1}), ages=ages, elite=[0]).deaths == ["p3"]
    both = cfg.model_copy(update={"death_fitness": 0.12, "max_deaths": 5})
    assert step(six, FIT6, both, ages=ages, elite=[0]).deaths == ["p2", "p3", "p5"]


def test_newborns_never_die_and_someone_survives(six: dict[str, LoraWeights]) -> None:
    names = SIX[:2]
    cfg = LifecycleConfig(enabled=True, death_fitness=1.0, max_deaths=2)
    fitness = {"p0": 0.1, "p1": 0.2}
    # both qualify, but the population cannot die out: only the weakest goes
    assert choose_deaths(names, fitness, {"p0": 1, "p1": 1}, [], cfg) == ["p0"]
    # a member born this generation (age 0) has no fitness of its own yet
    assert choose_deaths(names, fitness, {"p0": 0, "p1": 1}, [], cfg) == ["p1"]
    with pytest.raises(ValueError, match="non-finite fitness"):
        step(six, {**FIT6, "p3": math.nan}, cfg)


# --------------------------------------------------------------------------- inheritance


def test_inheritance_blends_into_the_nearest_neighbour(pop_weights: dict[str, LoraWeights]) -> None:
    near = pad_rank(pop_weights["m00"], 8)  # m00's update at rank 8, so the blend with a rank-4 update is exact
    dying = pop_weights["m02"]
    far = scale_b(pop_weights["m01"], 10.0)
    weights = {"near": near, "dying": dying, "far": far}
    distances = {m: update_distance(dying, weights[m]) for m in ("near", "far")}
    assert min(distances, key=distances.get) == "near"
    alpha = 0.3
    cfg = LifecycleConfig(enabled=True, death_fitness=0.2, inherit_alpha=alpha)
    result = step(weights, {"near": 0.5, "dying": 0.1, "far": 0.9}, cfg)
    assert result.deaths == ["dying"]
    assert result.inherited == {"dying": "near"}
    assert set(result.changed) == {"near"} and result.mutated == []
    new = result.changed["near"]
    assert (new.rank, new.alpha) == (near.rank, near.alpha) == (8, 16.0)
    assert (new.config["r"], new.config["lora_alpha"]) == (8, 16)
    assert_update(new, {m: (1 - alpha) * near.delta(m) + alpha * dying.delta(m) for m in near.modules()})
    # the inputs are untouched
    assert same_weights(weights["near"], near)


def test_inheritance_off_leaves_the_neighbour(six: dict[str, LoraWeights]) -> None:
    result = step(six, FIT6, LifecycleConfig(enabled=True, death_fitness=0.12), elite=[0])
    assert result.deaths == ["p2"] and result.inherited == {} and result.changed == {}


# --------------------------------------------------------------------------- SVD mutation


def test_svd_mutation_changes_exactly_the_non_elite_survivors(six: dict[str, LoraWeights]) -> None:
    cfg = LifecycleConfig(enabled=True, svd_mutation=0.1)
    result = step(six, FIT6, cfg, elite=[0, 4])
    assert result.deaths == [] and result.newborn == []
    assert result.mutated == ["p1", "p2", "p3", "p5"]
    assert set(result.changed) == set(result.mutated)
    for m in result.mutated:
        new, old = result.changed[m], six[m]
        assert (new.rank, new.alpha) == (old.rank, old.alpha)
        rel = update_distance(new, old) / update_distance(old, scale_b(old, 0.0))
        assert 0.0 < rel < 1.0
    again = step(six, FIT6, cfg, elite=[0, 4])
    other = step(six, FIT6, cfg, elite=[0, 4], seed=1)
    assert all(same_weights(result.changed[m], again.changed[m]) for m in result.mutated)
    assert not any(same_weights(result.changed[m], other.changed[m]) for m in result.mutated)


def test_dying_members_are_not_mutated(six: dict[str, LoraWeights]) -> None:
    cfg = LifecycleConfig(enabled=True, death_fitness=0.12, svd_mutation=0.1, inherit_alpha=0.5)
    result = step(six, FIT6, cfg, elite=[0])
    assert result.deaths == ["p2"]
    assert result.mutated == ["p1", "p3", "p4", "p5"]
    neighbour = result.inherited["p2"]
    assert neighbour in result.changed  # blended, then mutated unless it is the elite


# --------------------------------------------------------------------------- reallocation


def test_reallocation_best_copies_the_fittest(six: dict[str, LoraWeights]) -> None:
    cfg = LifecycleConfig(enabled=True, death_fitness=0.12)
    (born,) = step(six, FIT6, cfg, elite=[0]).newborn
    assert (born.slot, born.name, born.parents) == (2, "g3r0", ["p0"])
    assert same_weights(born.weights, six["p0"])
    assert all(born.weights.factors[m][0] is not six["p0"].factors[m][0] for m in six["p0"].modules())

    mutated = step(six, FIT6, cfg.model_copy(update={"svd_mutation": 0.05}), elite=[0])
    (twin,) = mutated.newborn
    assert twin.parents == ["p0"] and not same_weights(twin.weights, six["p0"])
    to_best = update_distance(twin.weights, six["p0"])
    assert 0.0 < to_best < 0.5 * update_distance(six["p0"], scale_b(six["p0"], 0.0))
    assert to_best < min(update_distance(twin.weights, six[m]) for m in SIX if m != "p0")


def test_reallocation_best_skips_newborn_children(six: dict[str, LoraWeights]) -> None:
    # p4 has the best (inherited) fitness but was born this generation: the fittest scored member is copied
    ages = {**dict.fromkeys(SIX, 2), "p4": 0}
    fitness = {**FIT6, "p4": 0.95}
    (born,) = step(six, fitness, LifecycleConfig(enabled=True, death_fitness=0.12), ages=ages).newborn
    assert born.parents == ["p0"]


def test_reallocation_fresh_starts_as_the_base_model(six: dict[str, LoraWeights]) -> None:
    fitness = {**FIT6, "p1": 0.05}  # p1 has rank 8, unlike the fittest
    cfg = LifecycleConfig(enabled=True, death_fitness=0.08, reallocation="fresh")
    result = step(six, fitness, cfg, elite=[0])
    assert result.deaths == ["p1"]
    (born,) = result.newborn
    dead = six["p1"]
    assert (born.slot, born.name, born.parents) == (1, "g3r0", [])
    assert (born.weights.rank, born.weights.alpha) == (dead.rank, dead.alpha) == (8, 16.0)
    assert born.weights.config == dead.config
    check_compatible([dead, born.weights], ["dead", "born"])
    for m in dead.modules():
        a, b = born.weights.factors[m]
        assert torch.count_nonzero(b) == 0 and torch.count_nonzero(born.weights.delta(m)) == 0
        bound = 1 / math.sqrt(a.shape[1])  # PEFT: kaiming_uniform_(a=sqrt(5)) on (rank, in)
        assert float(a.abs().max()) <= bound and float(a.abs().max()) > 0.5 * bound
    same = fresh_adapter(dead, torch.Generator().manual_seed(0))
    again = fresh_adapter(dead, torch.Generator().manual_seed(0))
    assert same_weights(same, again)
    assert not same_weights(same, fresh_adapter(dead, torch.Generator().manual_seed(1)))


def test_lifecycle_is_deterministic_per_seed(six: dict[str, LoraWeights]) -> None:
    cfg = LifecycleConfig(
        enabled=True, death_fitness=0.25, inherit_alpha=0.2, svd_mutation=0.05, reallocation="best", max_deaths=2
    )
    first = step(six, FIT6, cfg, elite=[0])
    again = step(six, FIT6, cfg, elite=[0])
    later = step(six, FIT6, cfg, elite=[0], generation=4)
    assert (first.deaths, first.inherited, first.mutated) == (again.deaths, again.inherited, again.mutated)
    assert all(same_weights(first.changed[m], again.changed[m]) for m in first.changed)
    assert all(same_weights(x.weights, y.weights) for x, y in zip(first.newborn, again.newborn))
    assert [b.name for b in later.newborn] == ["g4r0", "g4r1"]
    assert not same_weights(first.newborn[0].weights, later.newborn[0].weights)


# --------------------------------------------------------------------------- in the evolve loop


@pytest.fixture
def pop_copy(tiny_population: Path, tiny_substrate: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pop"
    shutil.copytree(tiny_population, dst)
    manifest = read_manifest(dst)
    base = manifest.base_model.model_copy(update={"path": str(tiny_substrate.resolve())})
    write_manifest(dst, manifest.model_copy(update={"base_model": base}))
    return dst


def test_lifecycle_in_the_next_generation(pop_copy: Path, tmp_path: Path, pop_weights: dict[str, LoraWeights]) -> None:
    lifecycle = LifecycleConfig(enabled=True, death_fitness=0.6, inherit_alpha=0.2, svd_mutation=0.05)
    cfg = EvolveConfig(
        population=pop_copy,
        out=tmp_path / "run",
        heldout_per_domain=0,
        evolution=EvolutionConfig(elite=1, offspring=1),
        lifecycle=lifecycle,
    )
    evolver = Evolver(*prepare_run(cfg, resume=False), progress=False)
    try:
        pop = evolver.population
        fitness = {"m00": 0.9, "m01": 0.5, "m02": 0.1}
        elite, replaced, children = evolutionary_step(pop.names, pop_weights, fitness, cfg, 1)
        assert (elite, replaced, [c.name for c in children]) == ([0], [2], ["g1c0"])
        life = run_lifecycle(pop, 1, pop_weights, fitness, replaced, children, cfg)
        # m01 (0.5 < 0.6, age 1) dies; the child g1c0 is below the threshold too but was born now; m00 is elite
        assert life.deaths == ["m01"]
        assert life.mutated == ["g1c0"]
        neighbour = life.inherited["m01"]
        candidates = {"m00": pop_weights["m00"], "g1c0": children[0].weights}
        assert neighbour == min(candidates, key=lambda m: update_distance(pop_weights["m01"], candidates[m]))
        (born,) = life.newborn
        assert (born.slot, born.name, born.parents) == (1, "g1r0", ["m00"])

        losses = {m: [] for m in MEMBERS}
        manifest, adapters, info = next_manifest(
            pop, 1, pop_weights, losses, fitness, elite, replaced, children, cfg.seed, evolver.run["config_hash"]
        )
        manifest, adapters, info = apply_lifecycle(manifest, adapters, info, life, 1, cfg)
        assert manifest.names == ["m00", "g1r0", "g1c0"]
        m00, newborn, child = manifest.members
        assert m00.path == ("members/m00-g1" if neighbour == "m00" else "members/m00")
        assert (newborn.parents, newborn.born_generation, newborn.rank) == (["m00"], 1, pop_weights["m00"].rank)
        assert newborn.info["lifecycle"] == "reallocated" and newborn.info["replaced"] == "m01"
        assert newborn.info["lr"] == pop.member("m00").info["lr"] and newborn.fitness == 0.9
        assert set(adapters) == {"g1r0", "g1c0"} | ({"m00"} if neighbour == "m00" else set())
        statuses = {i["name"]: i["status"] for i in info}
        assert statuses["g1r0"] == "reallocated"
        assert statuses["g1c0"] == ("inherited" if neighbour == "g1c0" else "mutated")
        assert statuses["m00"] == ("inherited" if neighbour == "m00" else "elite")
        assert "svd" in next(i for i in info if i["name"] == "g1c0")["operators"]
        summary = lifecycle_summary(life, lifecycle)
        assert summary == {
            "deaths": ["m01"],
            "inherited": {"m01": neighbour},
            "mutated": ["g1c0"],
            "newborn": [{"name": "g1r0", "replaced": "m01", "parents": ["m00"], "reallocation": "best"}],
        }
        json.dumps(summary)

        evolver._commit(manifest, adapters, {"generation": 1, "members": info, "lifecycle": summary})
        loaded = load_population(evolver.root)
        assert loaded.names == ["m00", "g1r0", "g1c0"]
        assert same_weights(load_lora(loaded.member_dir("g1r0")), born.weights)
        assert same_weights(load_lora(loaded.member_dir("g1c0")), life.changed["g1c0"])
        assert "m01" not in {p.name for p in (evolver.root / "members").iterdir()}
    finally:
        evolver.close()


def test_default_lifecycle_and_scope_keep_the_config_hash() -> None:
    cfg = EvolveConfig()
    placement = {"executor", "ray_address", "ray_workers", "tensorboard", *RemoteSettings.model_fields}  # added later
    data = cfg.model_dump(mode="json", exclude={"generations", *placement})
    for key in ("population", "out", "lifecycle", "fitness_scope", "label_top_k"):
        data.pop(key)
    before = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    assert config_hash(cfg) == before  # the hash of a config written before these switches existed
    assert config_hash(EvolveConfig(lifecycle=LifecycleConfig(enabled=True))) != before
    assert config_hash(EvolveConfig(fitness_scope="domain_loo")) != before


# --------------------------------------------------------------------------- fitness scope


def scoped_evidence(rows: list[tuple[str, str | None]], answers: dict[str, list[str]]) -> Evidence:
    """rows: (domain, truth) per problem; answers: member -> its one answer per problem."""
    problems = [Problem(prompt=f"q{i}", answer=t, chain=None, domain=d, difficulty=1) for i, (d, t) in enumerate(rows)]
    candidates = {
        m: [[candidate_from_text(m, 0, f"{m} works\n#### {a}", 4, "auto")] for a in row] for m, row in answers.items()
    }
    return Evidence(members=list(answers), problems=problems, candidates=candidates, labels_visible=True)


# a big domain of 5 problems and two small ones of 2: x is right on the big one only, y on the small ones only,
# z on all (so the consensus is the truth everywhere and the consensus term equals correctness)
DOMAINS = ["arith"] * 5 + ["sort"] * 2 + ["mod"] * 2
TRUTH = [str(i) for i in range(9)]


def big_and_small() -> Evidence:
    wrong = [str(100 + i) for i in range(9)]
    x = [TRUTH[i] if d == "arith" else wrong[i] for i, d in enumerate(DOMAINS)]
    y = [wrong[i] if d == "arith" else TRUTH[i] for i, d in enumerate(DOMAINS)]
    return scoped_evidence(list(zip(DOMAINS, TRUTH)), {"x": x, "y": y, "z": list(TRUTH)})


def test_domain_loo_changes_the_ranking_by_hand() -> None:
    ev = big_and_small()
    weights = {"correctness": 1.0}
    plain = compute_fitness(ev, weights)
    loo = compute_fitness(ev, weights, "domain_loo")
    assert (plain.scope, plain.scope_note, loo.scope, loo.scope_note) == ("global", None, "domain_loo", None)
    assert plain.fitness == pytest.approx({"x": 5 / 9, "y": 4 / 9, "z": 1.0})
    # without arith, sort, mod: x 0/4, 5/7, 5/7; y 4/4, 2/7, 2/7
    hand = {"x": (0 + 5 / 7 + 5 / 7) / 3, "y": (1 + 2 / 7 + 2 / 7) / 3, "z": 1.0}
    assert loo.fitness == pytest.approx(hand)
    assert loo.terms["correctness"] == pytest.approx(hand)
    assert loo.terms["consensus"] == pytest.approx(hand)
    assert plain.fitness["x"] > plain.fitness["y"] and loo.fitness["x"] < loo.fitness["y"]
    # terms that are not per-problem means keep their global value
    assert loo.terms["contribution"] == pytest.approx(plain.terms["contribution"])


def test_domain_loo_with_one_domain_is_global() -> None:
    ev = big_and_small()
    one = Evidence(
        members=ev.members,
        problems=[Problem(p.prompt, p.answer, None, "arith", 1) for p in ev.problems],
        candidates=ev.candidates,
        labels_visible=True,
    )
    weights = {"correctness": 1.0, "consensus": 0.5, "contribution": 0.2}
    plain, loo = compute_fitness(one, weights), compute_fitness(one, weights, "domain_loo")
    assert loo.fitness == plain.fitness and loo.terms == plain.terms  # the very same computation
    assert loo.scope == "global" and "at least two domains" in loo.scope_note


def test_domain_loo_is_defined_without_problems_or_labels_outside_a_domain() -> None:
    empty = Evidence(members=["x", "y"], problems=[], candidates={"x": [], "y": []}, labels_visible=True)
    result = compute_fitness(empty, {"consensus": 1.0}, "domain_loo")
    assert result.fitness == {"x": 0.0, "y": 0.0} and result.scope == "global"
    # sort has no labels: without arith nothing is left to check correctness on, so only "without sort" counts
    ev = scoped_evidence(
        [("arith", "1"), ("arith", "2"), ("sort", None)],
        {"x": ["1", "9", "5"], "y": ["1", "2", "5"], "z": ["1", "2", "5"]},
    )
    assert term_correctness(ev) == pytest.approx({"x": 1 / 3, "y": 2 / 3, "z": 2 / 3})  # the unlabelled chain misses
    loo = compute_fitness(ev, {"correctness": 1.0}, "domain_loo")
    assert loo.scope == "domain_loo"
    assert loo.terms["correctness"] == pytest.approx({"x": 1 / 2, "y": 1.0, "z": 1.0})
    # consensus (1, 2, 5) is defined on both complements: without arith all agree, without sort x misses one of two
    assert term_consensus(ev) == pytest.approx({"x": 2 / 3, "y": 1.0, "z": 1.0})
    assert loo.terms["consensus"] == pytest.approx({"x": (1.0 + 0.5) / 2, "y": 1.0, "z": 1.0})
    with pytest.raises(ValueError, match="unknown fitness scope"):
        compute_fitness(ev, {"correctness": 1.0}, "per_domain")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inherit_alpha": -0.1}, "greater than or equal to 0"),
        ({"inherit_alpha": 1.5}, "less than or equal to 1"),
        ({"max_age": 0}, "greater than or equal to 1"),
        ({"reallocation": "random"}, "'best' or 'fresh'"),
        ({"svd_mutation": -1.0}, "greater than or equal to 0"),
        ({"death_fitness": math.inf}, "finite number"),
        ({"max_deaths": 0}, "greater than or equal to 1"),
    ],
)
def test_lifecycle_config_refusals(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LifecycleConfig(**kwargs)


def test_evolve_config_lifecycle_and_scope() -> None:
    cfg = EvolveConfig.model_validate(
        {"lifecycle": {"enabled": True, "max_age": 3, "reallocation": "fresh"}, "fitness_scope": "domain_loo"}
    )
    assert cfg.lifecycle == LifecycleConfig(enabled=True, max_age=3, reallocation="fresh")
    assert EvolveConfig().lifecycle.enabled is False and EvolveConfig().fitness_scope == "global"
    with pytest.raises(ValidationError, match="'global' or 'domain_loo'"):
        EvolveConfig(fitness_scope="per_domain")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        EvolveConfig.model_validate({"lifecycle": {"death_rate": 0.1}})


def test_domain_loo_gives_one_fitness_per_held_out_domain_by_hand() -> None:
    loo = compute_fitness(big_and_small(), {"correctness": 1.0}, "domain_loo")
    # without arith, sort, mod: x 0/4, 5/7, 5/7; y 4/4, 2/7, 2/7; z always right
    want = {
        "arith": {"x": 0.0, "y": 1.0, "z": 1.0},
        "mod": {"x": 5 / 7, "y": 2 / 7, "z": 1.0},
        "sort": {"x": 5 / 7, "y": 2 / 7, "z": 1.0},
    }
    assert set(loo.held_out) == set(want)
    for d, row in want.items():
        assert loo.held_out[d] == pytest.approx(row)
    assert compute_fitness(big_and_small(), {"correctness": 1.0}).held_out == {}  # global scope: none


def test_on_a_balanced_batch_the_domain_loo_scalar_is_the_global_one() -> None:
    # each problem lies outside D - 1 of the D domains: with equal counts, the mean of the held-out
    # means is the global mean; so only the per-domain fitness (parent selection) differs
    rows = [("a", "1"), ("a", "2"), ("b", "3"), ("b", "4"), ("c", "5"), ("c", "6")]
    answers = {
        "x": ["1", "2", "9", "9", "9", "6"],
        "y": ["9", "2", "3", "4", "9", "9"],
        "z": ["1", "2", "3", "4", "5", "6"],
    }
    ev = scoped_evidence(rows, answers)
    weights = {"correctness": 1.0, "consensus": 0.5}
    plain, loo = compute_fitness(ev, weights), compute_fitness(ev, weights, "domain_loo")
    assert loo.fitness == pytest.approx(plain.fitness)
    # without a: x is right on 1 of 4 problems and agrees with the consensus (3, 4, 9, 6) on 2 of 4
    assert loo.held_out["a"]["x"] == pytest.approx((1.0 * 1 / 4 + 0.5 * 2 / 4) / 1.5)
    assert loo.held_out["a"] != pytest.approx(plain.fitness)
