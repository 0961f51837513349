"""`ensemble-train ablate`: the config of the two-level factorial over the switches.

Invariants: every cell's `evolve` and `router` settings are validated (as :class:`EvolveConfig`
and :class:`RouterTrainConfig`) when this config is read, so no cell fails on a setting after
others have run; the harness's own keys cannot be set here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from trainer.evolve.config import EvolveConfig
from trainer.evolve.lifecycle import LifecycleConfig
from trainer.router.train import RouterTrainConfig
from trainer.settings import FrozenConfig

ABLATION_FACTORS: dict[str, tuple[str, str]] = {
    "router": ("softmax", "sigmoid_floor"),
    "scope": ("global", "domain_loo"),
    "lifecycle": ("off", "on"),
    "evolution": ("off", "on"),
    "init": ("random", "pre_aligned"),
    "inheritance": ("blend", "none"),
    "alignment": ("aligned", "misaligned"),
}
"""The switches the ablation can vary, each with its (reference, test) levels: an effect is ref - test.

The last two are the decomposition study's probes: ``inheritance none`` is the alpha = 0
counterfactual (the lifecycle runs with ``inherit_alpha`` 0: members still die, nothing of theirs
is blended into a neighbour); ``alignment misaligned`` starts from the pre-aligned members with
their weights rotated among the focus families, so each member holds what another family's
specialist learned and self-play trains it on its own (declared) family: members trained on the
wrong families.
"""

DEFAULT_LEVELS = {
    "router": "sigmoid_floor",
    "scope": "global",
    "lifecycle": "off",
    "evolution": "on",
    "init": "pre_aligned",
    "inheritance": "blend",
    "alignment": "aligned",
}
"""Levels of the switches that an ablation neither varies nor fixes."""

NICHE_SHARING = ("niche", "experts")
"""`share_chains` settings under which a member's `focus_domain` decides what it learns."""

HARNESS_EVOLVE_KEYS = ("population", "out", "members", "generations", "seed", "fitness_scope", "heldout_per_domain")
"""EvolveConfig fields the ablation sets per cell itself (so they cannot be in its `evolve` section)."""


