"""`ensemble-train substrate`: the config of the small Llama trained from scratch on the sandbox.

Invariant: a valid config gives a model vLLM's CPU backend can serve (head size a multiple of 32).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from trainer.config.common import ALL_DOMAINS, FrozenConfig, check_difficulties, check_domains


class SubstrateConfig(FrozenConfig):
    """`ensemble-train substrate`: a small Llama trained from scratch on the sandbox."""

    out: Path = Field(Path("runs/substrate"), description="Folder to write the Hugging Face model to.")
    seed: int = Field(0, description="Seed for weights, data order and evaluation problems.")
    hidden_size: int = Field(128, gt=0, description="Model width.")
    intermediate_size: int = Field(384, gt=0, description="MLP width.")
    num_layers: int = Field(4, gt=0, description="Transformer blocks.")
    num_heads: int = Field(4, gt=0, description="Attention heads (hidden_size must divide by it).")
    max_position_embeddings: int = Field(256, ge=64, description="Context length in tokens (characters).")
    steps: int = Field(
        2400, ge=1, description="Optimizer steps. Training is by steps, not time, so a seed gives one model."
    )
    batch_size: int = Field(64, gt=0, description="Sequences per step.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate (linear warm-up, cosine decay to 10%).")
    warmup_steps: int = Field(100, ge=0, description="Warm-up steps.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    domains: tuple[str, ...] = Field(ALL_DOMAINS, description="Sandbox domains to train on.")
    difficulties: tuple[int, ...] = Field((1, 2, 3, 4), description="Difficulty levels (1..4) to train on.")
    eval_per_domain: int = Field(
        64, ge=0, description="Held-out problems per domain for the accuracy report (0: skip)."
    )
    threads: int = Field(2, gt=0, description="CPU threads for torch (fixed, for reproducibility).")

    _domains = field_validator("domains")(check_domains)
    _diffs = field_validator("difficulties")(check_difficulties)

    @model_validator(mode="after")
    def _heads_divide(self) -> SubstrateConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if head_dim % 32:
            # vLLM's CPU attention kernels refuse smaller head sizes (e.g. 16) at the first request
            raise ValueError(
                f"head size hidden_size/num_heads = {head_dim} must be a multiple of 32 (vLLM's CPU attention)"
            )
        return self
