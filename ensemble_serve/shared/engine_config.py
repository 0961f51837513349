"""vLLM's engine settings for a population: the one place both halves turn a population into engine arguments.

`EngineConfig` holds the settings (names follow `vllm serve` flags); `engine_kwargs` sizes the LoRA
slots and ranks for the population's members and applies the CPU backend's safe defaults. vLLM is
imported lazily: the pure-Python parts of the project work without it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ensemble_serve.shared.population import Population

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
    max_model_len: int | None = Field(None, ge=16, description="Context length (default: the model's).")
    gpu_memory_utilization: float = Field(
        0.2, gt=0, le=1, description="Memory fraction for vLLM (on the CPU backend, of NUMA node 0's memory)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism.")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM pipeline parallelism.")
    distributed_executor_backend: str | None = Field(None, description="vLLM executor backend: mp or ray.")
    dtype: str = Field("auto", description="Weights dtype (auto: float32 on CPU for the sandbox substrate).")
    enforce_eager: bool = Field(True, description="Skip graph capture/compilation (fast start on CPU).")
    seed: int = Field(0, description="Engine sampling seed.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences scheduled per step.")


def default_lora_rank(population: Population) -> int:
    biggest = max(m.rank for m in population.manifest.members)
    for r in VLLM_LORA_RANKS:
        if r >= biggest:
            return r
    raise ValueError(f"member rank {biggest} exceeds vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")


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
    if _on_cpu():
        # vLLM's CPU sampler dies ("CPU Generator does not use offset", then EngineDeadError)
        # on a seeded request whose prefill is split over engine steps; whole-prompt
        # scheduling means a client's `seed` can never take the engine down.
        kw["enable_chunked_prefill"] = False
    if cfg.distributed_executor_backend:
        kw["distributed_executor_backend"] = cfg.distributed_executor_backend
    return kw


def _dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    # The CPU backend runs float32 reliably; on CUDA let vLLM pick from the config.
    return "float32" if _on_cpu() else "auto"


def _on_cpu() -> bool:
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
