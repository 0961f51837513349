"""`ensemble-train router`: the config of training a population's mixture router and installing it.

The variant, feature and anneal names are the router's own (:mod:`ensemble_serve.shared.router.model`,
where the server loads routers), so a name the server could not load is refused here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from ensemble_serve.shared.router.model import Anneal, Feature, Variant
from trainer.settings import ALL_DOMAINS, FrozenConfig, RemoteSettings, check_difficulties, check_domains


class RouterCommandConfig(FrozenConfig, RemoteSettings):
    """`ensemble-train router`: train a population's mixture router on per-prompt member quality and install it."""

    population: Path = Field(Path("runs/population"), description="Population directory whose router is trained.")
    data: Path | None = Field(
        None,
        description="A labelled JSONL dataset (prompt, answer, optional domain) instead of the sandbox; "
        "heldout_per_domain rows per domain (at most half of each) are held out for evaluation.",
    )
    skip_invalid: bool = Field(
        False, description="Skip malformed dataset lines (reported) instead of refusing the file."
    )
    per_domain: int = Field(48, ge=1, description="Sandbox training problems per domain.")
    heldout_per_domain: int = Field(
        16, ge=0, description="Held-out problems per domain for the accuracy report (0: no evaluation)."
    )
    seed: int = Field(0, description="Seed of the training problems, the router's initial weights and batch order.")
    eval_seed: int = Field(1234, description="Seed of the held-out problems (and of the hold-out split of --data).")
    domains: tuple[str, ...] = Field(ALL_DOMAINS, description="Sandbox domains.")
    difficulties: tuple[int, ...] = Field((1, 2, 3, 4), description="Sandbox difficulty levels.")
    variant: Variant = Field(
        "sigmoid_floor", description="Router variant: softmax (zero-sum baseline) or sigmoid_floor (floored gates)."
    )
    feature: Feature | None = Field(
        None,
        description="Prompt feature: embedding_mean or hidden_mean (default: the variant's own; "
        "softmax: embedding_mean, sigmoid_floor: hidden_mean).",
    )
    hidden_dim: int = Field(0, ge=0, description="Width of one hidden layer of the router; 0 = linear.")
    steps: int = Field(300, ge=1, description="Router optimizer steps (by steps, so a seed gives one router).")
    lr: float = Field(1e-2, gt=0, description="Router AdamW learning rate.")
    floor_max: float = Field(0.1, ge=0, lt=1, description="sigmoid_floor: upper bound of the learnable gate floors.")
    t_start: float = Field(2.0, gt=0, description="sigmoid_floor: gate temperature at the first step.")
    t_end: float = Field(0.5, gt=0, description="sigmoid_floor: temperature at the last step and at inference.")
    anneal: Anneal = Field("cosine", description="Temperature schedule: linear or cosine.")
    top_k: int = Field(
        3, ge=1, description="Members a routed request fans out to (recorded in the manifest; <= member count)."
    )
    max_tokens: int = Field(128, gt=0, description="Generation limit per chain.")
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1, description="vLLM memory fraction.")
    out: Path | None = Field(None, description="Write the results as JSON here.")

    _domains = field_validator("domains")(check_domains)
    _diffs = field_validator("difficulties")(check_difficulties)

    @model_validator(mode="after")
    def _bounded_anneal(self) -> RouterCommandConfig:
        # the router itself refuses this too, but only after the expensive generation phase
        if self.t_end > self.t_start:
            raise ValueError(f"t_end ({self.t_end}) must be <= t_start ({self.t_start}): the anneal only cools")
        return self
