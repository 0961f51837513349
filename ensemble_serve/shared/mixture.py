"""Mix members' LoRA updates into one prompt-specific adapter.

Fanning a request out to k members costs k passes of the base model. When the router's gates are
meant as a *mixture* instead of a vote, the same prompt can be answered by one pass through one
adapter whose update is the gate-weighted sum of the members' updates:

    dW = sum_i w_i * dW_i,    dW_i = s_i * B_i @ A_i,    sum_i w_i = 1

Two ways to build that adapter, both without ever forming a dense (out x in) matrix:

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

`mix` chooses between them under vLLM's ``max_lora_rank`` and `MixtureCache` keeps a bounded set
of mixed adapter folders on disk so a repeated route is mixed once. The output is a standard PEFT
adapter (same base model, target modules and module prefixes as the members), so vLLM loads it
like any member; its rank is not padded up to a vLLM rank, since vLLM accepts any r up to
``max_lora_rank``.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ensemble_serve.shared.vllm import ADAPTER_FILES, VLLM_LORA_RANKS, adapter_digest
from ensemble_serve.shared.fsutil import fsync_dir, remove_tree, tmp_dir_beside
from ensemble_serve.shared.lora import LoraError, LoraWeights, check_compatible, load_lora, refactor_low_rank, save_lora

__all__ = [
    "DEFAULT_DECIMALS",
    "MIX_NAME_PREFIX",
    "MixtureCache",
    "MixtureError",
    "Mode",
    "mix",
    "mix_exact",
    "mix_truncated",
    "mixture_cost",
    "truncation_error",
    "vllm_rank",
]

Mode = Literal["exact", "truncated"]
Weights = Sequence[float] | torch.Tensor

MIX_NAME_PREFIX = "mix-"
"""Mixed adapters are named ``mix-<first 12 hex of the route key>`` (stable across processes)."""
DEFAULT_DECIMALS = 3
"""Decimals normalised weights are rounded to in the cache key: routes closer than this share an adapter."""

_KEY_HEX = 12
_KEY_VERSION = 1  # bump when the meaning of a key (or of the mixing) changes, so old entries never match
_ENTRY_RE = re.compile(rf"^{re.escape(MIX_NAME_PREFIX)}[0-9a-f]{{{_KEY_HEX}}}$")
_TMP_RE = re.compile(rf"^\.{re.escape(MIX_NAME_PREFIX)}[0-9a-f]{{{_KEY_HEX}}}\.tmp-")
_DIGEST_MEMO_MAX = 4096


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


def _normalise(weights: Weights, names: Sequence[str]) -> list[float]:
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


def _check_rank(value: Any, what: str) -> int:
    """A rank-like count as a positive int; bools are refused although they are ints, since True is never meant as 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MixtureError(f"{what} must be a positive integer (>= 1), got {value!r}")
    return value


def _check_mode(mode: Any) -> Mode:
    """Refuse unknown modes up front rather than silently falling back to one of the two."""
    if mode not in ("exact", "truncated"):
        raise MixtureError(f"mode must be 'exact' or 'truncated', got {mode!r}")
    return mode


def _check_members(members: Sequence[LoraWeights], names: Sequence[str] | None) -> list[str]:
    """Refuse an empty or incompatible set, converting `check_compatible`'s LoraError into a MixtureError."""
    if isinstance(members, LoraWeights) or not isinstance(members, Sequence) or not members:
        raise MixtureError("members must be a non-empty sequence of LoraWeights")
    bad = [i for i, m in enumerate(members) if not isinstance(m, LoraWeights)]
    if bad:
        raise MixtureError(f"members at positions {bad} are not LoraWeights")
    resolved = _member_names(len(members), names)
    try:
        check_compatible(list(members), resolved)
    except LoraError as e:
        raise MixtureError(f"incompatible members: {e}") from e
    return resolved


