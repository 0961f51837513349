"""Mutation operators `(w, strength, rng) -> LoraWeights`: a new adapter, the input left unchanged.

Strength 0 returns an exact copy; the adapter's rank and alpha never change.
"""

from __future__ import annotations

import math

import torch

from ensemble_serve.shared.lora import LoraWeights, refactor_low_rank, svd_low_rank
from trainer.evolve.operators.common import (
    OperatorError,
    orthonormalise,
    scaled_factors,
    use_rslora,
)


def _check_strength(strength: float) -> float:
    s = float(strength)
    if not (math.isfinite(s) and s >= 0):
        raise OperatorError(f"mutation strength must be finite and >= 0, got {strength!r}")
    return s


def _copy(w: LoraWeights) -> LoraWeights:
    return w.with_factors({m: (a.clone(), b.clone()) for m, (a, b) in w.factors.items()}, w.rank, w.alpha)


def _rms(t: torch.Tensor) -> float:
    return float(t.to(torch.float64).square().mean().sqrt()) if t.numel() else 0.0


def gaussian(w: LoraWeights, strength: float, rng: torch.Generator) -> LoraWeights:
    """Add N(0, (strength * rms(tensor))^2) noise to every factor, relative to its own scale.

    A factor with rms 0 (PEFT initialises B to zeros) takes noise scaled by 1e-3 times its
    partner's rms so the mutation still moves it; if both are zero, an absolute 1e-3.
    """
    s = _check_strength(strength)
    if s == 0:
        return _copy(w)
    factors = {}
    for module in w.modules():
        a, b = w.factors[module]
        rms_a, rms_b = _rms(a), _rms(b)
        std_a = rms_a if rms_a > 0 else (rms_b * 1e-3 if rms_b > 0 else 1e-3)
        std_b = rms_b if rms_b > 0 else (rms_a * 1e-3 if rms_a > 0 else 1e-3)
        noise_a = torch.randn(a.shape, generator=rng, dtype=torch.float32)
        noise_b = torch.randn(b.shape, generator=rng, dtype=torch.float32)
        factors[module] = (a + noise_a * (s * std_a), b + noise_b * (s * std_b))
    return w.with_factors(factors, w.rank, w.alpha)


DROPOUT_MAX = 0.9


def dropout(w: LoraWeights, strength: float, rng: torch.Generator) -> LoraWeights:
    """Drop whole rank components (row j of A with column j of B) with probability `strength`.

    The probability is capped at 0.9; at least one component per module survives (the one with
    the largest ||B[:, j]|| * ||A[j]||, lower index on ties, if the draw would drop all). As in
    training-time dropout, survivors are scaled by 1 / (1 - p) to keep the expected update.
    """
    p = min(_check_strength(strength), DROPOUT_MAX)
    if p == 0:
        return _copy(w)
    factors = {}
    for module in w.modules():
        a, b = w.factors[module]
        keep = torch.rand(w.rank, generator=rng, dtype=torch.float64) >= p
        if not bool(keep.any()):
            norms = b.to(torch.float64).norm(dim=0) * a.to(torch.float64).norm(dim=1)
            keep[int(torch.argmax(norms))] = True
        mask = keep.to(torch.float32)
        factors[module] = (a * mask.unsqueeze(1), b * (mask / (1 - p)).unsqueeze(0))
    return w.with_factors(factors, w.rank, w.alpha)


def svd(w: LoraWeights, strength: float, rng: torch.Generator) -> LoraWeights:
    """Perturb each update in its own SVD basis: singular values by a log-normal factor, the
    singular vectors by noise of relative size `strength`, then refactor to the same rank/alpha.

    This changes how strongly and in which directions a module acts while keeping the update
    low-rank and the adapter's rank fixed; components with zero singular value stay zero.
    """
    s = _check_strength(strength)
    if s == 0:
        return _copy(w)
    rslora = use_rslora(w)
    factors = {}
    for module in w.modules():
        sb, sa = scaled_factors(w, module)
        u, sv, vh = svd_low_rank(sb, sa)
        k = sv.shape[0]
        out, inn = u.shape[0], vh.shape[1]
        sv = sv * torch.exp(s * torch.randn(k, generator=rng, dtype=torch.float64))
        u = orthonormalise(u + s * torch.randn(out, k, generator=rng, dtype=torch.float64) / math.sqrt(out))
        v = orthonormalise(vh.T + s * torch.randn(inn, k, generator=rng, dtype=torch.float64) / math.sqrt(inn))
        factors[module] = refactor_low_rank(u * sv.unsqueeze(0), v.T, w.rank, w.alpha, use_rslora=rslora)
    return w.with_factors(factors, w.rank, w.alpha)
