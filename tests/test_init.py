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
)
from trainer.tasks.sandbox import DOMAINS, Problem, generate_problems, save_jsonl


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