@dataclass(frozen=True)
class _Plan:
    """What `mix` will build: the resolved mode and rank, and the concatenated rank it starts from."""

    mode: Mode
    rank: int
    exact_rank: int
    active: tuple[int, ...]


def _plan(ranks: Sequence[int], weights: Sequence[float], mode: Any, rank: Any, max_rank: Any) -> _Plan:
    """The single place `mix` and `mixture_cost` decide the mode and rank, so the cost they report matches."""
    mode = _check_mode(mode)
    if max_rank is not None:
        max_rank = _check_rank(max_rank, "max_rank")
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
    rank = _check_rank(rank, "rank")
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
) -> tuple[list[float], tuple[int, ...]]:
    """Validate members and weights once; the normalised weights and the indices of members with a positive one."""
    resolved = _check_members(members, names)
    normalised = _normalise(weights, resolved)
    return normalised, tuple(i for i, w in enumerate(normalised) if w > 0)


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
    normalised, active = _prepare(members, weights, names)
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
    rank = _check_rank(rank, "rank")
    normalised, active = _prepare(members, weights, names)
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
    normalised, active = _prepare(members, weights, names)
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
    r = _check_rank(r, "rank")
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
    normalised, active = _prepare(members, weights, names)
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
    ranks = [_check_rank(r, "member rank") for r in members_ranks]
    if not ranks:
        raise MixtureError("members_ranks must name at least one member")
    normalised = _normalise(weights, _member_names(len(ranks), None))
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


# --------------------------------------------------------------------------- cache


@dataclass
class _Pending:
    """A mix being computed by one thread; the others asking for the same key wait on it instead of recomputing."""

    done: threading.Event
    result: tuple[str, Path] | None = None
    error: BaseException | None = None


