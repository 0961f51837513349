"""The members' LoRA updates as one gated mixture inside the frozen base model, for training and evaluation.

The server answers a ``mixture`` request with one adapter whose update is the gate-weighted sum of
the routed members' updates (:mod:`ensemble_serve.shared.mixture`). Offline, building and loading one
adapter per prompt would be slow, so :class:`MixtureLM` computes the same thing directly: every
target module of the base gets a forward hook that adds

    y += sum_i w[b, i] * s_i * B_i @ A_i @ x[b]        (per sequence b of the batch)

with all members' factors concatenated by rank, which is exactly the rank-concatenated adapter
:func:`ensemble_serve.shared.mixture.mix_exact` builds for the weights ``w[b]`` (the tests check the two
against PEFT). The weights may carry gradients, so a router can be trained *through* the mixture
(:func:`train_router_mixture`), and a batch may mix different prompts with different weights.

Weights are what the server uses: the router's gates, optionally kept to the top-k members, then
normalised to sum to 1 per prompt (:func:`mixture_weights`). One-hot weights give each member alone;
all-zero weights give the bare base model.

Evaluation is balanced log-perplexity of reference chains (:func:`domain_nll`, then
:func:`trainer.study.stats.balanced_log_ppl`): the assistant turn's token NLL summed per domain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ensemble_serve.shared.lora import LoraWeights
from trainer.evolve.seeds import derive_seed
from trainer.router.train import fit_router
from trainer.tasks.data import IGNORE, collate, encode_example
from trainer.tasks.sandbox import Problem

__all__ = [
    "MixtureLM",
    "MixtureLMError",
    "domain_nll",
    "encode_chains",
    "member_nll",
    "mixture_weights",
    "sequence_nlls",
    "train_router_mixture",
]

_PEFT_PREFIX = "base_model.model."


class MixtureLMError(ValueError):
    """Members that cannot be attached to this base, or inputs that do not fit (shapes, NaN weights)."""


def mixture_weights(gates: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Per-prompt mixture weights ``[N, M]`` from gates ``[N, M]``: top-k kept (ties to the lower index), rows sum to 1.

    The same rule as the server's routed mixture (:func:`ensemble_serve.shared.router.top_k` then
    :func:`ensemble_serve.shared.router.normalised_weights`); a row whose kept gates are all zero becomes
    uniform over the kept members. Differentiable in the gates when ``top_k`` is None.
    """
    if gates.dim() != 2 or gates.shape[1] == 0:
        raise MixtureLMError(f"gates must be [N, M] with M >= 1, got {list(gates.shape)}")
    if not torch.isfinite(gates).all() or (gates < 0).any():
        raise MixtureLMError("gates must be finite and >= 0")
    m = gates.shape[1]
    if top_k is None or top_k >= m:
        keep = torch.ones_like(gates, dtype=torch.bool)
    else:
        if top_k < 1:
            raise MixtureLMError(f"top_k must be >= 1, got {top_k}")
        # a stable sort by -gate keeps the lower index first among equal gates, as the server's top_k does
        order = torch.sort(-gates.detach(), dim=1, stable=True).indices[:, :top_k]
        keep = torch.zeros_like(gates, dtype=torch.bool).scatter_(1, order, True)
    kept = torch.where(keep, gates, torch.zeros_like(gates))
    total = kept.sum(dim=1, keepdim=True)
    uniform = keep.to(gates.dtype) / keep.sum(dim=1, keepdim=True).to(gates.dtype)
    return torch.where(total > 0, kept / total.clamp(min=torch.finfo(gates.dtype).tiny), uniform)


@dataclass
class _Slot:
    """One target module: all members' factors, concatenated by rank."""

    a: torch.Tensor  # [R, in]
    b: torch.Tensor  # [out, R], each member's block already multiplied by its scale
    owner: torch.Tensor  # [R] member index of each rank row


