"""Selection operators `(fitness, k, rng, **opts) -> list[int]`: indices of k parents (repetition allowed).

Also :func:`elites`, the fittest members the evolutionary step keeps unchanged. Every draw comes
from the `rng` passed in; higher fitness is better.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

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