def _identity(path: Path) -> tuple[int, int, int]:
    """(inode, size, mtime in ns): changes whenever the file is rewritten or atomically replaced."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


class MixtureCache:
    """A bounded LRU of mixed adapter folders under `root`, one folder per route.

    The key is the sha256 of the route: the content digests of the members with a positive
    rounded weight, in order, their normalised weights rounded to `decimals`, the mode, the rank
    and the engine's max_rank (which can turn an exact request into a truncated one). Content
    digests, not member names, make a retrained member a new route; rounding lets gates that differ
    only in noise share an entry; zero-weight members are left out because they change nothing.
    The adapter is mixed from the rounded weights, so an entry depends only on its key.

    Entries are written into a temp folder beside their final name and renamed (atomic), so vLLM
    never sees a half-written adapter. The oldest entries' folders are deleted beyond `capacity`;
    keep it above the number of mixed adapters in use at once, since an evicted folder vanishes
    even if a request still means to load it. One cache per root: leftover ``mix-*`` folders from
    an earlier process are deleted on start, as nothing tracks them any more. Thread-safe; one
    thread computes a given key while the others asking for it wait for that result.
    """

    def __init__(self, root: str | os.PathLike[str], capacity: int = 32, *, decimals: int = DEFAULT_DECIMALS) -> None:
        self.capacity = _check_rank(capacity, "capacity")
        if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 12:
            raise MixtureError(f"decimals must be an integer in [0, 12], got {decimals!r}")
        self.decimals = decimals
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.iterdir():
            if _ENTRY_RE.match(stale.name) or _TMP_RE.match(stale.name):
                remove_tree(stale)
        self._entries: OrderedDict[str, tuple[str, Path]] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._digests: dict[tuple[Any, ...], str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Entries held (their folders exist on disk)."""
        with self._lock:
            return len(self._entries)

    def names(self) -> list[str]:
        """Adapter names held, least recently used first."""
        with self._lock:
            return [name for name, _ in self._entries.values()]

    def get_or_create(
        self,
        members: Sequence[tuple[str, str | os.PathLike[str]]],
        weights: Weights,
        mode: Mode = "exact",
        rank: int | None = None,
        max_rank: int | None = None,
    ) -> tuple[str, Path, bool]:
        """(adapter name, folder, created) for this route, mixing and writing it only on a miss.

        `members` are (name, adapter folder) pairs; names label members in error messages only.
        """
        if isinstance(members, str | bytes) or not isinstance(members, Sequence) or not members:
            raise MixtureError("members must be a non-empty sequence of (name, folder) pairs")
        names = [str(name) for name, _ in members]
        rounded = [round(w, self.decimals) for w in _normalise(weights, names)]
        active = [i for i, w in enumerate(rounded) if w > 0]
        if not active:
            raise MixtureError(f"all weights round to zero at {self.decimals} decimals")
        _check_mode(mode)
        if rank is not None:
            _check_rank(rank, "rank")
        if max_rank is not None:
            _check_rank(max_rank, "max_rank")
        route = {
            "version": _KEY_VERSION,
            "members": [[self._digest(names[i], members[i][1]), f"{rounded[i]:.{self.decimals}f}"] for i in active],
            "mode": mode,
            "rank": rank,
            "max_rank": max_rank,
        }
        key = hashlib.sha256(json.dumps(route, sort_keys=True).encode()).hexdigest()

        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit[0], hit[1], False
            pending = self._pending.get(key)
            owner = pending is None
            if pending is None:
                pending = self._pending[key] = _Pending(threading.Event())
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.result is not None
            return pending.result[0], pending.result[1], False

        name = f"{MIX_NAME_PREFIX}{key[:_KEY_HEX]}"
        folder = self.root / name
        evicted: list[Path] = []
        try:
            loaded = [self._load(names[i], members[i][1]) for i in active]
            mixed = mix(loaded, [rounded[i] for i in active], mode, rank, max_rank, names=[names[i] for i in active])
            self._write(mixed, folder)
            pending.result = (name, folder)
            with self._lock:
                self._entries[key] = (name, folder)
                self._pending.pop(key, None)
                while len(self._entries) > self.capacity:
                    _, (_, old) = self._entries.popitem(last=False)
                    evicted.append(old)
        except BaseException as e:
            pending.error = e
            with self._lock:
                self._pending.pop(key, None)
            raise
        finally:
            pending.done.set()
            for old in evicted:
                remove_tree(old)
        return name, folder, True

    def _write(self, mixed: LoraWeights, folder: Path) -> None:
        """Save into a temp folder beside `folder`, then rename: readers see the whole adapter or none."""
        tmp = tmp_dir_beside(folder)
        try:
            save_lora(mixed, tmp)
            remove_tree(folder)  # only an untracked leftover can be there: the calling thread owns the key
            os.rename(tmp, folder)
        except BaseException:
            remove_tree(tmp)
            raise
        fsync_dir(self.root)

    def _digest(self, name: str, folder: str | os.PathLike[str]) -> str:
        """The member folder's content digest, memoised on its files' identity so a cache hit does not re-hash weights."""
        path = Path(folder)
        try:
            stats = tuple((f, *_identity(path / f)) for f in ADAPTER_FILES)
        except OSError as e:
            raise MixtureError(f"member {name}: cannot read adapter folder {path}: {e}") from e
        memo_key = (str(path.resolve()), stats)
        with self._lock:
            known = self._digests.get(memo_key)
        if known is not None:
            return known
        try:
            digest = adapter_digest(path)
        except OSError as e:
            raise MixtureError(f"member {name}: cannot read adapter folder {path}: {e}") from e
        with self._lock:
            if len(self._digests) >= _DIGEST_MEMO_MAX:
                self._digests.clear()
            self._digests[memo_key] = digest
        return digest

    @staticmethod
    def _load(name: str, folder: str | os.PathLike[str]) -> LoraWeights:
        """Load a member, naming it in the error, so a bad route reads as a MixtureError like every other."""
        try:
            return load_lora(folder)
        except LoraError as e:
            raise MixtureError(f"member {name}: {e}") from e
