"""The starting population: real PEFT adapters, diverse, written as a valid population directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ensemble_serve.shared.population import PopulationError, load_population
from trainer.models.config import InitConfig
from trainer.models.init_population import init_population, member_plan
from trainer.tasks.sandbox import DOMAINS, generate_problems, save_jsonl


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
        assert cfg["r"] == m.rank and cfg["lora_alpha"] == m.alpha
        assert m.info["warmup_steps"] == 4 and m.info["focus_domain"] in DOMAINS
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
    assert pop.names == ["m00", "m01"] and all(m.info["focus_domain"] is None for m in pop.manifest.members)
    no_chain = tmp_path / "no_chain.jsonl"
    no_chain.write_text('{"prompt": "what is 2+2?", "answer": "4"}\n')
    with pytest.raises(ValueError, match="no rows with a `chain`"):
        init_population(InitConfig(base=tiny_substrate, out=tmp_path / "p2", members=1, data=no_chain), progress=False)
    assert not (tmp_path / "p2").exists()
