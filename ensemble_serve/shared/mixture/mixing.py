"""The mixing math: one adapter whose update is the weighted sum of members' LoRA updates.

    dW = sum_i w_i * dW_i,    dW_i = s_i * B_i @ A_i,    sum_i w_i = 1

Two ways to build it, both without ever forming a dense (out x in) matrix:

``exact`` (`mix_exact`)
    Rank concatenation: A = [A_1; A_2; ...] (rows) and B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]
    (columns), so B @ A is exactly the weighted sum. The child's rank is the sum of the active
    members' ranks and its ``lora_alpha`` equals that rank, so its scale is 1 (plain LoRA, never
    rsLoRA, whatever the members use: each member's own scale, rsLoRA or not, is folded into its
    block of B). Per-token cost grows with the rank: about sum(r_i) / mean(r_i) times one member.

``truncated`` (`mix_truncated`)
    The same update, cut to a chosen rank by SVD of the concatenated factors (`refactor_low_rank`,
    QR plus a small core SVD), which is the best approximation of that rank in Frobenius norm
    (Eckart-Young). Cost is that of one adapter of the chosen rank; `truncation_error` reports
    what was lost. It is exact when the rank is at least the concatenated rank.

`mix` chooses between them under vLLM's ``max_lora_rank`` (`vllm_rank`), and `mixture_cost`
reports the rank and cost `mix` would produce; both decide through one plan, so they agree.
Weights are validated and normalised to sum 1; members with weight zero are left out.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ensemble_serve.shared.engine_config import VLLM_LORA_RANKS
from ensemble_serve.shared.lora import LoraError, LoraWeights, align_modules, check_compatible, refactor_low_rank

__all__ = [
    "MixtureError",
    "Mode",
    "Weights",
    "check_mode",
    "check_rank",
    "mix",
    "mix_exact",
    "mix_truncated",
    "mixture_cost",
    "normalise_weights",
    "truncation_error",
    "vllm_rank",
]

Mode = Literal["exact", "truncated"]
Weights = Sequence[float] | torch.Tensor


class MixtureError(ValueError):
    """A mixing request that cannot be served: bad weights, ranks or modes, or members that do not fit together."""


# --------------------------------------------------------------------------- validation


def _member_names(count: int, names: Sequence[str] | None) -> list[str]:
    """Names for error messages: the caller's, or positional ones."""
    if names is None:
        return [f"member {i}" for i in range(count)]
    names = [str(n) for n in names]
    if len(names) != count:
        raise MixtureError(f"got {len(names)} names for {count} members")
    return names


