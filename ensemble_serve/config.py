"""`ensemble-serve up` settings: a YAML file (`--config`) and flags, into one frozen model.

Names follow `vllm serve` where they overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ensemble_serve.shared.bring_your_own import AdapterSpec, parse_lora_module
from ensemble_serve.shared.embedded import EMBEDDED_NAME, EMBEDDED_POPULATION, EMBEDDED_REAL_NAME
from ensemble_serve.shared.engine_config import VLLM_LORA_RANKS, EngineConfig, parse_bytes
from ensemble_serve.shared.vllm_api import check_server_urls

API_KEY_ENV = "ENSEMBLE_SERVE_API_KEY"
BYO_NAME = "ensemble"  # the ensemble's default name when serving --model with --lora-modules


class ServeConfig(BaseModel):
    """Everything `ensemble-serve up` needs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    population: Path | None = Field(
        None, description="Population directory to serve (default: the embedded ensemble, see --embedded)."
    )
    embedded: Literal["real", "sandbox"] = Field(
        "real",
        description="The embedded ensemble served without --population or --model: real (specialists of "
        f"SmolLM2-135M-Instruct, model {EMBEDDED_REAL_NAME}; its base is converted into the user cache on first "
        f"use) or sandbox (the project's from-scratch toy, model {EMBEDDED_NAME}).",
    )
    model: str | None = Field(
        None,
        description="Bring your own: a Hugging Face base model folder whose --lora-modules are served as the "
        "ensemble (no population directory needed; see `ensemble-train import` to make one).",
    )
    lora_modules: tuple[str, ...] = Field(
        (),
        description="With --model, the adapters, as `vllm serve` takes them: NAME=PATH or "
        '\'{"name": NAME, "path": PATH, "base_model_name": BASE}\', several after one flag or the flag repeated.',
        json_schema_extra={"nargs": True},
    )
    ignore_base_name: bool = Field(
        False,
        description="With --model: serve adapters whose base_model_name_or_path names another model (their "
        "LoRA shapes are still checked against the base).",
    )
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    api_key: str | None = Field(
        None,
        description=f"Require this key as `Authorization: Bearer KEY` on every /v1 and /admin route (or set {API_KEY_ENV}).",
    )
    served_model_name: str | None = Field(
        None,
        description=f"The ensemble's model name (default: {EMBEDDED_REAL_NAME} or {EMBEDDED_NAME} for the embedded ones, "
        "else the population folder's name).",
    )
    default_members: int | None = Field(
        None, ge=1, description="Members an ensemble request fans out to when it does not say (default: all)."
    )
    watch: bool = Field(True, description="Reload the population when its population.json changes.")
    watch_interval: float = Field(2.0, gt=0, description="Seconds between checks of population.json.")
    semantic_threshold: float = Field(
        0.8, ge=-1, le=1, description="Cosine similarity at which free-form answers count as the same."
    )
    route: bool = Field(
        True,
        description="Use the population's router (if it has one) to pick the top-k members and weight votes.",
    )
    mixture_cache: int = Field(
        32,
        ge=1,
        description="Mixed adapters (ensemble.mode mixture) kept per server: a route repeated within this many "
        "distinct routes costs nothing extra.",
    )
    request_timeout: float = Field(
        600.0,
        gt=0,
        description="Seconds a request may take at most (a request's own `timeout` may ask for less); past it "
        "the request's engine work is aborted and it gets a 504.",
    )
    shutdown_grace: float = Field(
        20.0,
        ge=0,
        description="On SIGTERM or Ctrl-C: seconds the requests in flight may still finish before they are "
        "aborted (503); a second signal exits at once.",
    )
    max_request_bytes: int = Field(
        4 * 2**20, ge=1024, description="Largest request body accepted; a larger one gets a 413 before it is parsed."
    )
    max_loras: int | None = Field(
        None, ge=1, description="vLLM: adapters in one batch (default: all members, at most 16)."
    )
    max_lora_rank: int | None = Field(
        None, description=f"vLLM: largest adapter rank, one of {list(VLLM_LORA_RANKS)} (default: fits the members)."
    )
    max_cpu_loras: int | None = Field(
        None, ge=1, description="vLLM: adapters cached in host memory (default: all members)."
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="vLLM: context length (default: the model's; on the CPU, at most what the KV cache holds).",
    )
    gpu_memory_utilization: float = Field(
        0.2,
        gt=0,
        le=1,
        description="vLLM: memory fraction on a GPU (on the CPU the KV cache is sized by --kv-cache-memory-bytes).",
    )
    kv_cache_memory_bytes: str | None = Field(
        None,
        description="vLLM: KV cache size, bytes or with a binary K/M/G suffix as vLLM's flag (on the CPU, default 1G).",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: tensor parallelism.")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM: pipeline parallelism.")
    distributed_executor_backend: str | None = Field(
        None, description="vLLM: executor backend for parallelism, mp or ray."
    )
    dtype: str = Field("auto", description="vLLM: weights dtype (auto: float32 on the CPU).")
    enforce_eager: bool = Field(True, description="vLLM: skip graph capture (fast start on the CPU).")
    max_num_seqs: int = Field(64, ge=1, description="vLLM: sequences scheduled per step.")
    seed: int = Field(0, description="vLLM: sampling seed of the engine.")
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")
    remote: tuple[str, ...] = Field(
        (),
        description="Base URLs of vLLM OpenAI servers that serve the members (remote mode); empty: in-process engine.",
    )
    remote_api_key: str | None = Field(
        None, description="API key of the remote vLLM servers (their --api-key), sent as a bearer token."
    )

    @field_validator("lora_modules")
    @classmethod
    def _lora_modules(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for text in v:
            parse_lora_module(text)  # ValueError naming the value
        return v

    @model_validator(mode="after")
    def _bring_your_own(self) -> ServeConfig:
        if self.model is not None and not self.lora_modules:
            raise ValueError("--model needs --lora-modules NAME=PATH ... (the adapters to serve as the ensemble)")
        if self.lora_modules and self.model is None:
            raise ValueError("--lora-modules needs --model BASE (the base model folder the adapters were trained on)")
        if self.model is not None and self.population is not None:
            raise ValueError("give --population or --model with --lora-modules, not both")
        if self.model is not None and self.remote:
            raise ValueError(
                "--model/--lora-modules serve in-process; for remote servers import the adapters with "
                "`ensemble-train import` and pass --population with --remote"
            )
        return self

    def adapter_specs(self) -> list[AdapterSpec]:
        """The --lora-modules, parsed."""
        return [parse_lora_module(t) for t in self.lora_modules]

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, v: int | None) -> int | None:
        if v is not None and v not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of {list(VLLM_LORA_RANKS)}, got {v}")
        return v

    @field_validator("distributed_executor_backend")
    @classmethod
    def _backend(cls, v: str | None) -> str | None:
        if v is not None and v not in ("mp", "ray", "uni", "external_launcher"):
            raise ValueError(f"must be mp, ray, uni or external_launcher, got {v!r}")
        return v

    @field_validator("kv_cache_memory_bytes", mode="before")
    @classmethod
    def _kv_bytes(cls, v: Any) -> str | None:
        if v is None:
            return None
        parse_bytes(str(v))  # refused here, with the flag's name, rather than when the engine starts
        return str(v)

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError(f"unknown log level {v!r}")
        return v.lower()

    @field_validator("remote")
    @classmethod
    def _remote(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return check_server_urls(v)

    @property
    def population_dir(self) -> Path:
        """The population to serve; the embedded real one is a working copy that `up` makes (its base is in the cache)."""
        if self.population is not None:
            return self.population
        if self.embedded == "sandbox":
            return EMBEDDED_POPULATION
        raise ValueError(
            "the embedded real population is served from a working copy: start it with `ensemble-serve up`"
        )

    @property
    def ensemble_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model is not None:
            return BYO_NAME
        if self.population is None:
            return EMBEDDED_NAME if self.embedded == "sandbox" else EMBEDDED_REAL_NAME
        return Path(self.population).resolve().name

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            max_cpu_loras=self.max_cpu_loras,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=parse_bytes(self.kv_cache_memory_bytes),
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            distributed_executor_backend=self.distributed_executor_backend,
            dtype=self.dtype,
            enforce_eager=self.enforce_eager,
            seed=self.seed,
            max_num_seqs=self.max_num_seqs,
        )
