"""Evolutionary operators on a population of LoRA adapters, each a named function in a registry.

Four kinds, looked up by name from the evolution config with `get_operator(kind, name)`:

- selection `(fitness, k, rng, **opts) -> list[int]`: indices of k parents (repetition allowed);
- crossover `(parents, weights, rank, alpha, rng, *, rank_policy="error") -> LoraWeights`;
- mutation `(w, strength, rng) -> LoraWeights`;
- replacement `(fitness, n_offspring, elite) -> list[int]`: members the offspring replace.

Randomness: every random choice, index draws included, comes from the one `torch.Generator`
passed in (never the global torch, `random` or numpy state), and modules are visited in sorted
order, so the same seed gives the same result bit for bit and runs in parallel do not interfere.

Crossover and mutation work on each module's *update* dW = scale * B @ A, not on the factors:
the factors of an update are only defined up to an invertible R (B R, R^-1 A), so two adapters
trained independently have unrelated factor bases and averaging factors would mix noise. A
child is brought back to the requested rank and alpha with the truncated SVD of its update
(`ensemble_serve.shared.lora.refactor_low_rank`, which never forms the dense matrix).

Fitness is "higher is better" everywhere; NaN or infinite fitness is refused (`OperatorError`)
rather than sorted somewhere arbitrary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment

from ensemble_serve.shared.lora import LoraWeights, check_compatible, lora_scale, refactor_low_rank, svd_low_rank

RANK_POLICIES = ("error", "truncate", "pad")


class OperatorError(ValueError):
    """An operator asked to do something ill-defined (bad fitness, sizes, ranks or names)."""


# ----------------------------------------------------------------------------- helpers


def _check_fitness(fitness: Sequence[float]) -> list[float]:
    """Fitness as floats; refuses empty and non-finite values, whose order would be arbitrary."""
    values = [float(f) for f in fitness]
    if not values:
        raise OperatorError("fitness is empty")
    bad = [i for i, f in enumerate(values) if not math.isfinite(f)]
    if bad:
        raise OperatorError(f"non-finite fitness for member(s) {bad}: {[values[i] for i in bad]}")
    return values


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OperatorError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _best_first(fitness: Sequence[float]) -> list[int]:
    """Indices from best to worst; equal fitness keeps the lower index first (deterministic ties)."""
    return sorted(range(len(fitness)), key=lambda i: (-fitness[i], i))


def _randint(n: int, rng: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=rng).item())


# ----------------------------------------------------------------------------- selection


def elites(fitness: Sequence[float], count: int) -> list[int]:
    """The `count` fittest members, best first; ties go to the lower index."""
    values = _check_fitness(fitness)
    _check_count("elite count", count)
    if count > len(values):
        raise OperatorError(f"cannot keep {count} elites out of {len(values)} members")
    return _best_first(values)[:count]


def truncation(fitness: Sequence[float], k: int, rng: torch.Generator, *, fraction: float = 0.5) -> list[int]:
    """Uniform picks from the top ceil(fraction * n) members (at least one): strong, simple pressure."""
    values = _check_fitness(fitness)
    _check_count("k", k)
    if not (0 < fraction <= 1):
        raise OperatorError(f"truncation fraction must be in (0, 1], got {fraction!r}")
    pool = _best_first(values)[: max(1, math.ceil(fraction * len(values)))]
    draws = torch.randint(len(pool), (k,), generator=rng).tolist()
    return [pool[j] for j in draws]


def tournament(fitness: Sequence[float], k: int, rng: torch.Generator, *, size: int = 3) -> list[int]:
    """Each pick is the best of `size` members drawn without replacement; `size` tunes the pressure.

    `size` larger than the population is refused rather than clamped, as it would silently
    turn the tournament into "always the best".
    """
    values = _check_fitness(fitness)
    _check_count("k", k)
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
    values = _check_fitness(fitness)
    _check_count("k", k)
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


# ----------------------------------------------------------------------------- crossover


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


def _use_rslora(w: LoraWeights) -> bool:
    return bool(w.config.get("use_rslora", False))


def _scaled_factors(p: LoraWeights, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B * scale, A) in float64: a factorisation of the parent's update with the scale folded in."""
    a, b = p.factors[module]
    return b.to(torch.float64) * p.scale, a.to(torch.float64)


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
    rslora = _use_rslora(parents[0])
    used = [(wi, p) for wi, p in zip(w, parents) if wi > 0]
    factors = {}
    for module in parents[0].modules():
        bs, as_ = zip(*(_scaled_factors(p, module) for _, p in used))
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
    b, a = _scaled_factors(p, module)
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


