"""The baselines that ship (bench/baselines/): plain PEFT LoRA folders with their training cost, servable as-is.

Fast: every folder is a safetensors LoRA with a `training_cost.json` stating how it was made and what it is
compute-matched with; the sandbox's pass the server's adapter check against the embedded substrate (the
name they give their base, `sandbox-substrate`, recognised by the weights' fingerprint), and the same name
on a base with other weights is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ensemble_serve.shared.bring_your_own import AdapterSpec, check_adapter, read_base_shapes
from ensemble_serve.shared.embedded import EMBEDDED_SUBSTRATE
from ensemble_serve.shared.population import PopulationError

BASELINES = Path(__file__).resolve().parent.parent / "bench" / "baselines"
FOLDERS = sorted(p.parent for p in BASELINES.glob("*/*/adapter_config.json"))
SANDBOX = [p for p in FOLDERS if p.parent.name == "sandbox"]


def test_the_sandbox_and_the_real_model_each_ship_a_rank_r_and_a_rank_n_r_generalist():
    names = {f"{p.parent.name}/{p.name}" for p in FOLDERS}
    assert names == {"real/generalist-r8", "real/generalist-r64", "sandbox/generalist-r8", "sandbox/generalist-r48"}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_baseline_is_a_safetensors_lora_with_its_training_cost(folder: Path):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == int(folder.name.split("-r")[-1])
    assert not [p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]  # no pickle
    tensors = load_file(folder / "adapter_model.safetensors")
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    cost = json.loads((folder / "training_cost.json").read_text())
    assert cost["rank"] == cfg["r"] and cost["alpha"] == cfg["lora_alpha"]
    assert set(cost["training_cost"]) == {"steps", "examples", "tokens", "target_tokens"}
    assert all(isinstance(v, int) and v > 0 for v in cost["training_cost"].values())
    assert cost["made_by"] and cost["compute_matched_with"]


@pytest.fixture(scope="module")
def substrate():
    return read_base_shapes(EMBEDDED_SUBSTRATE)


@pytest.mark.parametrize("folder", SANDBOX, ids=lambda p: p.name)
def test_the_sandbox_baselines_pass_the_servers_check_on_the_embedded_substrate(folder: Path, substrate):
    cfg = check_adapter(AdapterSpec(folder.name, folder), substrate)
    assert cfg["base_model_name_or_path"] == "sandbox-substrate" != EMBEDDED_SUBSTRATE.name


def test_the_same_base_name_on_other_weights_is_refused(tmp_path: Path):
    other = tmp_path / "substrate"
    shutil.copytree(EMBEDDED_SUBSTRATE, other)
    (weights,) = other.glob("*.safetensors")
    tensors = load_file(weights)
    key = next(k for k, t in tensors.items() if t.dim() == 2)
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, weights)
    folder = SANDBOX[0]
    with pytest.raises(PopulationError, match="was trained on 'sandbox-substrate'"):
        check_adapter(AdapterSpec(folder.name, folder), read_base_shapes(other))
    assert check_adapter(AdapterSpec(folder.name, folder), read_base_shapes(other), ignore_base_name=True)
