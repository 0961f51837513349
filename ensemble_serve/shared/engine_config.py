"""vLLM's engine settings for a population: the one place both halves turn a population into engine arguments.

`EngineConfig` holds the settings (names follow `vllm serve` flags); `engine_kwargs` sizes the LoRA
slots and ranks for the population's members and applies the CPU backend's safe defaults. vLLM is
imported lazily: the pure-Python parts of the project work without it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ensemble_serve.shared.population import Population

log = logging.getLogger("ensemble_serve")

# vLLM's accepted values for max_lora_rank; an adapter may have any rank up to it.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class EngineConfig(BaseModel):
    """Engine settings; names follow `vllm serve` flags where they overlap."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_loras: int | None = Field(None, ge=1, description="Adapters in one batch (default: all members, at most 16).")
    max_lora_rank: int | None = Field(
        None, description="Largest adapter rank (default: the smallest vLLM value >= the largest member rank)."
    )
    max_cpu_loras: int | None = Field(
        None, ge=1, description="Adapters kept in host memory (default: max(max_loras, members))."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context length (default: the model's, or on the CPU what the KV cache holds)."
    )
    gpu_memory_utilization: float = Field(
        0.2, gt=0, le=1, description="Memory fraction for vLLM on a GPU (on the CPU the KV cache is sized by bytes)."
    )
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1 << 20, description=f"KV cache size in bytes (on the CPU, default {1 << 30} = 1 GiB)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism.")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM pipeline parallelism.")
    distributed_executor_backend: str | None = Field(None, description="vLLM executor backend: mp or ray.")
    dtype: str = Field("auto", description="Weights dtype (auto: float32 on CPU for the sandbox substrate).")
    enforce_eager: bool = Field(True, description="Skip graph capture/compilation (fast start on CPU).")
    seed: int = Field(0, description="Engine sampling seed.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences scheduled per step.")


def smallest_vllm_rank(need: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds adapters of rank `need`; ValueError above its largest."""
    for r in VLLM_LORA_RANKS:
        if r >= need:
            return r
    raise ValueError(f"LoRA rank {need} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def default_lora_rank(population: Population) -> int:
    return smallest_vllm_rank(max(m.rank for m in population.manifest.members))


def engine_kwargs(population: Population, cfg: EngineConfig) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` / `AsyncEngineArgs` serving `population`."""
    if population.base_model_path is None and population.manifest.base_model.hub_id is None:
        raise ValueError(f"population {population.root} names no base model path or hub id")
    model = str(population.base_model_path or population.manifest.base_model.hub_id)
    n = len(population.manifest.members)
    max_loras = cfg.max_loras or min(n, 16)
    rank = cfg.max_lora_rank or default_lora_rank(population)
    if rank not in VLLM_LORA_RANKS:
        raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}, got {rank}")
    too_big = [m.name for m in population.manifest.members if m.rank > rank]
    if too_big:
        raise ValueError(f"members {too_big} have rank above max_lora_rank={rank}")
    kw: dict[str, Any] = dict(
        model=model,
        enable_lora=True,
        max_loras=max_loras,
        max_lora_rank=rank,
        max_cpu_loras=cfg.max_cpu_loras or max(max_loras, n),
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        tensor_parallel_size=cfg.tensor_parallel_size,
        pipeline_parallel_size=cfg.pipeline_parallel_size,
        dtype=_dtype(cfg.dtype),
        enforce_eager=cfg.enforce_eager,
        seed=cfg.seed,
        max_num_seqs=cfg.max_num_seqs,
    )
    if cfg.max_model_len:
        kw["max_model_len"] = cfg.max_model_len
    if cfg.kv_cache_memory_bytes:
        kw["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
    if on_cpu():
        sizing = size_context(population.base_model_path, cfg)
        if sizing.message:
            log.warning(sizing.message)
        kw["kv_cache_memory_bytes"] = sizing.kv_cache_bytes
        if sizing.max_model_len is not None:
            kw["max_model_len"] = sizing.max_model_len
        # vLLM's CPU sampler dies ("CPU Generator does not use offset", then EngineDeadError)
        # on a seeded request whose prefill is split over engine steps; whole-prompt
        # scheduling means a client's `seed` can never take the engine down.
        kw["enable_chunked_prefill"] = False
    if cfg.distributed_executor_backend:
        kw["distributed_executor_backend"] = cfg.distributed_executor_backend
    return kw


# ---------------------------------------------------------------- the context length on the CPU

CPU_KV_CACHE_BYTES = 1 << 30  # the CPU backend's KV cache when not set (vLLM's own sizing refuses real models here)
_GIB = float(1 << 30)


class ContextSizeError(ValueError):
    """The context length asked for does not fit in the KV cache; the message names the flags and values that fit."""


@dataclass(frozen=True)
class ContextSizing:
    """What the CPU engine gets: a KV cache of a known size, and the context length it holds."""

    kv_cache_bytes: int
    max_model_len: int | None  # None: the model's own (it fits)
    kv_bytes_per_token: int
    message: str


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(value: str | int | None) -> int | None:
    """'1G', '512M', '1073741824' -> bytes (binary suffixes, as vLLM's flag reads K/M/G/T); ValueError otherwise."""
    if value is None or isinstance(value, int):
        return value
    text = value.strip()
    unit = text[-1:].upper() if text[-1:].isalpha() else ""
    number = text[: len(text) - len(unit)] if unit else text
    try:
        if unit not in _UNITS:
            raise ValueError
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"a size in bytes, optionally with a K/M/G/T suffix, e.g. 1G or 512M; got {value!r}") from None
    if size < 1 << 20:
        raise ValueError(f"a KV cache of at least 1M is needed; got {value!r}")
    return size


