"""Crossover operators `(parents, weights, rank, alpha, rng, *, rank_policy="error") -> LoraWeights`.

They combine each module's *update* dW = scale * B @ A, never the factors (package docstring),
and bring the child back to the requested rank and alpha with a truncated SVD. Parents of
different ranks are handled by `rank_policy` where an operator needs equal ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment

from ensemble_serve.shared.lora import (
    LoraWeights,
    check_compatible,
    lora_scale,
    refactor_low_rank,
    svd_low_rank,
)
from trainer.evolve.operators.common import (
    OperatorError,
    check_count,
    orthonormalise,
    scaled_factors,
    use_rslora,
)

RANK_POLICIES = ("error", "truncate", "pad")
"""What a crossover that needs equal ranks does with parents of different ranks (the config's `rank_policy`)."""


def _prepare_crossover(
    parents: Sequence[LoraWeights], weights: Sequence[float], rank: int, alpha: float, rank_policy: str
) -> list[float]:
    """Validate a crossover call; returns the weights normalised to sum 1.

    Parents that cannot be combined (other base model, target modules or module shapes) raise
    `LoraError` from `check_compatible`, naming them "parent <i>".
    """
    if not parents:
        raise OperatorError("crossover needs at least one parent")
    if len(weights) != len(parents):
        raise OperatorError(f"{len(parents)} parents but {len(weights)} weights")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise OperatorError(f"crossover weights must be finite and non-negative, got {w}")
    total = sum(w)
    if total <= 0:
        raise OperatorError(f"crossover weights must not all be zero, got {w}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise OperatorError(f"child rank must be a positive integer, got {rank!r}")
    if not (math.isfinite(float(alpha)) and alpha > 0):
        raise OperatorError(f"child alpha must be positive, got {alpha!r}")
    if rank_policy not in RANK_POLICIES:
        raise OperatorError(f"unknown rank_policy {rank_policy!r}; expected one of {list(RANK_POLICIES)}")
    check_compatible(parents, [f"parent {i}" for i in range(len(parents))])
    return [x / total for x in w]


def weighted_average(
    parents: Sequence[LoraWeights],
    weights: Sequence[float],
    rank: int,
    alpha: float,
    rng: torch.Generator,
    *,
    rank_policy: str = "error",
) -> LoraWeights:
    """Per module, the child's update is sum_i w_i dW_i, refactored to `rank`.

    Averaging updates (not factors) is invariant to how each parent happens to factor its
    update. The result is exact when the parents' ranks add up to at most `rank`, otherwise the
    best rank-`rank` approximation. Ranks may differ freely, so `rank_policy` is only validated;
    `rng` is unused (the operator is deterministic) but kept for a uniform signature.
    """
    w = _prepare_crossover(parents, weights, rank, alpha, rank_policy)
    rslora = use_rslora(parents[0])
    used = [(wi, p) for wi, p in zip(w, parents) if wi > 0]
    factors = {}
    for module in parents[0].modules():
        bs, as_ = zip(*(scaled_factors(p, module) for _, p in used))
        b_cat = torch.cat([wi * b for (wi, _), b in zip(used, bs)], dim=1)
        a_cat = torch.cat(as_, dim=0)
        factors[module] = refactor_low_rank(b_cat, a_cat, rank, alpha, use_rslora=rslora)
    return parents[0].with_factors(factors, rank, alpha)


def _rank_error(op: str, ranks: Sequence[int], policy: str) -> OperatorError:
    return OperatorError(
        f"{op}: parents have different ranks {list(ranks)} and rank_policy={policy!r}; configure "
        "rank_policy='truncate' (use the leading components / refactor down) or 'pad' (zero components / refactor up)"
    )


def _parent_svd(p: LoraWeights, module: str, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The parent's update as exactly `m` singular triplets (truncated, or padded with zero ones).

    Triplets whose singular value is numerically zero have arbitrary directions (e.g. an
    untrained B); they are zeroed like padding so they cannot pull the child's directions.
    """
    b, a = scaled_factors(p, module)
    u, s, vh = svd_low_rank(b, a)
    k = min(m, s.shape[0])
    u, s, vh = u[:, :k], s[:k], vh[:k]
    tol = (s.max() if k else torch.tensor(0.0, dtype=torch.float64)) * max(u.shape[0], vh.shape[1]) * 1e-12
    live = s > tol
    u, s, vh = u * live, s * live, vh * live.unsqueeze(1)
    if k < m:
        u = torch.cat([u, u.new_zeros(u.shape[0], m - k)], dim=1)
        s = torch.cat([s, s.new_zeros(m - k)])
        vh = torch.cat([vh, vh.new_zeros(m - k, vh.shape[1])], dim=0)
    return u, s, vh


def svd_interpolate(
    parents: Sequence[LoraWeights],
    weights: Sequence[float],
    rank: int,
    alpha: float,
    rng: torch.Generator,
    *,
    rank_policy: str = "error",
) -> LoraWeights:
    """Interpolate the parents' singular triplets, after aligning them to the first parent's.

    Per module each parent's update is decomposed as U S V^T (its own rank of triplets);
    parent i's triplets are matched to parent 0's by the Hungarian assignment on |U_0^T U_i|
    and sign-flipped to agree, so components that play the same role are mixed with each other
    (a plain average of updates would blur two rotated copies of a direction into a weaker one).
    U, S and V are averaged with the weights, U and V re-orthonormalised, and the update
    U diag(S) V^T refactored to `rank`. Parents of different ranks need `rank_policy`:
    "truncate" keeps the first min(ranks) triplets of each, "pad" pads to max(ranks) with zero
    singular values. `rng` is unused (deterministic) but kept for a uniform signature.
    """
    w = _prepare_crossover(parents, weights, rank, alpha, rank_policy)
    ranks = [p.rank for p in parents]
    if len(set(ranks)) > 1 and rank_policy == "error":
        raise _rank_error("svd_interpolate", ranks, rank_policy)
    m = min(ranks) if rank_policy == "truncate" else max(ranks)
    rslora = use_rslora(parents[0])
    factors = {}
    for module in parents[0].modules():
        # past min(in, out) every singular value is zero; capping keeps U and V tall enough for QR
        width = min(m, *parents[0].shape(module))
        triplets = [_parent_svd(p, module, width) for p in parents]
        u0 = triplets[0][0]
        u_mix = torch.zeros_like(u0)
        s_mix = torch.zeros_like(triplets[0][1])
        v_mix = torch.zeros_like(triplets[0][2].T)
        for i, (wi, (u, s, vh)) in enumerate(zip(w, triplets)):
            if i > 0:
                _, cols = linear_sum_assignment((u0.T @ u).abs().numpy(), maximize=True)
                perm = torch.as_tensor(cols, dtype=torch.long)
                u, s, vh = u[:, perm], s[perm], vh[perm]
                dots = (u0 * u).sum(dim=0)
                flip = torch.where(dots < 0, -torch.ones_like(dots), torch.ones_like(dots))
                u, vh = u * flip.unsqueeze(0), vh * flip.unsqueeze(1)
            u_mix += wi * u
            s_mix += wi * s
            v_mix += wi * vh.T
        # Only components with weight left are re-orthonormalised, strongest first: QR turns a zero
        # column into an arbitrary direction that would bend every column after it.
        order = torch.argsort(-s_mix, stable=True)
        order = order[s_mix[order] > 0]
        u_new, v_new = orthonormalise(u_mix[:, order]), orthonormalise(v_mix[:, order])
        b_mix = u_new * s_mix[order].unsqueeze(0)
        factors[module] = refactor_low_rank(b_mix, v_new.T, rank, alpha, use_rslora=rslora)
    return parents[0].with_factors(factors, rank, alpha)


def layer_wise_plan(n_layers: int, weights: Sequence[float], rng: torch.Generator) -> list[int]:
    """Which parent each layer comes from: draws with probability proportional to `weights`.

    Entry j is for the j-th distinct layer index in ascending order. Exposed so callers can log
    the plan and tests can check it; `layer_wise` draws it with the same generator first.
    """
    check_count("n_layers", n_layers)
    w = [float(x) for x in weights]
    if not w or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise OperatorError(f"layer_wise weights must be non-negative and not all zero, got {w}")
    if n_layers == 0:
        return []
    return torch.multinomial(torch.tensor(w, dtype=torch.float64), n_layers, replacement=True, generator=rng).tolist()


def layer_wise(
    parents: Sequence[LoraWeights],
    weights: Sequence[float],
    rank: int,
    alpha: float,
    rng: torch.Generator,
    *,
    rank_policy: str = "error",
) -> LoraWeights:
    """Each transformer layer's modules come whole from one parent, chosen by `layer_wise_plan`.

    Keeping a layer's modules together preserves how they were co-trained (q/k/v of one layer
    depend on each other). Modules without a layer index come from the first parent. A parent
    whose rank equals `rank` is copied exactly, B rescaled for the child's alpha; otherwise
    "truncate"/"pad" refactor its update to `rank`, and "error" refuses. The rank check covers
    every parent that could be chosen, so whether a call fails does not depend on the seed.
    """
    w = _prepare_crossover(parents, weights, rank, alpha, rank_policy)
    candidates = sorted({0} | {i for i, wi in enumerate(w) if wi > 0})
    if rank_policy == "error" and any(parents[i].rank != rank for i in candidates):
        ranks = [parents[i].rank for i in candidates]
        raise OperatorError(
            f"layer_wise: parents have ranks {ranks} but the child rank is {rank} and rank_policy='error'; "
            "configure rank_policy='truncate' or 'pad' to refactor their updates to the child rank"
        )
    first = parents[0]
    layers = sorted({lay for m in first.modules() if (lay := first.layer_of(m)) is not None})
    plan = dict(zip(layers, layer_wise_plan(len(layers), w, rng)))
    rslora = use_rslora(first)
    child_scale = lora_scale(float(alpha), rank, rslora)
    factors = {}
    for module in first.modules():
        layer = first.layer_of(module)
        p = parents[0 if layer is None else plan[layer]]
        a, b = p.factors[module]
        if p.rank == rank:
            factors[module] = (a.clone(), b * (p.scale / child_scale))
        else:
            sb, sa = scaled_factors(p, module)
            factors[module] = refactor_low_rank(sb, sa, rank, alpha, use_rslora=rslora)
    return first.with_factors(factors, rank, alpha)