class MixtureLM:
    """A frozen causal LM with every member attached as a gated, rank-concatenated LoRA mixture.

    ``members`` are the adapters (:class:`ensemble_serve.shared.lora.LoraWeights`) in the order their
    weights will come in. Modules a member does not target get no contribution from it. The base
    is loaded once in float32, eval mode, no gradients of its own.
    """

    def __init__(self, base_dir: str | Path, members: Sequence[LoraWeights], names: Sequence[str]) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not members:
            raise MixtureLMError("a mixture needs at least one member")
        if len(names) != len(members):
            raise MixtureLMError(f"{len(names)} names for {len(members)} members")
        self.names = list(names)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self._weights: torch.Tensor | None = None
        self._hooks: list[Any] = []
        modules = dict(self.model.named_modules())
        targets = sorted({mod for w in members for mod in w.modules()})
        for prefix in targets:
            name = prefix[len(_PEFT_PREFIX) :] if prefix.startswith(_PEFT_PREFIX) else prefix
            module = modules.get(name)
            if not isinstance(module, torch.nn.Linear):
                raise MixtureLMError(f"adapter module {prefix!r} is not a linear layer of this base model")
            a_parts, b_parts, owners = [], [], []
            for i, w in enumerate(members):
                if prefix not in w.factors:
                    continue
                a, b = w.factors[prefix]
                if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
                    raise MixtureLMError(
                        f"{self.names[i]}: {prefix} is {b.shape[0]}x{a.shape[1]}, the base's layer is "
                        f"{module.out_features}x{module.in_features} (an adapter for another base?)"
                    )
                a_parts.append(a)
                b_parts.append(b * w.scale)
                owners.append(torch.full((a.shape[0],), i, dtype=torch.long))
            slot = _Slot(torch.cat(a_parts), torch.cat(b_parts, dim=1), torch.cat(owners))
            self._hooks.append(module.register_forward_hook(self._hook(slot)))

    def _hook(self, slot: _Slot):
        def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            w = self._weights
            if w is None:
                return output
            x = inputs[0]
            if x.shape[0] != w.shape[0]:
                raise MixtureLMError(f"batch of {x.shape[0]} sequences but {w.shape[0]} weight rows")
            u = x @ slot.a.T  # [B, T, R]
            cols = w[:, slot.owner]  # [B, R]
            return output + (u * cols.unsqueeze(1)) @ slot.b.T

        return hook

    def perturb_base(self, sigma: float, seed: int) -> list[str]:
        """Add Gaussian noise to the base's weight matrices in place: N(0, (sigma x the matrix's RMS)^2) per entry.

        Every parameter with two or more dimensions (linear layers, embeddings; a tied embedding
        once) gets its own generator, seeded by ``seed`` and its name, so the same call on the same
        base gives the same weights; norms and biases stay. The adapters are untouched. Returns
        the names of the perturbed parameters.
        """
        if not (sigma > 0 and torch.isfinite(torch.tensor(sigma))):
            raise MixtureLMError(f"a base perturbation needs a finite sigma > 0, got {sigma}")
        done = []
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if param.dim() < 2:
                    continue
                rms = param.float().pow(2).mean().sqrt()
                rng = torch.Generator().manual_seed(derive_seed("base-perturbation", seed, name))
                noise = torch.randn(param.shape, generator=rng, dtype=torch.float32)
                param.add_((noise * (sigma * rms)).to(param.dtype))
                done.append(name)
        return done

    def close(self) -> None:
        """Remove the hooks (the base model is then plain again)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @contextlib.contextmanager
    def weighted(self, weights: torch.Tensor) -> Iterator[None]:
        """Within the block, forward passes use mixture weights ``[B, M]`` (one row per sequence of the batch)."""
        if weights.dim() != 2 or weights.shape[1] != len(self.names):
            raise MixtureLMError(f"weights must be [B, {len(self.names)}], got {list(weights.shape)}")
        if not torch.isfinite(weights).all():
            raise MixtureLMError("mixture weights contain NaN or inf")
        self._weights = weights.to(torch.float32)
        try:
            yield
        finally:
            self._weights = None

    def sequence_nll(self, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed token NLL of the labelled positions and their count, per sequence (``[B]`` each)."""
        with self.weighted(weights):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return -(picked * mask).sum(dim=1), mask.sum(dim=1)


