"""Helpers for tests/test_population.py: a tiny real base model and real PEFT adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

BASE_NAME = "tiny-llama"


def tiny_llama_config() -> Any:
    """A Llama config small enough to build and run in milliseconds."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )


def make_base_model(out: Path, *, seed: int = 0) -> Path:
    """Save a randomly initialised tiny Llama (safetensors) to ``out``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(out)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    return out


def load_base_model(base_dir: Path) -> Any:
    """Load the tiny base model from ``base_dir`` in eval mode."""
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()


def make_adapter(base_dir: Path, out: Path, *, rank: int, alpha: float, seed: int, base_name: str = BASE_NAME) -> Path:
    """Save a LoRA adapter with non-zero random A and B to ``out``.

    ``base_model_name_or_path`` in adapter_config.json is rewritten to
    ``base_name`` (the manifest's base model name).
    """
    import peft
    import torch

    torch.manual_seed(seed)
    model = load_base_model(base_dir)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(model, cfg).save_pretrained(out)
    set_adapter_config(out, base_model_name_or_path=base_name)
    return out


def read_adapter_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text())


def set_adapter_config(folder: Path, **changes: Any) -> None:
    """Rewrite keys of ``folder/adapter_config.json``."""
    cfg = read_adapter_config(folder)
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_raw_manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "population.json").read_text())


def write_raw_manifest(root: Path, data: dict[str, Any]) -> None:
    """Write population.json bypassing the schema (to build invalid manifests)."""
    (root / "population.json").write_text(json.dumps(data, indent=2))


def logits_with_adapter(base_dir: Path, adapter_dir: Path | None) -> Any:
    """Logits of a fixed prompt from the base model, optionally with a PEFT adapter."""
    import peft
    import torch

    model = load_base_model(base_dir)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def copy_population(src: Path, dst: Path) -> Path:
    """A copy of a population directory whose relative base-model path still points at the same base."""
    import os

    from ensemble_serve.shared.population import read_manifest, write_manifest

    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    base = (src / manifest.base_model.path).resolve()
    ref = manifest.base_model.model_copy(update={"path": os.path.relpath(base, dst)})
    write_manifest(dst, manifest.model_copy(update={"base_model": ref}))
    return dst