def kv_bytes_per_token(config: dict[str, Any], dtype_bytes: int) -> int:
    """K and V of every layer for one token, from a Hugging Face config.json."""
    text = config.get("text_config") or config
    layers = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or text["hidden_size"] // heads)
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def size_context(model_dir: str | Path | None, cfg: EngineConfig) -> ContextSizing:
    """On the CPU: the KV cache (`--kv-cache-memory-bytes`, default 1 GiB) and the context length it holds.

    vLLM's CPU backend otherwise sizes the cache as a fraction of the machine's memory minus what the
    worker already holds, which leaves a 135M-parameter model with 0.15 GiB and a startup trace. Here the
    size is fixed up front, so the context length follows from it: the model's own when it fits, else
    the largest multiple of 256 tokens that fits (said in one line). A `--max-model-len` that does not
    fit is refused with a ContextSizeError that names a value that fits and the cache size it would need.
    """
    kv = cfg.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
    config_file = Path(model_dir or "") / "config.json"
    try:
        config = json.loads(config_file.read_text())
        per_token = kv_bytes_per_token(config, 4 if _dtype(cfg.dtype) == "float32" else 2)
        model_len = int((config.get("text_config") or config)["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return ContextSizing(kv, cfg.max_model_len, 0, "")  # not a config we can read: vLLM decides
    fits = kv // per_token // 256 * 256
    need = lambda tokens: f"{tokens * per_token / _GIB:.2f} GiB"  # noqa: E731
    if cfg.max_model_len is not None:
        if cfg.max_model_len > kv // per_token:
            raise ContextSizeError(
                f"--max-model-len {cfg.max_model_len} needs a KV cache of {need(cfg.max_model_len)} but it has "
                f"{kv / _GIB:.2f} GiB: pass --max-model-len {fits} or less, or --kv-cache-memory-bytes "
                f"{_mib(cfg.max_model_len * per_token)}M or more"
            )
        return ContextSizing(kv, cfg.max_model_len, per_token, "")
    if model_len <= kv // per_token:
        return ContextSizing(kv, None, per_token, "")
    if fits < 256:
        raise ContextSizeError(
            f"the KV cache of {kv / _GIB:.2f} GiB holds {kv // per_token} tokens of this model: pass "
            f"--kv-cache-memory-bytes {_mib(4096 * per_token)}M for a 4096-token context"
        )
    message = (
        f"context length {fits} tokens (the model allows {model_len}): what a KV cache of {kv / _GIB:.2f} GiB "
        f"holds; --kv-cache-memory-bytes {_mib(model_len * per_token)}M gives the model's full context"
    )
    return ContextSizing(kv, fits, per_token, message)


def _mib(size: int) -> int:
    """Whole MiB, rounded up, with a block of slack (vLLM allocates the cache in blocks)."""
    return -(-size // (1 << 20)) + 1


def _dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    # The CPU backend runs float32 reliably; on CUDA let vLLM pick from the config.
    return "float32" if on_cpu() else "auto"


def on_cpu() -> bool:
    """Whether vLLM runs on the CPU backend here (no CUDA device)."""
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return True


def no_vllm(e: ModuleNotFoundError) -> Exception:
    """vLLM itself missing: name the extra that brings it (any other missing module: the error as it is)."""
    if e.name != "vllm":
        return e
    return RuntimeError(
        "vLLM is not installed: install the `cpu` extra (pip install 'ensemble-serve[cpu]'), "
        "or the `cuda` extra on a CUDA machine"
    )
