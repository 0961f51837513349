"""`ensemble-train eval`: the config of the per-domain accuracy report of each member."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from trainer.config.common import ALL_DOMAINS, FrozenConfig, check_difficulties, check_domains


class EvalConfig(FrozenConfig):
    """`ensemble-train eval`: per-domain accuracy of each member, generated with vLLM."""

    population: Path = Field(Path("runs/population"), description="Population directory to evaluate.")
    per_domain: int = Field(64, ge=1, description="Held-out problems per domain.")
    seed: int = Field(1234, description="Seed of the held-out problems.")
    domains: tuple[str, ...] = Field(ALL_DOMAINS, description="Domains to evaluate.")
    difficulties: tuple[int, ...] = Field((1, 2, 3, 4), description="Difficulty levels to evaluate.")
    data: Path | None = Field(None, description="A labelled JSONL dataset to evaluate on instead of the sandbox.")
    include_base: bool = Field(True, description="Also evaluate the base model without an adapter.")
    max_tokens: int = Field(128, gt=0, description="Generation limit per chain.")
    out: Path | None = Field(
        None,
        description="Write the results as JSON here, and the gate heat map as <name>-specialisation.png beside it.",
    )
    gpu_memory_utilization: float = Field(
        0.2, gt=0, le=1, description="vLLM memory fraction (on the CPU backend: of NUMA node 0's memory)."
    )

    _domains = field_validator("domains")(check_domains)
    _diffs = field_validator("difficulties")(check_difficulties)