def encode_chains(lm: MixtureLM, problems: Sequence[Problem]) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (assistant turn only) of each problem's reference chain."""
    missing = [i for i, p in enumerate(problems) if not p.chain]
    if missing:
        raise MixtureLMError(f"problems {missing[:5]} have no reference chain to score")
    return [encode_example(lm.tokenizer, p, lm.max_len) for p in problems]


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def sequence_nlls(
    lm: MixtureLM, encoded: Sequence[tuple[list[int], list[int]]], weights: torch.Tensor, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and token count of every encoded chain under its row of ``weights [N, M]``."""
    if weights.shape[0] != len(encoded):
        raise MixtureLMError(f"{weights.shape[0]} weight rows for {len(encoded)} chains")
    nll, count = [], []
    for s in _batches(len(encoded), batch_size):
        a, b = lm.sequence_nll(collate(encoded[s], lm.tokenizer.pad_token_id), weights[s])
        nll.append(a)
        count.append(b)
    return torch.cat(nll).double(), torch.cat(count).long()


def domain_nll(
    lm: MixtureLM, problems: Sequence[Problem], weights: torch.Tensor, batch_size: int = 32, encoded=None
) -> dict[str, tuple[float, int]]:
    """``{domain: (sum of token NLL, token count)}`` of the reference chains under per-prompt mixture weights."""
    encoded = encoded if encoded is not None else encode_chains(lm, problems)
    nll, count = sequence_nlls(lm, encoded, weights, batch_size)
    out: dict[str, list[float]] = {}
    for p, a, b in zip(problems, nll.tolist(), count.tolist()):
        acc = out.setdefault(p.domain, [0.0, 0])
        acc[0] += a
        acc[1] += b
    return {d: (v[0], int(v[1])) for d, v in sorted(out.items())}


def member_nll(
    lm: MixtureLM, encoded: Sequence[tuple[list[int], list[int]]], batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member alone: summed NLL ``[N, M]`` of every chain, and the token counts ``[N]``."""
    m = len(lm.names)
    cols = []
    count = torch.zeros(0, dtype=torch.long)
    for i in range(m):
        onehot = torch.zeros(len(encoded), m)
        onehot[:, i] = 1.0
        nll, count = sequence_nlls(lm, encoded, onehot, batch_size)
        cols.append(nll)
    return torch.stack(cols, dim=1), count


def train_router_mixture(
    lm: MixtureLM,
    features: torch.Tensor,
    encoded: Sequence[tuple[list[int], list[int]]],
    base_model: str,
    cfg: Any,
    progress: bool = False,
    domains: Sequence[str] | None = None,
):
    """Train a router end to end through the mixture: minimise the token NLL of the reference chains.

    Each step takes a batch of prompts, turns the router's gates into mixture weights
    (:func:`mixture_weights`, all members) and back-propagates the mixed model's mean token NLL
    into the router only. Same initialisation, schedule, anneal and metrics as
    :func:`trainer.router.train.train_router` (``cfg`` is a :class:`trainer.router.train.RouterTrainConfig`).
    """
    if features.shape[0] != len(encoded):
        raise MixtureLMError(f"{features.shape[0]} feature rows for {len(encoded)} chains")
    pad = lm.tokenizer.pad_token_id

    def loss(router: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        batch = collate([encoded[i] for i in idx.tolist()], pad)
        nll, count = lm.sequence_nll(batch, mixture_weights(router(x)))
        return nll.sum() / count.sum().clamp(min=1)

    return fit_router(features, lm.names, base_model, cfg, loss, progress=progress, domains=domains, label="mixture")
