"""The adapter lifecycle: death, alpha-blend inheritance, SVD mutation and slot reallocation.

The decomposition study of evolutionary mixture-of-LoRA systems (DESIGN.md, "The two ideas",
point 2) found this lifecycle a net drag; it is implemented so the factorial ablation can
measure it on other data, every part behind its own switch (:class:`LifecycleConfig`). It runs
after the evolutionary step, on the population as it will be committed (children in the slots
they took), and is a pure function of its inputs and (seed, generation):

1. **death**: non-elite members below `death_fitness`, or older than `max_age` generations,
   die, weakest first, at most `max_deaths` of them. A member born in this generation (age 0:
   a child of the evolutionary step) has no fitness of its own yet and never dies, and at least
   one member always survives, so there is a neighbour and a source for the freed slots.
2. **inheritance** (`inherit_alpha` > 0): a dying member's update is blended into its nearest
   living neighbour, neighbour' = (1 - alpha) * neighbour + alpha * dying, with the
   `weighted_average` crossover at the neighbour's own rank and alpha: the neighbour keeps its
   name, rank and alpha and changes weights, so what the dying member learned is not simply lost.
   The neighbour may be an elite: elitism protects from death and mutation, and a small alpha
   is the point of the switch.
3. **SVD mutation** (`svd_mutation` > 0): the `svd` mutation operator on every surviving
   non-elite member (neighbours after their blend), as a steady source of exploration.
4. **reallocation** (:data:`REALLOCATION`): each freed slot is re-seeded, "best" with a copy
   of the fittest survivor that has a fitness of its own (age > 0), as it leaves this step
   (SVD-mutated when `svd_mutation` > 0, so it is not an identical twin), "fresh" with a new
   adapter of the dead member's rank initialised as PEFT does (A kaiming-uniform, B zero: it
   starts as the base model).

Nearest neighbour = smallest sum over modules of the Frobenius distance between the two
members' full updates dW = scale * B @ A. Each update is formed densely (`LoraWeights.delta`),
O(out * in * rank) time and O(out * in) memory per module and member: trivial for the sandbox
and for a handful of deaths per generation, but for large base models (4096^2 modules, many
layers) the dense updates are the cost to watch; the distance could then be computed from the
factors (||dW_i - dW_j||^2 = ||dW_i||^2 + ||dW_j||^2 - 2 tr(...) on rank-sized cores).

Randomness (the mutations and the fresh A factors) comes from generators seeded with
`derive_seed(seed, "lifecycle", generation, ...)`, one per member or slot, so the same inputs
give the same result bit for bit and one member's draw does not depend on another's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from pydantic import Field

from ensemble_serve.shared.lora import LoraWeights
from trainer.evolve import operators
from trainer.evolve.seeds import derive_seed
from trainer.settings import FrozenConfig


class Newborn(NamedTuple):
    """A member re-seeded into a dead member's slot."""

    slot: int
    """Index in `names` of the dead member it replaces."""
    name: str
    weights: LoraWeights
    parents: list[str]
    """[the copied member] for reallocation "best", [] for "fresh"."""


@dataclass
class LifecycleResult:
    """What one lifecycle step did; all empty when the lifecycle is off or nothing qualified."""

    deaths: list[str] = field(default_factory=list)
    """Dead members, weakest first."""
    inherited: dict[str, str] = field(default_factory=dict)
    """Dying member -> the neighbour its update was blended into."""
    mutated: list[str] = field(default_factory=list)
    """Survivors that took the SVD mutation, in population order."""
    changed: dict[str, LoraWeights] = field(default_factory=dict)
    """New weights of the survivors that changed (neighbours and mutated members)."""
    newborn: list[Newborn] = field(default_factory=list)
    """The members re-seeded into the dead members' slots, in death order."""

    @property
    def empty(self) -> bool:
        """True when the step did nothing, so the caller can pass the generation through untouched."""
        return not (self.deaths or self.inherited or self.mutated or self.changed or self.newborn)