def normalise_weights(weights: Weights, names: Sequence[str]) -> list[float]:
    """Weights as floats summing to 1, refusing what cannot be a mixture (wrong count, negative, NaN, inf, all zero).

    Dividing by the largest weight before summing keeps huge but finite weights from overflowing.
    """
    if isinstance(weights, torch.Tensor):
        if weights.ndim != 1:
            raise MixtureError(f"weights must be a 1-D tensor, got shape {tuple(weights.shape)}")
        values: list[Any] = weights.detach().cpu().tolist()
    elif isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
        raise MixtureError(f"weights must be a sequence of numbers, got {type(weights).__name__}")
    else:
        values = list(weights)
    if len(values) != len(names):
        raise MixtureError(f"weights count ({len(values)}) does not match members count ({len(names)})")
    out: list[float] = []
    for name, v in zip(names, values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise MixtureError(f"weight of {name} must be a number, got {v!r}")
        f = float(v)
        if not math.isfinite(f):
            raise MixtureError(f"weight of {name} must be finite, got {f}")
        if f < 0:
            raise MixtureError(f"weight of {name} must be non-negative, got {f}")
        out.append(f)
    top = max(out)
    if top <= 0:
        raise MixtureError("all weights are zero; at least one member needs a positive weight")
    scaled = [v / top for v in out]
    total = sum(scaled)
    return [v / total for v in scaled]


def check_rank(value: Any, what: str) -> int:
    """A rank-like count as a positive int; bools are refused although they are ints, since True is never meant as 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MixtureError(f"{what} must be a positive integer (>= 1), got {value!r}")
    return value


def check_mode(mode: Any) -> Mode:
    """Refuse unknown modes up front rather than silently falling back to one of the two."""
    if mode not in ("exact", "truncated"):
        raise MixtureError(f"mode must be 'exact' or 'truncated', got {mode!r}")
    return mode


def _check_members(members: Sequence[LoraWeights], names: Sequence[str] | None) -> tuple[list[LoraWeights], list[str]]:
    """The members over one set of modules (`align_modules`: different target modules mix, a missing
    module being a zero update) and their names; an empty or incompatible set is a MixtureError."""
    if isinstance(members, LoraWeights) or not isinstance(members, Sequence) or not members:
        raise MixtureError("members must be a non-empty sequence of LoraWeights")
    bad = [i for i, m in enumerate(members) if not isinstance(m, LoraWeights)]
    if bad:
        raise MixtureError(f"members at positions {bad} are not LoraWeights")
    resolved = _member_names(len(members), names)
    try:
        aligned = align_modules(members, resolved)
        check_compatible(aligned, resolved)
    except LoraError as e:
        raise MixtureError(f"incompatible members: {e}") from e
    return aligned, resolved


@dataclass(frozen=True)
class _Plan:
    """What `mix` will build: the resolved mode and rank, and the concatenated rank it starts from."""

    mode: Mode
    rank: int
    exact_rank: int
    active: tuple[int, ...]


def _plan(ranks: Sequence[int], weights: Sequence[float], mode: Any, rank: Any, max_rank: Any) -> _Plan:
    """The single place `mix` and `mixture_cost` decide the mode and rank, so the cost they report matches."""
    mode = check_mode(mode)
    if max_rank is not None:
        max_rank = check_rank(max_rank, "max_rank")
    active = tuple(i for i, w in enumerate(weights) if w > 0)
    exact_rank = sum(ranks[i] for i in active)
    if mode == "exact":
        if rank is not None:
            raise MixtureError("rank applies only to mode='truncated' (exact mode's rank is the sum of member ranks)")
        if max_rank is None or exact_rank <= max_rank:
            return _Plan("exact", exact_rank, exact_rank, active)
        return _Plan("truncated", min(max_rank, exact_rank), exact_rank, active)
    if rank is None:
        raise MixtureError("mode='truncated' needs a rank")
    rank = check_rank(rank, "rank")
    if max_rank is not None:
        rank = min(rank, max_rank)
    return _Plan("truncated", min(rank, exact_rank), exact_rank, active)


# --------------------------------------------------------------------------- mixing


def _concatenate(
    members: Sequence[LoraWeights], weights: Sequence[float], active: Sequence[int]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, (A_cat, B_cat) in float64 with B_cat @ A_cat = sum_i w_i * dW_i (scale 1).

    Each member's scale (alpha / r, or alpha / sqrt(r) for rsLoRA) and weight are folded into its
    block of B, which is what lets members of different ranks, alphas and scaling rules share one
    child scale.
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in members[active[0]].modules():
        a_blocks, b_blocks = [], []
        for i in active:
            a, b = members[i].factors[module]
            a_blocks.append(a.to(torch.float64))
            b_blocks.append(b.to(torch.float64) * (weights[i] * members[i].scale))
        out[module] = (torch.cat(a_blocks, dim=0), torch.cat(b_blocks, dim=1))
    return out


def _child(template: LoraWeights, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> LoraWeights:
    """A plain-LoRA adapter of this rank with alpha = rank (scale 1), keeping the template's base and targets."""
    config = dict(template.config)
    config["r"] = rank
    config["lora_alpha"] = rank
    config["use_rslora"] = False
    return LoraWeights(rank=rank, alpha=float(rank), factors=factors, config=config)


def _prepare(
    members: Sequence[LoraWeights], weights: Weights, names: Sequence[str] | None
) -> tuple[list[LoraWeights], list[float], tuple[int, ...]]:
    """Validate members and weights once: the aligned members, the normalised weights and the indices of
    members with a positive one."""
    aligned, resolved = _check_members(members, names)
    normalised = normalise_weights(weights, resolved)
    return aligned, normalised, tuple(i for i, w in enumerate(normalised) if w > 0)


def _exact(members: Sequence[LoraWeights], weights: Sequence[float], active: Sequence[int]) -> LoraWeights:
    """`mix_exact` on already validated input, so `mix` validates (and compares members) only once."""
    rank = sum(members[i].rank for i in active)
    return _child(members[active[0]], _concatenate(members, weights, active), rank)


def _truncated(
    members: Sequence[LoraWeights], weights: Sequence[float], active: Sequence[int], rank: int
) -> LoraWeights:
    """`mix_truncated` on already validated input; the rank is capped at the concatenated rank (no zero padding)."""
    k = min(rank, sum(members[i].rank for i in active))
    factors = {
        module: refactor_low_rank(b, a, k, float(k))
        for module, (a, b) in _concatenate(members, weights, active).items()
    }
    return _child(members[active[0]], factors, k)


def mix_exact(members: Sequence[LoraWeights], weights: Weights, *, names: Sequence[str] | None = None) -> LoraWeights:
    """One adapter whose update is exactly sum_i w_i * dW_i (weights normalised to sum 1).

    Rank concatenation of the members with a positive weight (zero-weight members are skipped, so
    weights (1, 0) give back member 0's update at member 0's rank). The child has
    r = lora_alpha = sum of those ranks, hence scale 1, and ``use_rslora`` false; rsLoRA members
    are handled by folding their own scale into B. `names` only labels members in error messages.
    """
    members, normalised, active = _prepare(members, weights, names)
    return _exact(members, normalised, active)


def mix_truncated(
    members: Sequence[LoraWeights], weights: Weights, rank: int, *, names: Sequence[str] | None = None
) -> LoraWeights:
    """The weighted-sum update cut to at most `rank` by SVD of the concatenated factors (never a dense matrix).

    The best rank-`rank` approximation in Frobenius norm, per module. The child's rank is
    min(rank, concatenated rank): above the concatenated rank the SVD would only add zero
    components, so the result is then exact and not padded. alpha = rank, scale 1, as for
    `mix_exact`; singular values are split as square roots between A and B.
    """
    rank = check_rank(rank, "rank")
    members, normalised, active = _prepare(members, weights, names)
    return _truncated(members, normalised, active, rank)


def _gram_norm2(b: torch.Tensor, a: torch.Tensor) -> float:
    """||B @ A||_F^2 as sum((B^T B) * (A A^T)): O((out + in) R^2) instead of forming the (out x in) product."""
    return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0))


