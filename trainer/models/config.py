"""Settings of the commands that build models: `ensemble-train substrate` and `ensemble-train init`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from trainer.settings import ALL_DOMAINS, FrozenConfig, check_difficulties, check_domains


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
    difficulties: tuple[int, ...] = Field(
        (1, 2, 3, 4),
        description="Difficulty levels to train on (recorded as `trained_difficulties` in substrate.json).",
    )
    system_rate: float = Field(
        0.0, ge=0, le=1, description="Share of training examples that start with a system message (0: none)."
    )
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


class InitConfig(FrozenConfig):
    """`ensemble-train init`: a diverse starting population of LoRA adapters on the substrate."""

    base: Path = Field(
        Path("runs/substrate"), description="Base model folder (the substrate, or any Llama-like HF model)."
    )
    base_name: str | None = Field(
        None, description="Identifier recorded as the members' base model (default: the folder name)."
    )
    out: Path = Field(Path("runs/population"), description="Population directory to create.")
    members: int = Field(8, ge=1, le=64, description="Population size.")
    seed: int = Field(0, description="Population seed; member i uses seed + i.")
    ranks: tuple[int, ...] = Field((4, 8, 16), description="LoRA ranks, assigned round-robin (diversity).")
    alpha_over_rank: float = Field(2.0, gt=0, description="lora_alpha = alpha_over_rank * rank.")
    dropouts: tuple[float, ...] = Field((0.0, 0.05, 0.1), description="LoRA dropouts, assigned round-robin.")
    lrs: tuple[float, ...] = Field((1e-3, 2e-3, 4e-3), description="Warm-up learning rates, assigned round-robin.")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        description="Linear layers that carry LoRA.",
    )
    warmup_steps: int = Field(120, ge=0, description="Supervised warm-up steps per member (0: untrained adapters).")
    seed_share: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Branch-Train-Merge: the share of the budget (members x warmup_steps) spent first on one shared "
        "seed adapter trained on every domain alike; members then continue from its weights for the rest, and "
        "the seed stays in the population as its general expert (member `seed`). 0: members start from scratch.",
    )
    cut: Literal["family", "level", "shard", "seed"] = Field(
        "family",
        description="How the members' own data is cut (each member draws `focus_weight` of its warm-up from its own "
        "slice, the rest from everything): `family`, member i's slice is domain i mod #domains at "
        "`focus_difficulties`; `level`, one level of `focus_difficulties` (i mod #levels) in every domain; `shard`, "
        "every domain at `focus_difficulties`, only the problems whose prompt hashes to shard i of #members (a "
        "random split); `seed`, every domain at `focus_difficulties` for every member, which then differ by seed "
        "and data order only (a deep ensemble).",
    )
    batch_size: int = Field(32, gt=0, description="Warm-up batch size.")
    focus_weight: float = Field(
        0.6,
        ge=0,
        le=1,
        description="Share of a member's warm-up data drawn from its focus domain (member i focuses on domain i mod #domains); "
        "the rest is drawn from all domains.",
    )
    domains: tuple[str, ...] = Field(
        ALL_DOMAINS,
        description="Domains of the warm-up data (with `data`: the dataset's `domain` values that members "
        "focus on; default: all of the dataset's).",
    )
    difficulties: tuple[int, ...] = Field((1, 2, 3, 4), description="Difficulty levels of the warm-up data.")
    focus_difficulties: tuple[int, ...] | None = Field(
        None,
        description="Levels of a member's focus domain (specialists: harder levels than the rest); "
        "default: `difficulties`.",
    )
    system_rate: float = Field(
        0.0, ge=0, le=1, description="Share of warm-up examples that start with a system message (0: none)."
    )
    data: Path | None = Field(
        None,
        description="A JSONL dataset (prompt, answer, domain, chain) used instead of the sandbox; rows need a chain.",
    )
    overwrite: bool = Field(False, description="Replace an existing population directory.")
    threads: int = Field(2, gt=0, description="CPU threads for torch.")

    _diffs = field_validator("difficulties")(check_difficulties)

    @model_validator(mode="after")
    def _sandbox_domains(self) -> InitConfig:
        # with `data`, the domains are the dataset's own (checked against its rows when it is read)
        if self.data is None:
            check_domains(self.domains)
        elif not self.domains:
            raise ValueError("at least one domain is needed")
        return self

    @model_validator(mode="after")
    def _branch_needs_one_shape(self) -> InitConfig:
        if self.seed_share > 0 and len(set(self.ranks)) > 1:
            raise ValueError(
                f"seed_share > 0 needs one rank for every member (they continue the seed), got {list(self.ranks)}"
            )
        return self

    @field_validator("focus_difficulties")
    @classmethod
    def _focus_diffs(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return None if v is None else check_difficulties(v)

    @field_validator("ranks", "dropouts", "lrs")
    @classmethod
    def _non_empty(cls, v: tuple) -> tuple:
        if not v:
            raise ValueError("needs at least one value")
        return v

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(r < 1 or r > 64 for r in v):
            raise ValueError(f"ranks must be in 1..64, got {list(v)}")
        return v
