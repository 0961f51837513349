"""Serving helpers on a router's gates: vet them (:func:`safe_gates`), pick the top-k members, weight their votes.

A router's output steers a request only after :func:`safe_gates` accepts it; every helper here
refuses NaN/inf gates rather than guessing. Ties in :func:`top_k` go to the lower index, so a
route is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ensemble_serve.shared.router.model import Router, RouterError

__all__ = ["normalised_weights", "safe_gates", "top_k"]

# Slack for float rounding when checking gates against their bounds.
_GATE_TOL = 1e-5
_SUM_TOL = 1e-3


def safe_gates(router: Router, features: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """Run the router and vet its output: ``(gates, None)``, or ``(None, reason)`` when unusable.

    A router that errors or produces NaN/inf, out-of-range gates, gates below their floors or
    softmax rows that do not sum to 1 must not steer a request; the server falls back to unrouted
    voting and reports ``reason``.
    """
    try:
        with torch.no_grad():
            gates = router(features)
            floors = router.floors()
    except (RouterError, RuntimeError, ValueError) as e:
        return None, f"router failed: {e}"
    want = (features.shape[0], len(router.cfg.members))
    if gates.dim() != 2 or tuple(gates.shape) != want:
        return None, f"router returned gates of shape {list(gates.shape)}, expected {list(want)}"
    if not torch.isfinite(gates).all():
        return None, "router produced non-finite gates (NaN or inf)"
    if (gates < -_GATE_TOL).any() or (gates > 1 + _GATE_TOL).any():
        return None, "router produced gates outside [0, 1]"
    if router.cfg.variant == "softmax":
        sums = gates.sum(dim=-1)
        worst = (sums - 1).abs().max().item() if sums.numel() else 0.0
        if worst > _SUM_TOL:
            return None, f"softmax gates do not sum to 1 (off by up to {worst:.3g})"
    else:
        if not torch.isfinite(floors).all():
            return None, "router floors are not finite"
        below = gates < floors - _GATE_TOL
        if below.any():
            names = sorted({router.cfg.members[j] for j in below.nonzero()[:, 1].tolist()})
            return None, f"gates fell below their floors for member(s) {names}"
    return gates, None


def _check_1d(gates: torch.Tensor) -> torch.Tensor:
    if gates.dim() != 1:
        raise ValueError(f"expected one prompt's gates of shape [M], got {list(gates.shape)}")
    if not torch.isfinite(gates).all():
        raise ValueError("gates contain NaN or inf; vet them with safe_gates first")
    return gates


def top_k(gates: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest gates, largest first; ties go to the lower index (stable, reproducible).

    ``k`` larger than the number of members returns all of them.
    """
    values = _check_1d(gates).tolist()
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def normalised_weights(gates: torch.Tensor, indices: Sequence[int]) -> list[float]:
    """Vote weights for the chosen members: their gates rescaled to sum to 1 (uniform if all are 0)."""
    values = _check_1d(gates).tolist()
    idx = list(indices)
    if not idx:
        raise ValueError("indices must name at least one member")
    bad = [i for i in idx if not (isinstance(i, int) and 0 <= i < len(values))]
    if bad:
        raise ValueError(f"indices {bad} are out of range for {len(values)} gates")
    chosen = [values[i] for i in idx]
    if any(v < 0 for v in chosen):
        raise ValueError(f"gates must be >= 0 to be vote weights, got {chosen}")
    total = sum(chosen)
    if total <= 0:
        return [1.0 / len(idx)] * len(idx)
    return [v / total for v in chosen]
