"""The compute-matched control beside an evolve run (trainer/evolve/control.py): what it trains on, where its
weights live, and what is refused. Its training and evaluation on the real engine: tests/test_engine_e2e.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from ensemble_serve.shared.lora import load_lora, lora_to_bytes
from ensemble_serve.shared.population import load_population
from trainer.evolve.config import EvolveConfig
from trainer.evolve.control import ControlArm, ControlError


@pytest.fixture()
def members(embedded_population: Path):
    pop = load_population(embedded_population)
    return pop, {m: load_lora(pop.member_dir(m)) for m in pop.names[:2]}


def test_the_control_trains_on_the_union_of_the_members_examples(members, tmp_path: Path):
    pop, weights = members
    arm = ControlArm(pop.member_dir("m05"), tmp_path, "run1", weights)
    examples = {"m00": [("p1", "c1"), ("p2", "c2")], "m01": [("p2", "c2"), ("p3", "c3")], "m02": []}
    call = arm.call("base", examples, 7, 1, 16, 0.001, 0, 2)
    assert call["examples"] == [("p1", "c1"), ("p2", "c2"), ("p3", "c3")] and call["steps"] == 7
    assert arm.call("base", {"m00": []}, 7, 1, 16, 0.001, 0, 2)["steps"] == 0  # nothing to learn: no steps
    assert call["seed"] != arm.call("base", examples, 7, 2, 16, 0.001, 0, 2)["seed"]  # per generation


def test_the_controls_weights_are_the_last_saved_at_or_before_a_generation(members, tmp_path: Path):
    pop, weights = members
    arm = ControlArm(pop.member_dir("m05"), tmp_path, "run1", weights)
    source = arm.weights(3)
    assert source is arm.source  # nothing saved yet
    arm.save(1, {"adapter": lora_to_bytes(weights["m00"])})
    assert (tmp_path / "control" / "run1" / "g1").is_dir()
    assert arm.weights(1).state_dict().keys() == weights["m00"].state_dict().keys()
    assert all((arm.weights(3).state_dict()[k] == v).all() for k, v in weights["m00"].state_dict().items())
    assert arm.weights(0) is arm.source
    arm.save(1, {"adapter": lora_to_bytes(weights["m01"])})  # a generation run again replaces its folder
    assert all((arm.weights(1).state_dict()[k] == v).all() for k, v in weights["m01"].state_dict().items())
    assert not [p for p in (tmp_path / "control" / "run1").iterdir() if p.name.startswith(".tmp")]


def test_a_control_that_is_missing_or_unreadable_is_refused(members, tmp_path: Path):
    pop, weights = members
    with pytest.raises(ControlError, match="control"):
        ControlArm(tmp_path / "nothing", tmp_path, "run1", weights)
    broken = tmp_path / "broken"
    shutil.copytree(pop.member_dir("m05"), broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ControlError, match="control"):
        ControlArm(broken, tmp_path, "run1", weights)


def test_a_control_without_held_out_problems_is_refused_when_the_config_is_read():
    with pytest.raises(ValidationError, match="heldout_per_domain > 0"):
        EvolveConfig(control="x", heldout_per_domain=0)
