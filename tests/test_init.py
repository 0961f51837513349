"""The starting population: real PEFT adapters, diverse, written as a valid population directory."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from ensemble_serve.shared.population import PopulationError, load_population
from trainer.models.config import InitConfig
from trainer.models.init_population import (
    branch_budget,
    dataset_domains,
    dataset_stream,
    init_population,
    member_plan,
    spec_stream,
    total_cost,
)
from trainer.tasks.sandbox import DOMAINS, Problem, generate_problems, in_shard, save_jsonl


def test_member_plan_is_diverse():
    plan = member_plan(InitConfig())
    assert len(plan) == 8
    assert len({p["seed"] for p in plan}) == 8
    assert [p["rank"] for p in plan] == [4, 8, 16, 4, 8, 16, 4, 8]
    assert {p["focus"] for p in plan} == set(DOMAINS)
    assert len({(p["rank"], p["dropout"], p["lr"]) for p in plan}) == 8  # no two members share all three
    assert all(p["alpha"] == 2 * p["rank"] for p in plan)


def test_tiny_population_is_valid_and_its_members_differ(tiny_population: Path, tiny_substrate: Path):
    pop = load_population(tiny_population)
    manifest = pop.manifest
    assert manifest.generation == 0 and pop.names == ["m00", "m01", "m02"]
    assert [m.rank for m in manifest.members] == [4, 8, 4]
    assert pop.base_model_path == tiny_substrate.resolve()
    assert manifest.base_model.name == tiny_substrate.name and manifest.base_model.sha256
    weights = []
    for m in manifest.members:
        cfg = json.loads((pop.member_dir(m.name) / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == tiny_substrate.name  # an identifier, not a machine path
        card = (pop.member_dir(m.name) / "README.md").read_text()  # PEFT's model card too
        assert str(tiny_substrate) not in card and f"base_model: {tiny_substrate.name}" in card
        assert cfg["r"] == m.rank and cfg["lora_alpha"] == m.alpha
        assert m.info["warmup_steps"] == 4 and m.info["focus_domain"] in DOMAINS
        cost = m.info["training_cost"]  # what the warm-up saw: the population's training compute
        assert cost["steps"] == 4 and cost["examples"] > 0 and cost["tokens"] > cost["target_tokens"] > 0
        tensors = load_file(str(pop.member_dir(m.name) / "adapter_model.safetensors"))
        b = [t for k, t in tensors.items() if "lora_B" in k]
        assert b and any(t.abs().sum() > 0 for t in b)  # the warm-up moved B away from its zero init
        weights.append(tensors)
    key = next(k for k in weights[0] if "q_proj.lora_A" in k)
    assert not torch.equal(weights[0][key], weights[2][key])  # same rank, different seed/data


def test_init_refuses_to_overwrite_and_needs_a_base(tiny_population: Path, tiny_substrate: Path, tmp_path: Path):
    before = (tiny_population / "population.json").read_text()
    with pytest.raises(PopulationError, match="exists"):
        init_population(InitConfig(base=tiny_substrate, out=tiny_population, members=1, warmup_steps=0), progress=False)
    assert (tiny_population / "population.json").read_text() == before
    with pytest.raises(FileNotFoundError, match="no config.json"):
        init_population(InitConfig(base=tmp_path / "nothing", out=tmp_path / "p", members=1), progress=False)
    assert not (tmp_path / "p").exists()


def test_init_from_a_users_jsonl_dataset(tiny_substrate: Path, tmp_path: Path):
    data = tmp_path / "data.jsonl"
    save_jsonl(generate_problems(12, seed=5, domains=["add"]), data)
    out = tmp_path / "pop"
    pop = init_population(
        InitConfig(base=tiny_substrate, out=out, members=2, warmup_steps=2, batch_size=4, data=data), progress=False
    )
    # the dataset's only domain is every member's focus
    assert pop.names == ["m00", "m01"] and all(m.info["focus_domain"] == "add" for m in pop.manifest.members)
    no_chain = tmp_path / "no_chain.jsonl"
    no_chain.write_text('{"prompt": "what is 2+2?", "answer": "4"}\n')
    with pytest.raises(ValueError, match="no rows with a `chain`"):
        init_population(InitConfig(base=tiny_substrate, out=tmp_path / "p2", members=1, data=no_chain), progress=False)
    assert not (tmp_path / "p2").exists()


def _rows(domain: str, n: int, difficulty: int = 1) -> list[Problem]:
    return [
        Problem(
            prompt=f"{domain} {i}?", answer=str(i), chain=f"The answer is {i}.", domain=domain, difficulty=difficulty
        )
        for i in range(n)
    ]


def test_dataset_members_specialise_on_the_datasets_domains(tmp_path: Path):
    rows = _rows("word_add", 30) + _rows("compare", 30) + _rows("notes_one", 30, difficulty=3)
    cfg = InitConfig(base=tmp_path, out=tmp_path / "p", members=4, data=tmp_path / "d.jsonl", focus_weight=0.8)
    domains = dataset_domains(cfg, rows)
    assert domains == ["compare", "notes_one", "word_add"]
    assert [m["focus"] for m in member_plan(cfg, domains)] == ["compare", "notes_one", "word_add", "compare"]
    drawn = list(itertools.islice(dataset_stream(rows, 0, "notes_one", 0.8), 600))
    share = sum(p.domain == "notes_one" for p in drawn) / len(drawn)
    assert 0.8 < share < 0.95  # 0.8 focused + a third of the 0.2 mixed
    # focus levels the dataset has no rows of: the member trains on the whole dataset
    unfocused = list(itertools.islice(dataset_stream(rows, 0, "notes_one", 0.8, focus_difficulties=[1]), 300))
    assert 0.2 < sum(p.domain == "notes_one" for p in unfocused) / 300 < 0.5
    # without a focus, the old shuffled passes
    assert sorted(p.prompt for p in itertools.islice(dataset_stream(rows, 1), 90)) == sorted(p.prompt for p in rows)


def test_dataset_domains_the_dataset_lacks_are_refused(tmp_path: Path):
    rows = _rows("word_add", 3)
    # the sandbox's domain names are checked only without a dataset
    cfg = InitConfig(base=tmp_path, out=tmp_path / "p", data=tmp_path / "d.jsonl", domains=["word_add", "sorting"])
    with pytest.raises(ValueError, match=r"domains \['sorting'\] have no rows"):
        dataset_domains(cfg, rows)
    with pytest.raises(ValidationError, match="unknown domain"):
        InitConfig(base=tmp_path, out=tmp_path / "p", domains=["word_add"])


def test_branch_budget_splits_the_populations_steps():
    cfg = InitConfig(members=8, warmup_steps=64, ranks=(8,), seed_share=0.5)
    assert branch_budget(cfg) == (256, 32)  # 256 + 8 x 32 = 512 = 8 x 64: the same compute as from scratch
    assert branch_budget(InitConfig(members=8, warmup_steps=64)) == (0, 64)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"seed_share": 1.0, "ranks": (8,)}, "less than 1"),
        ({"seed_share": -0.1, "ranks": (8,)}, "greater than or equal to 0"),
        ({"seed_share": 0.5, "ranks": (4, 8)}, "needs one rank"),
    ],
)
def test_a_bad_seed_share_is_refused_when_the_config_is_read(kwargs: dict, words: str):
    with pytest.raises(ValidationError, match=words):
        InitConfig(**kwargs)


def test_branched_members_continue_from_the_shared_seed(tiny_substrate: Path, tmp_path: Path):
    # budget 2 x 2 = 4 steps: the seed takes 3, each member (4 - 3) // 2 = 0, so a member IS its seed's weights
    cfg = InitConfig(
        base=tiny_substrate, out=tmp_path / "p", members=2, warmup_steps=2, batch_size=4, ranks=(4,), seed_share=0.75
    )
    pop = init_population(cfg, progress=False)
    assert pop.names == ["seed", "m00", "m01"]
    seed, m00, _ = pop.manifest.members
    assert (
        seed.info["role"] == "seed" and seed.info["focus_domain"] is None and seed.info["training_cost"]["steps"] == 3
    )
    assert m00.info["role"] == "branch" and m00.parents == ["seed"] and m00.info["training_cost"]["steps"] == 0
    a = load_file(str(pop.member_dir("seed") / "adapter_model.safetensors"))
    b = load_file(str(pop.member_dir("m00") / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)  # the seed trained (B left zero)


def test_each_cut_gives_members_their_own_slice_of_the_same_union():
    base = {"members": 4, "domains": ("add", "sub"), "difficulties": (1, 2), "focus_difficulties": (3, 4)}
    plans = {cut: member_plan(InitConfig(**base, cut=cut)) for cut in ("family", "level", "shard", "seed")}
    assert [m["focus"] for m in plans["family"]] == ["add", "sub", "add", "sub"]
    assert all(m["levels"] == [3, 4] and m["shard"] is None for m in plans["family"])
    assert [m["levels"] for m in plans["level"]] == [[3], [4], [3], [4]] and not any(m["focus"] for m in plans["level"])
    assert [m["shard"] for m in plans["shard"]] == [0, 1, 2, 3] and all(m["shards"] == 4 for m in plans["shard"])
    assert all(m["focus"] is None and m["shard"] is None and m["levels"] == [3, 4] for m in plans["seed"])
    # the same seeds, ranks and learning rates in every cut: only the data differs
    keys = ("seed", "rank", "lr", "dropout")
    assert len({tuple(tuple(m[k] for k in keys) for m in plan) for plan in plans.values()}) == 1

    for cut, plan in plans.items():
        cfg = InitConfig(**base, cut=cut, focus_weight=1.0)  # the member's own slice only
        own = [list(itertools.islice(spec_stream(cfg, m, None), 40)) for m in plan]
        if cut == "family":
            assert all({p.domain for p in rows} == {m["focus"]} for m, rows in zip(plan, own))
        if cut == "level":
            assert all({p.difficulty for p in rows} == set(m["levels"]) for m, rows in zip(plan, own))
        if cut == "shard":
            assert all(in_shard(p.prompt, m["shard"], 4) for m, rows in zip(plan, own) for p in rows)
            assert not set.intersection(*({p.prompt for p in rows} for rows in own))  # disjoint shards
        if cut in ("shard", "seed"):
            assert all({p.domain for p in rows} == {"add", "sub"} for rows in own)
        assert all({p.difficulty for p in rows} <= {3, 4} for rows in own)


def test_a_cut_of_a_users_dataset(tmp_path: Path):
    rows = generate_problems(64, seed=1, domains=["add", "sub"], difficulties=[1, 2])  # with chains
    cfg = InitConfig(members=2, cut="shard", focus_weight=1.0, data=tmp_path / "d.jsonl")
    own = [
        [p.prompt for p in itertools.islice(spec_stream(cfg, m, rows), 64)] for m in member_plan(cfg, ["add", "sub"])
    ]
    assert own[0] and own[1] and not set(own[0]) & set(own[1])
    assert all(in_shard(q, 0, 2) for q in own[0]) and all(in_shard(q, 1, 2) for q in own[1])
    cfg = InitConfig(members=2, cut="level", focus_weight=1.0, data=tmp_path / "d.jsonl", focus_difficulties=(2,))
    plan = member_plan(cfg, ["add", "sub"])
    assert {r.difficulty for r in itertools.islice(spec_stream(cfg, plan[0], rows), 32)} == {2}


def test_an_unknown_cut_is_refused_when_the_config_is_read():
    with pytest.raises(ValidationError, match="cut"):
        InitConfig(cut="domain")


def test_the_manifest_carries_the_populations_total_training_cost(tiny_population: Path):
    manifest = load_population(tiny_population).manifest
    assert manifest.training_cost == total_cost(manifest.members)
    assert manifest.training_cost["steps"] == sum(m.info["training_cost"]["steps"] for m in manifest.members) == 12


def test_an_interrupted_init_keeps_the_members_it_finished(tiny_substrate: Path, tmp_path: Path, monkeypatch):
    import trainer.models.init_population as ip

    kw = {"base": tiny_substrate, "members": 2, "warmup_steps": 3, "batch_size": 4, "ranks": (4,), "seed_share": 0.5}
    ref = init_population(InitConfig(**kw, out=tmp_path / "ref"), progress=False)
    real, calls, stop_at = ip.warm_up_member, [], ["m01"]

    def interrupted(cfg, spec, *a, **k):
        calls.append(spec["name"])
        if spec["name"] in stop_at:
            raise RuntimeError("interrupted")  # as a SIGKILL would: test_init_resume_e2e.py kills the process
        return real(cfg, spec, *a, **k)

    monkeypatch.setattr(ip, "warm_up_member", interrupted)
    cfg = InitConfig(**kw, out=tmp_path / "run")
    with pytest.raises(RuntimeError, match="interrupted"):
        init_population(cfg, progress=False)
    assert calls == ["seed", "m00", "m01"]
    assert not cfg.out.exists() and ip.staging_dir(cfg).is_dir()  # no population yet, the finished members kept

    calls.clear()
    stop_at.clear()
    run = init_population(cfg, progress=False)
    assert calls == ["m01"]  # the seed and m00 were not trained again
    assert not ip.staging_dir(cfg).exists()
    assert _population_bytes(run.root) == _population_bytes(ref.root)


def _population_bytes(root: Path) -> dict[str, object]:
    """Every file of a population, the manifest without its creation time."""
    out: dict[str, object] = {}
    for f in sorted(root.rglob("*")):
        if f.is_file():
            rel = str(f.relative_to(root))
            out[rel] = f.read_bytes()
    manifest = json.loads(out.pop("population.json"))
    manifest.pop("created_at")
    out["population.json"] = manifest
    return out


def test_a_failed_init_leaves_no_staging_folder(tmp_path: Path):
    cfg = InitConfig(base=tmp_path / "missing", out=tmp_path / "pop")
    with pytest.raises(FileNotFoundError):
        init_population(cfg, progress=False)
    assert list(tmp_path.iterdir()) == []
