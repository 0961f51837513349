"""Small random LoRA adapters under PEFT's key names, shared by the operator, mixture, evolve and lifecycle tests."""

from __future__ import annotations

import math

import safetensors.torch
import torch

from ensemble_serve.shared.lora import LoraWeights, lora_from_bytes

DIM = 16
PREFIX = "base_model.model.model.layers.{layer}.self_attn.{module}"
HEAD = "base_model.model.lm_head"
BASE = "tiny-substrate"
TOL = {"atol": 2e-5, "rtol": 1e-4}


def peft_config(rank: int, alpha: float, modules: tuple[str, ...], base: str, rslora: bool = False) -> dict:
    """The adapter_config.json PEFT writes for a plain LoRA (the keys that matter, as PEFT spells them)."""
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "target_modules": list(modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": rslora,
    }


def peft_state_dict(
    rank: int,
    seed: int,
    layers: int = 2,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
    head: bool = False,
    dim: int = DIM,
) -> dict[str, torch.Tensor]:
    """Random factors under PEFT's key names; B is non-zero, as after some training."""
    g = torch.Generator().manual_seed(seed)
    prefixes = [PREFIX.format(layer=i, module=m) for i in range(layers) for m in modules]
    if head:
        prefixes.append(HEAD)
    out = {}
    for p in prefixes:
        out[p + ".lora_A.weight"] = torch.randn(rank, dim, generator=g) / math.sqrt(dim)
        out[p + ".lora_B.weight"] = torch.randn(dim, rank, generator=g) * 0.1
    return out


def payload(config: dict, tensors: dict[str, torch.Tensor]) -> dict:
    return {"config": config, "safetensors": safetensors.torch.save(tensors)}


def make_lora(
    rank: int,
    seed: int,
    alpha: float | None = None,
    base: str = BASE,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
    head: bool = False,
    dim: int = DIM,
    rslora: bool = False,
) -> LoraWeights:
    """A LoraWeights parsed from a PEFT-style state dict and config (same path as `load_lora`)."""
    config = peft_config(rank, 2 * rank if alpha is None else alpha, modules, base, rslora)
    return lora_from_bytes(payload(config, peft_state_dict(rank, seed, modules=modules, head=head, dim=dim)))


def same_weights(a: LoraWeights, b: LoraWeights) -> bool:
    """Same rank, alpha, modules and bit-identical factors."""
    return (
        a.rank == b.rank
        and a.alpha == b.alpha
        and a.modules() == b.modules()
        and all(torch.equal(x, y) for m in a.modules() for x, y in zip(a.factors[m], b.factors[m]))
    )