class AblateConfig(FrozenConfig):
    """`ensemble-train ablate`: a two-level factorial over the switches, n seeds per cell, a fixed budget per cell."""

    out: Path = Field(Path("runs/ablate"), description="Folder of the ablation: cells, evolved populations, report.")
    population: Path | None = Field(
        None,
        description="The pre-aligned starting population (default: the embedded sandbox population); a path with "
        "{seed} names one population per seed (e.g. runs/recipe/seed{seed}-s0.5-family).",
    )
    factors: tuple[str, ...] = Field(
        ("router", "scope", "lifecycle"),
        description="Switches to vary: router, scope, lifecycle, evolution, init, inheritance, alignment.",
    )
    design: Literal["full", "half"] = Field(
        "full",
        description="full: all 2^k cells; half: the 2^(k-1) cells of the defining relation I = product of all factors.",
    )
    fixed: dict[str, str] = Field(
        default_factory=dict,
        description="Levels of the switches that are not varied (defaults: router sigmoid_floor, scope global, "
        "lifecycle off, evolution on, init pre_aligned, inheritance blend, alignment aligned).",
    )
    seeds: tuple[int, ...] = Field((0, 1, 2), description="Seeds; every cell runs once per seed (paired by seed).")
    generations: int = Field(
        2, ge=1, description="Evolve generations per cell: the fixed step budget with evolve.train_steps."
    )
    evolve: dict[str, Any] = Field(
        default_factory=lambda: {
            "lifecycle": {"death_fitness": 0.42, "max_deaths": 1, "inherit_alpha": 0.5, "svd_mutation": 0.02}
        },
        description="EvolveConfig settings shared by every cell (not population/out/generations/seed/fitness_scope).",
    )
    router: dict[str, Any] = Field(
        default_factory=dict, description="RouterTrainConfig settings shared by every cell (not variant/seed)."
    )
    router_objective: Literal["quality", "mixture"] = Field(
        "quality",
        description="quality: fit gates to each member's per-prompt quality (softmax over members of their reference-"
        "chain log-likelihoods); mixture: train end to end through the mixture on the chains' NLL.",
    )
    quality_tau: float = Field(
        0.1, gt=0, description="Temperature of the quality softmax over members' mean token log-likelihoods."
    )
    router_per_domain: int = Field(32, ge=1, description="Sandbox training prompts per domain for the router.")
    heldout_per_domain: int = Field(
        16, ge=1, description="Held-out prompts per domain whose reference chains are scored."
    )
    eval_seed: int = Field(1234, description="Seed of the held-out problems (the same for every cell and seed).")
    top_k: int | None = Field(
        None, ge=1, description="Members kept in each prompt's mixture (None: all, weighted by the normalised gates)."
    )
    interactions: tuple[tuple[str, str], ...] = Field(
        (), description="Pairs (A, B): report A's effect at each level of B and their difference."
    )
    base_perturbation: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="The base-perturbation probe: each cell is also scored with Gaussian noise of this size "
        "(relative to each base weight matrix's RMS, seeded by eval_seed) added to the base model, under the same "
        "router and adapters; the report gives every effect on the perturbed base beside the plain one (None: off).",
    )
    threads: int = Field(2, gt=0, description="torch threads of the router training and scoring.")
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1, description="vLLM memory fraction.")

    @field_validator("factors")
    @classmethod
    def _known_factors(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [f for f in v if f not in ABLATION_FACTORS]
        if unknown:
            raise ValueError(f"unknown factor(s) {unknown}; known: {list(ABLATION_FACTORS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"a factor is listed twice: {list(v)}")
        if not v:
            raise ValueError("an ablation needs at least one factor")
        return v

    @field_validator("population")
    @classmethod
    def _population(cls, v: Path | None) -> Path | None:
        if v is not None:
            try:
                str(v).format(seed=0)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"population {str(v)!r}: the only placeholder a path may hold is {{seed}} ({type(e).__name__}: {e})"
                ) from None
        return v

    def population_for(self, seed: int) -> Path | None:
        """The starting population of a seed: ``population`` with {seed} filled in (None: the embedded one)."""
        return None if self.population is None else Path(str(self.population).format(seed=seed))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"a seed is listed twice: {list(v)}")
        if len(v) < 2:
            raise ValueError(f"a paired t-test across seeds needs at least 2 seeds, got {list(v)}")
        return v

    @field_validator("fixed", mode="before")
    @classmethod
    def _yaml_switches(cls, v: Any) -> Any:
        # YAML reads a bare on/off as a boolean; accept it for the switches whose levels are off/on
        if isinstance(v, dict):
            return {
                k: ("on" if x else "off") if isinstance(x, bool) and ABLATION_FACTORS.get(k) == ("off", "on") else x
                for k, x in v.items()
            }
        return v

    @field_validator("fixed")
    @classmethod
    def _fixed(cls, v: dict[str, str]) -> dict[str, str]:
        for name, level in v.items():
            if name not in ABLATION_FACTORS:
                raise ValueError(f"fixed: unknown factor {name!r}; known: {list(ABLATION_FACTORS)}")
            if level not in ABLATION_FACTORS[name]:
                raise ValueError(f"fixed: {name} has levels {list(ABLATION_FACTORS[name])}, got {level!r}")
        return v

    @field_validator("evolve")
    @classmethod
    def _evolve(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(v) & set(HARNESS_EVOLVE_KEYS))
        if taken:
            raise ValueError(f"evolve: {taken} are set by the harness for each cell; remove them")
        EvolveConfig(**v)  # unknown or bad settings are refused before any cell runs
        return v

    @field_validator("router")
    @classmethod
    def _router(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(v) & {"variant", "seed"})
        if taken:
            raise ValueError(f"router: {taken} are set by the harness (the router factor and the cell's seed)")
        RouterTrainConfig(**v)
        return v

    def _level_used(self, factor: str, level: str) -> bool:
        """Whether some cell runs with this switch at this level (varied, or fixed there)."""
        return factor in self.factors or self.fixed.get(factor, DEFAULT_LEVELS[factor]) == level

    def _check_probes(self) -> None:
        """The probes must change something: refused when their test level would equal the reference."""
        if self._level_used("inheritance", "none"):
            if not self._level_used("lifecycle", "on"):
                raise ValueError(
                    "inheritance: the alpha = 0 counterfactual needs the lifecycle (vary it, or fix lifecycle: on)"
                )
            life = LifecycleConfig(**{**self.evolve.get("lifecycle", {}), "enabled": True})
            if not life.inherit_alpha:
                raise ValueError(
                    "inheritance: evolve.lifecycle.inherit_alpha is 0, so 'blend' and 'none' are the same run; "
                    "set it above 0"
                )
            if life.death_fitness is None and life.max_age is None:
                raise ValueError(
                    "inheritance: no member can die (set evolve.lifecycle.death_fitness or max_age), so nothing is "
                    "ever inherited"
                )
        if self._level_used("alignment", "misaligned"):
            share = self.evolve.get("share_chains", True)
            if share not in NICHE_SHARING and not self.evolve.get("niche", False):
                raise ValueError(
                    "alignment: with share_chains "
                    f"{share!r} and niche off nothing in the evolve run reads a member's focus family, so a "
                    "misaligned start is the aligned one with its members renamed; set evolve.share_chains to "
                    "niche or experts (members learn their own family), or evolve.niche: true"
                )
            if not self._level_used("init", "pre_aligned"):
                raise ValueError("alignment: a random start has nothing to misalign; fix init: pre_aligned")

    @model_validator(mode="after")
    def _design(self) -> AblateConfig:
        both = sorted(set(self.factors) & set(self.fixed))
        if both:
            raise ValueError(f"{both} cannot be both varied (factors) and fixed")
        k = len(self.factors)
        if self.design == "half" and k < 3:
            raise ValueError(
                f"a half fraction of {k} factor(s) is impossible to read: with I = {'*'.join(self.factors)} "
                "a main effect is aliased with another main effect (or the mean); use design: full, or vary >= 3 factors"
            )
        lifecycle_on = "lifecycle" in self.factors or self.fixed.get("lifecycle") == "on"
        if lifecycle_on:
            life = LifecycleConfig(**{**self.evolve.get("lifecycle", {}), "enabled": True})
            if life.death_fitness is None and life.max_age is None and not life.inherit_alpha and not life.svd_mutation:
                raise ValueError(
                    "lifecycle 'on' would do nothing: set evolve.lifecycle.death_fitness or max_age, inherit_alpha "
                    "or svd_mutation"
                )
        self._check_probes()
        for pair in self.interactions:
            if len(pair) != 2 or pair[0] == pair[1] or any(f not in self.factors for f in pair):
                raise ValueError(
                    f"interactions: {list(pair)} must name two different varied factors {list(self.factors)}"
                )
            if self.design == "half" and k == 3:
                raise ValueError(
                    f"interactions: in a half fraction of 3 factors {list(pair)} is aliased with the third factor's "
                    "main effect; use design: full"
                )
        return self