def update_distance(a: LoraWeights, b: LoraWeights) -> float:
    """Sum over modules of ||dW_a - dW_b||_F, the full (dense) updates compared (cost: module docstring)."""
    return sum(float(torch.linalg.matrix_norm(a.delta(m).double() - b.delta(m).double())) for m in a.modules())


def fresh_adapter(like: LoraWeights, rng: torch.Generator) -> LoraWeights:
    """An adapter of `like`'s rank, alpha and config, initialised as PEFT initialises LoRA.

    PEFT draws A with `kaiming_uniform_(a=sqrt(5))` (uniform in +-1/sqrt(in_features)) and sets
    B to zero, so the update starts at exactly zero (the base model) while gradients can flow.
    """
    factors = {}
    for module in like.modules():
        a, b = like.factors[module]
        new_a = torch.empty(a.shape, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(new_a, a=math.sqrt(5), generator=rng)
        factors[module] = (new_a, torch.zeros(b.shape, dtype=torch.float32))
    return like.with_factors(factors, like.rank, like.alpha)


def _copy(w: LoraWeights) -> LoraWeights:
    """An independent copy (own tensors), so the newborn and its source never share storage."""
    return w.with_factors({m: (a.clone(), b.clone()) for m, (a, b) in w.factors.items()}, w.rank, w.alpha)


def _generator(seed: int, generation: int, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, "lifecycle", generation, *parts))


# ----------------------------------------------------------------------------- reallocation


Reseed = Callable[[LoraWeights, str, Mapping[str, LoraWeights], float, torch.Generator], tuple[LoraWeights, list[str]]]
"""How a freed slot is re-seeded: ``(dead, fittest, current, svd_mutation, rng) -> (weights, parents)``.

`dead` is the dead member's weights as they entered the step, `fittest` the name of the fittest
survivor with a fitness of its own, `current` the survivors' weights as they leave the step.
"""


def reseed_best(
    dead: LoraWeights, fittest: str, current: Mapping[str, LoraWeights], svd_mutation: float, rng: torch.Generator
) -> tuple[LoraWeights, list[str]]:
    """A copy of the fittest survivor, SVD-mutated when `svd_mutation` > 0 (so not an identical twin)."""
    w = current[fittest]
    if svd_mutation > 0:
        return operators.get_operator("mutation", "svd")(w, svd_mutation, rng), [fittest]
    return _copy(w), [fittest]


def reseed_fresh(
    dead: LoraWeights, fittest: str, current: Mapping[str, LoraWeights], svd_mutation: float, rng: torch.Generator
) -> tuple[LoraWeights, list[str]]:
    """A new adapter of the dead member's rank, initialised as PEFT does: it starts as the base model."""
    return fresh_adapter(dead, rng), []


REALLOCATION: dict[str, Reseed] = {
    "best": reseed_best,
    "fresh": reseed_fresh,
}
"""The `reallocation` settings, each with its code: the one list of their names."""

Reallocation = Literal[tuple(REALLOCATION)]  # type: ignore[valid-type]  # the registry's names, as a pydantic type
"""The type of the config's `reallocation` field: a name the registry does not hold is refused when it is read."""


# ----------------------------------------------------------------------------- the settings


class LifecycleConfig(FrozenConfig):
    """The adapter lifecycle after the evolutionary step: death, alpha-blend inheritance, SVD mutation, reallocation.

    Off by default, and every part is its own switch: in the decomposition study the lifecycle
    was a net drag, so it exists for the factorial ablation to measure on other data, not as a
    recommended setting. With `enabled` false nothing below is read and a run is unchanged.
    """

    enabled: bool = Field(False, description="Run the lifecycle after the evolutionary step each generation.")
    death_fitness: float | None = Field(
        None, allow_inf_nan=False, description="Members whose fitness is below this die (None: no death by fitness)."
    )
    max_age: int | None = Field(
        None,
        ge=1,
        description="Members older than this many generations (generation - born_generation) die (None: no death by age).",
    )
    max_deaths: int = Field(2, ge=1, description="At most this many deaths per generation, weakest first.")
    inherit_alpha: float = Field(
        0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Alpha-blend inheritance: a dying member's update is blended into its nearest living neighbour "
        "with this weight (0: off).",
    )
    svd_mutation: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="Strength of the SVD mutation applied to every surviving non-elite member each generation (0: off).",
    )
    reallocation: Reallocation = Field(
        "best",
        description="What re-seeds a dead member's slot: best (a copy of the fittest member, SVD-mutated when "
        "svd_mutation > 0) or fresh (a new adapter of the dead member's rank: A kaiming-uniform, B zero).",
    )


