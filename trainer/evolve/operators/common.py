"""What the operators share: the error type, checks of fitness and counts, and factor helpers.

Invariant: fitness that is empty, NaN or infinite never reaches an operator (`check_fitness`), so
every ordering below is total and deterministic (ties go to the lower index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ensemble_serve.shared.lora import LoraWeights


class OperatorError(ValueError):
    """An operator asked to do something ill-defined (bad fitness, sizes, ranks or names)."""


# ----------------------------------------------------------------------------- helpers


def check_fitness(fitness: Sequence[float]) -> list[float]:
    """Fitness as floats; refuses empty and non-finite values, whose order would be arbitrary."""
    values = [float(f) for f in fitness]
    if not values:
        raise OperatorError("fitness is empty")
    bad = [i for i, f in enumerate(values) if not math.isfinite(f)]
    if bad:
        raise OperatorError(f"non-finite fitness for member(s) {bad}: {[values[i] for i in bad]}")
    return values


def check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OperatorError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def best_first(fitness: Sequence[float]) -> list[int]:
    """Indices from best to worst; equal fitness keeps the lower index first (deterministic ties)."""
    return sorted(range(len(fitness)), key=lambda i: (-fitness[i], i))


def use_rslora(w: LoraWeights) -> bool:
    return bool(w.config.get("use_rslora", False))


def scaled_factors(p: LoraWeights, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B * scale, A) in float64: a factorisation of the parent's update with the scale folded in."""
    a, b = p.factors[module]
    return b.to(torch.float64) * p.scale, a.to(torch.float64)


def orthonormalise(x: torch.Tensor) -> torch.Tensor:
    """QR with R's diagonal made non-negative: the orthonormal basis closest to x column by column."""
    q, r = torch.linalg.qr(x, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(0)