def _orthonormalise(x: torch.Tensor) -> torch.Tensor:
    """QR with R's diagonal made non-negative: the orthonormal basis closest to x column by column."""
    q, r = torch.linalg.qr(x, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(0)


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
    rslora = _use_rslora(parents[0])
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
        u_new, v_new = _orthonormalise(u_mix[:, order]), _orthonormalise(v_mix[:, order])
        b_mix = u_new * s_mix[order].unsqueeze(0)
        factors[module] = refactor_low_rank(b_mix, v_new.T, rank, alpha, use_rslora=rslora)
    return parents[0].with_factors(factors, rank, alpha)


def layer_wise_plan(n_layers: int, weights: Sequence[float], rng: torch.Generator) -> list[int]:
    """Which parent each layer comes from: draws with probability proportional to `weights`.

    Entry j is for the j-th distinct layer index in ascending order. Exposed so callers can log
    the plan and tests can check it; `layer_wise` draws it with the same generator first.
    """
    _check_count("n_layers", n_layers)
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
    rslora = _use_rslora(first)
    child_scale = lora_scale(float(alpha), rank, rslora)
    factors = {}
    for module in first.modules():
        layer = first.layer_of(module)
        p = parents[0 if layer is None else plan[layer]]
        a, b = p.factors[module]
        if p.rank == rank:
            factors[module] = (a.clone(), b * (p.scale / child_scale))
        else:
            sb, sa = _scaled_factors(p, module)
            factors[module] = refactor_low_rank(sb, sa, rank, alpha, use_rslora=rslora)
    return first.with_factors(factors, rank, alpha)


# ----------------------------------------------------------------------------- mutation


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
    rslora = _use_rslora(w)
    factors = {}
    for module in w.modules():
        sb, sa = _scaled_factors(w, module)
        u, sv, vh = svd_low_rank(sb, sa)
        k = sv.shape[0]
        out, inn = u.shape[0], vh.shape[1]
        sv = sv * torch.exp(s * torch.randn(k, generator=rng, dtype=torch.float64))
        u = _orthonormalise(u + s * torch.randn(out, k, generator=rng, dtype=torch.float64) / math.sqrt(out))
        v = _orthonormalise(vh.T + s * torch.randn(inn, k, generator=rng, dtype=torch.float64) / math.sqrt(inn))
        factors[module] = refactor_low_rank(u * sv.unsqueeze(0), v.T, w.rank, w.alpha, use_rslora=rslora)
    return w.with_factors(factors, w.rank, w.alpha)


# ----------------------------------------------------------------------------- replacement


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
    values = _check_fitness(fitness)
    _check_count("n_offspring", n_offspring)
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
    values = _check_fitness(fitness)
    _check_count("n_offspring", n_offspring)
    keep = _check_elite(len(values), elite)
    free = len(values) - len(keep)
    if n_offspring != free:
        raise OperatorError(
            f"generational replacement needs exactly {free} offspring ({len(values)} members minus "
            f"{len(keep)} elites), got {n_offspring}; use 'weakest' to replace only part of the population"
        )
    return [i for i in range(len(values)) if i not in keep]


# ----------------------------------------------------------------------------- registries

SELECTION: dict[str, Callable[..., list[int]]] = {
    "truncation": truncation,
    "tournament": tournament,
    "fitness_proportional": fitness_proportional,
}
CROSSOVER: dict[str, Callable[..., LoraWeights]] = {
    "weighted_average": weighted_average,
    "svd_interpolate": svd_interpolate,
    "layer_wise": layer_wise,
}
MUTATION: dict[str, Callable[[LoraWeights, float, torch.Generator], LoraWeights]] = {
    "gaussian": gaussian,
    "dropout": dropout,
    "svd": svd,
}
REPLACEMENT: dict[str, Callable[[Sequence[float], int, Sequence[int]], list[int]]] = {
    "weakest": weakest,
    "generational": generational,
}
REGISTRIES: dict[str, dict[str, Any]] = {
    "selection": SELECTION,
    "crossover": CROSSOVER,
    "mutation": MUTATION,
    "replacement": REPLACEMENT,
}


def get_operator(kind: str, name: str) -> Callable[..., Any]:
    """The operator `name` of `kind`; unknown names fail listing what exists (config typos surface early)."""
    if kind not in REGISTRIES:
        raise OperatorError(f"unknown operator kind {kind!r}; known kinds: {sorted(REGISTRIES)}")
    registry = REGISTRIES[kind]
    if name not in registry:
        raise OperatorError(f"unknown {kind} operator {name!r}; known: {sorted(registry)}")
    return registry[name]
