"""vLLM (CPU build) loads the substrate and the members, batches them, and the members differ.

Slow: each engine start takes about 20-40 s on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ensemble_serve.shared.population import load_population

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def engine(embedded_population: Path):
    from ensemble_serve.shared.engine_config import EngineConfig
    from ensemble_serve.shared.offline_engine import OfflineEngine

    eng = OfflineEngine(load_population(embedded_population), EngineConfig(gpu_memory_utilization=0.1))
    yield eng
    del eng


def test_vllm_generates_for_base_and_every_member_in_one_batch(engine):
    from vllm import SamplingParams

    from trainer.tasks.sandbox import generate_problems, verify

    problems = generate_problems(12, seed=99, split="heldout")
    names = engine.population.names
    members = [None] + names
    pairs = [(m, p) for m in members for p in problems]
    outputs = engine.generate(
        [engine.chat_prompt(p.prompt) for _, p in pairs],
        [m for m, _ in pairs],
        SamplingParams(temperature=0, max_tokens=96),
    )
    assert len(outputs) == len(pairs) and all(len(o) == 1 for o in outputs)
    texts: dict[str | None, list[str]] = {m: [] for m in members}
    correct = 0
    for (m, p), (gen,) in zip(pairs, outputs):
        assert gen.tokens > 0 and gen.member == m
        texts[m].append(gen.text)
        correct += verify(p, gen.text).correct
    # every member writes chains ending in the marked answer format most of the time
    marked = sum("#### " in t for ts in texts.values() for t in ts)
    assert marked >= 0.8 * len(pairs)
    # different adapters give different text: no two members' outputs are identical over all prompts
    distinct = {tuple(ts) for ts in texts.values()}
    assert len(distinct) == len(members)
    assert correct > 0


def test_different_members_differ_on_the_same_prompt(engine):
    from vllm import SamplingParams

    prompt = engine.chat_prompt("calc (7+8)*6-9*4")
    names = engine.population.names
    outs = engine.generate([prompt] * len(names), names, SamplingParams(temperature=0, max_tokens=96))
    assert len({o[0].text for o in outs}) >= 2


def test_unknown_member_is_refused(engine):
    from vllm import SamplingParams

    with pytest.raises(KeyError, match="unknown member 'nobody'"):
        engine.generate(["x"], ["nobody"], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="1 prompts but 2 members"):
        engine.generate(["x"], [None, None], SamplingParams(max_tokens=1))


def test_ensemble_train_eval_cli_runs_vllm_over_a_fresh_population(tiny_population: Path, tmp_path: Path):
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.cli",
            "eval",
            "--population",
            str(tiny_population),
            "--per-domain",
            "2",
            "--max-tokens",
            "24",
            "--gpu-memory-utilization",
            "0.1",
            "--out",
            str(out),
            "--update-manifest",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["problems"] == 12
    assert set(result["accuracy"]) == {"(base)", "m00", "m01", "m02"}
    for row in result["accuracy"].values():
        assert set(row) == {"add", "sub", "expr", "sort", "mod", "lookup", "all"}
        assert all(0 <= v <= 1 for v in row.values())
    assert "m00" in proc.stdout and "(base)" in proc.stdout
    pop = load_population(tiny_population)  # the recorded scores keep the manifest valid
    for m in pop.manifest.members:
        assert m.fitness == pytest.approx(result["accuracy"][m.name]["all"])
        assert m.domain_scores["add"] == pytest.approx(result["accuracy"][m.name]["add"])


def test_members_that_forget_are_rolled_back_and_teachers_stay_frozen(
    engine, embedded_population: Path, tiny_population: Path, tmp_path
):
    """Retention on the sandbox's specialists: frozen teachers label their families, the others train on
    those labels plus their own replay at a learning rate that wrecks them, and the forgetting guard
    rolls every one of them back: generation 1 is recorded and every adapter is the one it was."""
    from ensemble_serve.shared.adapters import adapter_digest
    from ensemble_serve.shared.population import read_history, read_manifest
    from trainer.evolve.config import EvolveConfig
    from trainer.evolve.loop import run_evolve
    from trainer.evolve.retention import RetentionConfig

    members = ("m00", "m06", "m01", "m07")  # two add and two sub specialists (levels 3-4)
    cfg = EvolveConfig(
        population=embedded_population,
        out=tmp_path / "pop",
        members=members,
        generations=1,
        labels="hidden",
        fitness={"consensus": 1.0},
        domains=("add", "sub"),
        difficulties=(3, 4),
        problems_per_generation=8,
        samples_per_member=2,
        train_steps=2,
        train_batch_size=4,
        train_lr=0.5,
        evolution={"enabled": False},
        heldout_per_domain=0,
        retention={"replay": 4, "teachers": True, "guard": True, "per_level": 4},
    )
    src = load_population(embedded_population)
    before = {m: adapter_digest(src.member_dir(m)) for m in members}
    root, records = run_evolve(cfg, progress=False, engine=engine)
    tiny_adapter = load_population(tiny_population).member_dir(load_population(tiny_population).names[0])

    (record,) = records
    assert record["generation"] == 1 and read_manifest(root).generation == 1
    teachers = record["teachers"]
    assert set(teachers) == {"add", "sub"} and set(teachers.values()) < set(members)
    learners = [m for m in members if m not in teachers.values()]
    examples = record["train"]["examples"]
    assert all(examples[t] == 0 for t in teachers.values())  # frozen: nothing to learn from
    assert all(examples[m] >= 4 for m in learners)  # the replay alone gives 4
    guard = record["guard"]
    assert all(
        guard["members"][t] == {"before": guard["members"][t]["before"], "trained": False} for t in teachers.values()
    )
    assert all(guard["members"][m]["before"] > 0.02 for m in learners)  # there was something to forget
    assert sorted(guard["rolled_back"]) == sorted(learners)
    assert all(guard["members"][m]["after"] < guard["members"][m]["before"] - 0.02 for m in learners)
    after = load_population(root)
    assert {m: adapter_digest(after.member_dir(m)) for m in members} == before
    assert read_history(root)[-1]["guard"] == guard

    # without teachers every member trains, every member forgets, and every member is rolled back; a control
    # (another specialist's adapter) trains beside them on the union of their examples for the sum of their steps
    control = src.member_dir("m03")
    plain = cfg.model_copy(
        update={
            "out": tmp_path / "plain",
            "labels": "ground_truth",
            "fitness": {"correctness": 1.0},
            "retention": RetentionConfig(guard=True, per_level=4),
            "heldout_per_domain": 2,
            "control": control,
        }
    )
    root, (start, record) = run_evolve(plain, progress=False, engine=engine)
    assert "teachers" not in record and sorted(record["guard"]["rolled_back"]) == sorted(members)
    assert read_manifest(root).generation == 1 and read_history(root)[-1]["generation"] == 1
    after = load_population(root)
    assert {m: adapter_digest(after.member_dir(m)) for m in members} == before
    steps = sum(m["train_steps"] for m in record["members"])
    assert record["control"]["steps"] == steps > 0 and record["control"]["examples"] >= max(
        record["train"]["examples"].values()
    )
    for rec in (start, record):
        assert 0 <= rec["control"]["heldout"]["all"] <= 1 and set(rec["control"]["heldout"]["levels"]) == {"3", "4"}
    run_id = json.loads((root / "evolve-run.json").read_text())["run_id"]
    assert (root / "control" / run_id / "g1" / "adapter_model.safetensors").is_file()
    assert adapter_digest(control) == adapter_digest(src.member_dir("m03"))  # the source is never written

    # a control that does not fit the members is refused before anything runs, and leaves nothing behind
    from trainer.evolve.run import EvolveError

    with pytest.raises(EvolveError, match="control .* does not fit the population's members"):
        run_evolve(plain.model_copy(update={"out": tmp_path / "bad", "control": tiny_adapter}), engine=engine)
    assert not (tmp_path / "bad").exists()


def test_calibrate_evolves_the_routing_table_with_the_members_frozen(engine, embedded_population: Path, tmp_path):
    """Routing-only evolution on the real engine: the members' greedy chains once, then the table's weights
    evolve; the table is written as `evolved` only when its vote beats the labelled one on the check half."""
    from ensemble_serve.shared.adapters import adapter_digest
    from ensemble_serve.shared.router import load_router
    from ensemble_serve.testing.servers import copy_embedded
    from trainer.calibration.command import CalibrateConfig, format_report, run_calibrate

    pop = copy_embedded(tmp_path, as_shipped=True)
    names = load_population(pop).names
    before = {m: adapter_digest(load_population(pop).member_dir(m)) for m in names}
    cfg = CalibrateConfig(
        population=pop,
        per_domain=6,
        domains=("add", "sub"),
        difficulties=(3, 4),
        centroids=False,
        routing_generations=4,
        routing_population=6,
    )
    report = run_calibrate(cfg, engine=engine)
    routing = report["routing"]
    assert routing["generations"] == 4 and len(routing["best_per_generation"]) == 5
    assert routing["best_per_generation"] == sorted(routing["best_per_generation"])
    assert all(0 <= v <= 1 for half in ("fit_accuracy", "check_accuracy") for v in routing[half].values())
    assert routing["kept"] == (routing["check_accuracy"]["evolved"] > routing["check_accuracy"]["start"])
    table = json.loads((pop / "reliability.json").read_text())
    assert table["method"] == report["method"] == ("evolved" if routing["kept"] else "labelled")
    assert "routing evolution (4 generations)" in format_report(report)
    assert {m: adapter_digest(load_population(pop).member_dir(m)) for m in names} == before  # frozen

    # the router's offsets too: fitness is the routed vote of the default request's 4 members
    router_before = (pop / "router" / "router.safetensors").read_bytes()
    report = run_calibrate(cfg.model_copy(update={"routing_gates": True}), engine=engine)
    gates = report["routing"]["gates"]
    assert gates["k"] == 4 and list(gates["offsets"]) == names
    manifest = load_population(pop).manifest
    if report["routing"]["kept"]:  # the router is rewritten with its offsets; it loads for this population
        assert (pop / "router" / "router.safetensors").read_bytes() != router_before
        assert manifest.router["evolved"]["k"] == 4 and "router with its evolved offsets" in format_report(report)
        load_router(pop / "router", expected_members=names, base_model=manifest.base_model.name)
    else:
        assert (pop / "router" / "router.safetensors").read_bytes() == router_before
        assert "evolved" not in manifest.router
    assert {m: adapter_digest(load_population(pop).member_dir(m)) for m in names} == before


def test_the_routed_ensemble_labels_self_play(engine, embedded_population: Path, tmp_path):
    """label_peers: routed on the real engine: the population's router picks each problem's 4 labellers (the
    default request's size), their consensus labels it, the members learn from the chains that reach it."""
    from ensemble_serve.shared.population import read_history
    from trainer.evolve.config import EvolveConfig
    from trainer.evolve.loop import run_evolve

    settings = dict(
        population=embedded_population,
        generations=1,
        labels="hidden",
        fitness={"consensus": 1.0},
        label_rule="consensus",
        min_agreement=0.5,
        domains=("add", "sub"),
        difficulties=(1, 2),
        problems_per_generation=8,
        samples_per_member=1,
        train_steps=1,
        train_batch_size=4,
        evolution={"enabled": False},
        heldout_per_domain=0,
    )
    root, (record,) = run_evolve(
        EvolveConfig(**settings, out=tmp_path / "routed", label_peers="routed"), progress=False, engine=engine
    )
    routed = record["routed_labellers"]
    assert routed["top_k"] == 4 and routed["problems"] == 8
    assert 0.0 <= routed["own_family_share"] <= 0.5  # two specialists a family among the 4 routed members
    assert read_history(root)[-1]["routed_labellers"] == routed
    audit = record["labels_audit"]
    assert audit["labelled"] > 0 and record["train"]["labelled"] > 0  # the routed consensus labelled problems
    # the same generation labelled by every member: same chains (same seeds), other labellers
    _, (plain,) = run_evolve(EvolveConfig(**settings, out=tmp_path / "all"), progress=False, engine=engine)
    assert "routed_labellers" not in plain
    assert plain["train"]["problems"] == record["train"]["problems"]
