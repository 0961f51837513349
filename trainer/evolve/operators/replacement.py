"""Replacement operators `(fitness, n_offspring, elite) -> list[int]`: the members the offspring replace.

An elite is never replaced; a count that cannot be placed is refused, not clamped.
"""

from __future__ import annotations

from collections.abc import Sequence

from trainer.evolve.operators.common import OperatorError, check_count, check_fitness


def _check_elite(n: int, elite: Sequence[int]) -> set[int]:
    keep = [int(i) for i in elite]
    if any(i < 0 or i >= n for i in keep):
        raise OperatorError(f"elite indices {keep} out of range for {n} members")
    if len(set(keep)) != len(keep):
        raise OperatorError(f"duplicate elite indices {keep}")
    return set(keep)


def weakest(fitness: Sequence[float], n_offspring: int, elite: Sequence[int]) -> list[int]:
    """The `n_offspring` least fit non-elite members, weakest first (ties: higher index first,
    so among equals the older, lower-indexed members survive)."""
    values = check_fitness(fitness)
    check_count("n_offspring", n_offspring)
    keep = _check_elite(len(values), elite)
    free = len(values) - len(keep)
    if n_offspring > free:
        raise OperatorError(
            f"cannot place {n_offspring} offspring: {len(values)} members minus {len(keep)} elites leaves {free}"
        )
    candidates = sorted((i for i in range(len(values)) if i not in keep), key=lambda i: (values[i], -i))
    return candidates[:n_offspring]


def generational(fitness: Sequence[float], n_offspring: int, elite: Sequence[int]) -> list[int]:
    """Every non-elite member is replaced, in index order; offspring must fill exactly those slots."""
    values = check_fitness(fitness)
    check_count("n_offspring", n_offspring)
    keep = _check_elite(len(values), elite)
    free = len(values) - len(keep)
    if n_offspring != free:
        raise OperatorError(
            f"generational replacement needs exactly {free} offspring ({len(values)} members minus "
            f"{len(keep)} elites), got {n_offspring}; use 'weakest' to replace only part of the population"
        )
    return [i for i in range(len(values)) if i not in keep]
