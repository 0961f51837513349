"""Selection operators `(fitness, k, rng, **opts) -> list[int]`: indices of k parents (repetition allowed).

Each operator's options (its keyword-only parameters) have a model beside it, :class:`TruncationOptions`
and so on, with the same names and defaults: the evolution config checks its `selection_options`
against the model of its rule when it is read, so a misspelt or mistyped option is refused before
any work, not as a `TypeError` after self-play and training.

Also :func:`elites`, the fittest members the evolutionary step keeps unchanged. Every draw comes
from the `rng` passed in; higher fitness is better.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from trainer.evolve.operators.common import (
    OperatorError,
    best_first,
    check_count,
    check_fitness,
)


def elites(fitness: Sequence[float], count: int) -> list[int]:
    """The `count` fittest members, best first; ties go to the lower index."""
    values = check_fitness(fitness)
    check_count("elite count", count)
    if count > len(values):
        raise OperatorError(f"cannot keep {count} elites out of {len(values)} members")
    return best_first(values)[:count]


class SelectionOptions(BaseModel):
    """Base of the option models: strict types (no `"3"` or `3.0` for an integer, no `true` for a number), no unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class TruncationOptions(SelectionOptions):
    """Options of :func:`truncation`."""

    fraction: float = Field(
        0.5, gt=0, le=1, allow_inf_nan=False, description="Share of the fittest members drawn from."
    )


class TournamentOptions(SelectionOptions):
    """Options of :func:`tournament` (a size above the population is refused when the run starts)."""

    size: int = Field(3, ge=1, description="Members drawn into each tournament.")


class FitnessProportionalOptions(SelectionOptions):
    """Options of :func:`fitness_proportional`."""

    epsilon: float = Field(
        1e-6, gt=0, allow_inf_nan=False, description="The worst member's chance, as a share of the fitness spread."
    )


def truncation(fitness: Sequence[float], k: int, rng: torch.Generator, *, fraction: float = 0.5) -> list[int]:
    """Uniform picks from the top ceil(fraction * n) members (at least one): strong, simple pressure."""
    values = check_fitness(fitness)
    check_count("k", k)
    if not (0 < fraction <= 1):
        raise OperatorError(f"truncation fraction must be in (0, 1], got {fraction!r}")
    pool = best_first(values)[: max(1, math.ceil(fraction * len(values)))]
    draws = torch.randint(len(pool), (k,), generator=rng).tolist()
    return [pool[j] for j in draws]


def tournament(fitness: Sequence[float], k: int, rng: torch.Generator, *, size: int = 3) -> list[int]:
    """Each pick is the best of `size` members drawn without replacement; `size` tunes the pressure.

    `size` larger than the population is refused rather than clamped, as it would silently
    turn the tournament into "always the best".
    """
    values = check_fitness(fitness)
    check_count("k", k)
    n = len(values)
    if isinstance(size, bool) or not isinstance(size, int) or not (1 <= size <= n):
        raise OperatorError(f"tournament size must be an integer in [1, {n}] for {n} members, got {size!r}")
    picks = []
    for _ in range(k):
        entrants = torch.randperm(n, generator=rng)[:size].tolist()
        picks.append(min(entrants, key=lambda i: (-values[i], i)))
    return picks


def fitness_proportional(fitness: Sequence[float], k: int, rng: torch.Generator, *, epsilon: float = 1e-6) -> list[int]:
    """Roulette wheel on fitness shifted so the worst is ~0.

    The shift makes negative fitness (e.g. log-likelihoods) usable; the worst member keeps a
    small chance, `epsilon` times the fitness spread, so the wheel is scale-invariant. When all
    fitness values are equal (all zero included) every member is equally likely.
    """
    values = check_fitness(fitness)
    check_count("k", k)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise OperatorError(f"fitness_proportional epsilon must be positive, got {epsilon!r}")
    lo, hi = min(values), max(values)
    if hi == lo:
        probs = torch.ones(len(values), dtype=torch.float64)
    else:
        probs = torch.tensor([f - lo + epsilon * (hi - lo) for f in values], dtype=torch.float64)
    if k == 0:
        return []
    return torch.multinomial(probs, k, replacement=True, generator=rng).tolist()