# ----------------------------------------------------------------------------- the step


def choose_deaths(
    names: Sequence[str],
    fitness: Mapping[str, float],
    ages: Mapping[str, int],
    elite: Sequence[int],
    cfg: LifecycleConfig,
) -> list[str]:
    """Who dies: non-elite members with age > 0 below `death_fitness` or older than `max_age`.

    Weakest first (ties: the higher index first, as the `weakest` replacement orders them), at
    most `max_deaths`, and never the whole population.
    """
    keep = set(elite)
    doomed = []
    for i, m in enumerate(names):
        if i in keep or ages[m] <= 0:
            continue
        weak = cfg.death_fitness is not None and fitness[m] < cfg.death_fitness
        old = cfg.max_age is not None and ages[m] > cfg.max_age
        if weak or old:
            doomed.append(i)
    doomed.sort(key=lambda i: (fitness[names[i]], -i))
    return [names[i] for i in doomed[: min(cfg.max_deaths, len(names) - 1)]]


def lifecycle_step(
    names: Sequence[str],
    weights: Mapping[str, LoraWeights],
    fitness: Mapping[str, float],
    ages: Mapping[str, int],
    elite: Sequence[int],
    cfg: LifecycleConfig,
    generation: int,
    seed: int,
) -> LifecycleResult:
    """One generation of the lifecycle (module docstring); the inputs are not modified.

    `elite` holds indices into `names`; `ages` is generation - born_generation (0 for members
    born in this generation). Fitness must be finite for every member.
    """
    if not cfg.enabled or not names:
        return LifecycleResult()
    bad = [m for m in names if not math.isfinite(fitness[m])]
    if bad:
        raise ValueError(f"lifecycle: non-finite fitness for {bad}; who dies would be arbitrary")
    keep = set(elite)
    deaths = choose_deaths(names, fitness, ages, elite, cfg)
    dead = set(deaths)
    survivors = [m for m in names if m not in dead]
    current = {m: weights[m] for m in survivors}
    result = LifecycleResult(deaths=deaths)

    if cfg.inherit_alpha > 0 and deaths:
        blend = operators.get_operator("crossover", "weighted_average")
        for d in deaths:  # neighbours chosen on the updates as they entered the step: order-independent
            neighbour = min(survivors, key=lambda m: (update_distance(weights[d], weights[m]), names.index(m)))
            w = current[neighbour]
            current[neighbour] = blend(
                [w, weights[d]],
                [1.0 - cfg.inherit_alpha, cfg.inherit_alpha],
                w.rank,
                w.alpha,
                _generator(seed, generation, "inherit", d),
            )
            result.inherited[d] = neighbour
            result.changed[neighbour] = current[neighbour]

    if cfg.svd_mutation > 0:
        mutate = operators.get_operator("mutation", "svd")
        for i, m in enumerate(names):
            if m in dead or i in keep:
                continue
            current[m] = mutate(current[m], cfg.svd_mutation, _generator(seed, generation, "mutate", m))
            result.mutated.append(m)
            result.changed[m] = current[m]

    if deaths:
        reseed = REALLOCATION[cfg.reallocation]
        scored = [m for m in survivors if ages[m] > 0] or survivors
        best = min(scored, key=lambda m: (-fitness[m], names.index(m)))
        for k, d in enumerate(deaths):
            rng = _generator(seed, generation, "newborn", k)
            w, parents = reseed(weights[d], best, current, cfg.svd_mutation, rng)
            result.newborn.append(Newborn(names.index(d), f"g{generation}r{k}", w, parents))
    return result