def truncation_error(
    members: Sequence[LoraWeights], weights: Weights, mixed: LoraWeights, *, names: Sequence[str] | None = None
) -> float:
    """Relative Frobenius error of `mixed` against the exact weighted sum, over all modules together.

    sqrt(sum_m ||dW_mixed - dW_exact||^2 / sum_m ||dW_exact||^2), computed from the factors in
    float64 (Gram matrices, no dense update). 0 for an exact mix; inf if the exact update is zero
    but `mixed` is not (relative error is then undefined).
    """
    members, normalised, active = _prepare(members, weights, names)
    exact = _concatenate(members, normalised, active)
    if not isinstance(mixed, LoraWeights) or set(mixed.factors) != set(exact):
        raise MixtureError("mixed adapter does not have the members' modules")
    err2 = norm2 = 0.0
    for module, (a, b) in exact.items():
        ma, mb = mixed.factors[module]
        if mixed.shape(module) != (a.shape[1], b.shape[0]):
            raise MixtureError(
                f"mixed adapter's module {module!r} has shape {mixed.shape(module)}, expected "
                f"{(a.shape[1], b.shape[0])}"
            )
        diff_b = torch.cat([b, -mixed.scale * mb.to(torch.float64)], dim=1)
        diff_a = torch.cat([a, ma.to(torch.float64)], dim=0)
        err2 += _gram_norm2(diff_b, diff_a)
        norm2 += _gram_norm2(b, a)
    if norm2 == 0.0:
        return 0.0 if err2 == 0.0 else math.inf
    return math.sqrt(err2 / norm2)


def vllm_rank(r: int) -> int:
    """The smallest value vLLM accepts as ``max_lora_rank`` that can hold an adapter of rank `r`."""
    r = check_rank(r, "rank")
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise MixtureError(f"rank {r} exceeds vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")


def mix(
    members: Sequence[LoraWeights],
    weights: Weights,
    mode: Mode = "exact",
    rank: int | None = None,
    max_rank: int | None = None,
    *,
    names: Sequence[str] | None = None,
) -> LoraWeights:
    """Mix under the engine's rank limit: the result's r never exceeds `max_rank`.

    ``exact``: `mix_exact` if the concatenated rank fits `max_rank` (or there is no limit), else
    `mix_truncated` to `max_rank`, the closest adapter the engine can load; `rank` must be None.
    ``truncated``: `mix_truncated` to min(`rank`, `max_rank`) (`rank` required); the engine's
    limit wins because an adapter above it could not be loaded at all.
    """
    members, normalised, active = _prepare(members, weights, names)
    plan = _plan([m.rank for m in members], normalised, mode, rank, max_rank)
    if plan.mode == "exact":
        return _exact(members, normalised, active)
    return _truncated(members, normalised, active, plan.rank)


def mixture_cost(
    members_ranks: Sequence[int],
    weights: Weights,
    mode: Mode = "exact",
    rank: int | None = None,
    *,
    max_rank: int | None = None,
) -> dict[str, Any]:
    """The rank `mix` would produce and its rough per-token LoRA cost relative to one routed member.

    A LoRA module costs about 2 r (in + out) FLOPs per token, linear in r, so the factor is the
    result's rank over the mean rank of the members with a positive weight (sum of ranks / mean
    rank for an exact mix, i.e. the number of such members when ranks are equal). Either mode
    costs one base-model pass, against one pass per member when fanning out.
    """
    ranks = [check_rank(r, "member rank") for r in members_ranks]
    if not ranks:
        raise MixtureError("members_ranks must name at least one member")
    normalised = normalise_weights(weights, _member_names(len(ranks), None))
    plan = _plan(ranks, normalised, mode, rank, max_rank)
    mean_rank = sum(ranks[i] for i in plan.active) / len(plan.active)
    return {
        "mode": plan.mode,
        "rank": plan.rank,
        "exact_rank": plan.exact_rank,
        "active_members": len(plan.active),
        "mean_member_rank": mean_rank,
        "flops_factor": plan.rank / mean_rank,
        "vllm_rank": vllm_rank(plan.rank) if plan.rank <= VLLM_LORA_RANKS[-1] else None,
    }
