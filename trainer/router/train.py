"""Training the mixture router: fit per-member gates to per-prompt member quality.

Training data is a list of :class:`RouterExample` ``(prompt, domain, quality)``, where
``quality[i]`` in ``[0, 1]`` says how good member ``i`` is on that prompt: the correctness of
its answer (:func:`targets_from_correctness`) or, where no verifier exists, a softmax over members
of their log-likelihoods of the reference chain (:func:`targets_from_loglik`). Prompts become
features with :class:`ensemble_serve.shared.router.RouterFeatures`, the same code the server runs, so a
router never sees features at serving time that were computed differently from training.

The two variants learn different things, which is the point of the comparison:

* ``softmax`` learns a distribution over members (cross-entropy against ``quality / sum``): it can
  only say which member is *relatively* best, and rows where no member is good teach it nothing.
* ``sigmoid_floor`` learns, per member, the probability that it is good (binary cross-entropy
  against ``quality``), so several members can be on at once and none is ever fully off.

The result is saved into a population with :func:`ensemble_serve.shared.router.save_router`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from ensemble_serve.shared.router import Router, RouterConfig
from ensemble_serve.shared.router.model import Anneal, Feature, Variant

__all__ = [
    "RouterExample",
    "fit_router",
    "RouterTrainConfig",
    "quality_targets",
    "specialisation_score",
    "specialisation_table",
    "targets_from_correctness",
    "targets_from_loglik",
    "train_router",
]

LOSS_EVERY = 10
"""Steps between points of the recorded loss curve."""
_EPS = 1e-6


class RouterTrainConfig(BaseModel):
    """How to train a router (the router's own shape comes from here plus the feature dimension)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    variant: Variant = Field(
        "sigmoid_floor", description="'softmax' (zero-sum baseline) or 'sigmoid_floor' (parallel floored gates)."
    )
    feature: Feature | None = Field(
        None, description="Prompt feature; None = the variant's default (softmax: embedding_mean, else hidden_mean)."
    )
    hidden_dim: int = Field(0, ge=0, description="Width of one hidden layer; 0 = a linear router.")
    floor_max: float = Field(0.1, ge=0, lt=1, description="sigmoid_floor: upper bound of the learnable floors.")
    t_start: float = Field(2.0, gt=0, description="sigmoid_floor: temperature at the first step.")
    t_end: float = Field(0.5, gt=0, description="sigmoid_floor: temperature at the last step (and at inference).")
    anneal: Anneal = Field("cosine", description="Temperature schedule by step.")
    steps: int = Field(300, ge=1, description="Optimizer steps (by steps, so a seed gives one router).")
    lr: float = Field(1e-2, gt=0, description="AdamW learning rate (constant).")
    batch_size: int = Field(64, ge=1, description="Prompts per step (capped at the data size).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the layer weights (not biases/floors).")
    seed: int = Field(0, description="Seed of the initial weights and the batch order.")

    @model_validator(mode="after")
    def _bounded_anneal(self) -> RouterTrainConfig:
        if self.t_end > self.t_start:
            raise ValueError(f"t_end ({self.t_end}) must be <= t_start ({self.t_start}): the anneal only cools")
        return self


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class RouterExample:
    """One training prompt: its domain and each member's quality on it (in member order, in [0, 1])."""

    prompt: str
    domain: str
    quality: Sequence[float]


def quality_targets(
    examples: Sequence[RouterExample], members: Sequence[str]
) -> tuple[list[str], list[str], torch.Tensor]:
    """Split examples into ``(prompts, domains, quality [N, M])``, checking every quality vector.

    Each ``quality`` must have one finite value in ``[0, 1]`` per member, in ``members`` order,
    because the router's gate ``i`` is trained towards ``quality[i]``.
    """
    if not examples:
        raise ValueError("no router training examples")
    m = len(members)
    rows: list[list[float]] = []
    for n, ex in enumerate(examples):
        q = [float(x) for x in ex.quality]
        if len(q) != m:
            raise ValueError(f"example {n}: quality has {len(q)} values, expected one per member ({m})")
        if not all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in q):
            raise ValueError(f"example {n}: quality values must be finite and in [0, 1], got {q}")
        rows.append(q)
    return [ex.prompt for ex in examples], [ex.domain for ex in examples], torch.tensor(rows, dtype=torch.float32)


def targets_from_correctness(correct: torch.Tensor) -> torch.Tensor:
    """Quality from per-member correctness ``[N, M]`` (booleans or scores): the values clipped to ``[0, 1]``."""
    if correct.dim() != 2:
        raise ValueError(f"correct must be [N, M], got {list(correct.shape)}")
    return correct.to(torch.float32).nan_to_num(0.0).clamp(0.0, 1.0)


def targets_from_loglik(loglik: torch.Tensor, tau: float) -> torch.Tensor:
    """Quality from members' log-likelihoods of the reference chain ``[N, M]``: a softmax over members at ``tau``.

    Used where no verifier exists: the member that finds the reference most likely gets the most
    weight; a larger ``tau`` spreads the weight.
    """
    if loglik.dim() != 2:
        raise ValueError(f"loglik must be [N, M], got {list(loglik.shape)}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    if not torch.isfinite(loglik).all():
        raise ValueError("loglik contains NaN or inf")
    return torch.softmax(loglik.to(torch.float32) / tau, dim=-1)


# --------------------------------------------------------------------------- reports


def specialisation_table(
    gates: torch.Tensor, domains: Sequence[str], members: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Mean gate per domain per member: ``{domain: {member: mean gate}}`` (domains sorted).

    It shows whether the router routes by domain: a specialised router gives each domain's best
    member a clearly higher mean gate.
    """
    if gates.dim() != 2 or gates.shape[1] != len(members):
        raise ValueError(f"gates must be [N, {len(members)}], got {list(gates.shape)}")
    if gates.shape[0] != len(domains):
        raise ValueError(f"{gates.shape[0]} gate rows but {len(domains)} domains")
    table: dict[str, dict[str, float]] = {}
    for d in sorted(set(domains)):
        rows = torch.tensor([x == d for x in domains])
        mean = gates[rows].to(torch.float64).mean(dim=0)
        table[d] = {name: float(v) for name, v in zip(members, mean.tolist())}
    return table


def specialisation_score(table: dict[str, dict[str, float]]) -> float:
    """Mean over domains of the spread (max - min) of the members' mean gates: 0 = routes the same everywhere."""
    if not table:
        return 0.0
    spreads = [max(row.values()) - min(row.values()) for row in table.values()]
    return float(sum(spreads) / len(spreads))


# --------------------------------------------------------------------------- training


def _check_inputs(features: torch.Tensor, quality: torch.Tensor, members: Sequence[str]) -> None:
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty [N, D] tensor, got {list(features.shape)}")
    if quality.shape != (features.shape[0], len(members)):
        raise ValueError(
            f"quality must be [N, M] = [{features.shape[0]}, {len(members)}] (one row per feature row, one "
            f"column per member), got {list(quality.shape)}"
        )
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or inf")
    if not torch.isfinite(quality).all() or (quality < 0).any() or (quality > 1).any():
        raise ValueError("quality values must be finite and in [0, 1]")


def _softmax_targets(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target distributions and the rows to train on: rows where some member has quality > 0.

    A row where every member failed says nothing about who is relatively better, so it is
    skipped; if every row is like that, all rows train towards the uniform distribution.
    """
    sums = quality.sum(dim=1)
    keep = torch.nonzero(sums > 0).flatten()
    if keep.numel() == 0:
        m = quality.shape[1]
        return torch.full_like(quality, 1.0 / m), torch.arange(quality.shape[0])
    return quality / sums.clamp(min=_EPS).unsqueeze(1), keep


def _loss(router: Router, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = router.logits(x)
    if router.cfg.variant == "softmax":
        return -(target * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    g = router.gates_from_logits(logits).clamp(_EPS, 1.0 - _EPS)
    return -(target * g.log() + (1.0 - target) * (1.0 - g).log()).mean()


def train_router(
    features: torch.Tensor,
    quality: torch.Tensor,
    members: list[str],
    base_model: str,
    cfg: RouterTrainConfig,
    progress: bool = False,
    domains: Sequence[str] | None = None,
) -> tuple[Router, dict[str, Any]]:
    """Train a router on ``features [N, D]`` towards ``quality [N, M]``; return it (eval mode) and its metrics.

    ``softmax`` trains on the rows where some member is good (see :func:`_softmax_targets`);
    ``sigmoid_floor`` on every row. The loop itself is :func:`fit_router`.
    """
    _check_inputs(features, quality, members)
    q_all = quality.detach().to(torch.float32).cpu()
    if cfg.variant == "softmax":
        targets, rows = _softmax_targets(q_all)
    else:
        targets, rows = q_all, torch.arange(q_all.shape[0])

    def loss(router: Router, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return _loss(router, x, targets[idx])

    return fit_router(features, members, base_model, cfg, loss, rows=rows, progress=progress, domains=domains)


def fit_router(
    features: torch.Tensor,
    members: Sequence[str],
    base_model: str,
    cfg: RouterTrainConfig,
    loss_fn: Callable[[Router, torch.Tensor, torch.Tensor], torch.Tensor],
    rows: torch.Tensor | None = None,
    progress: bool = False,
    domains: Sequence[str] | None = None,
    label: str | None = None,
) -> tuple[Router, dict[str, Any]]:
    """The training loop shared by every router objective: ``loss_fn(router, x[idx], idx)`` on batches of ``rows``.

    Deterministic: the initial weights come from ``torch.manual_seed(cfg.seed)`` and the batch
    order from a generator seeded with ``cfg.seed``, so one seed gives one router. The temperature
    follows the anneal every step and is left at ``t_end`` for inference. Features are
    standardised with their training mean and standard deviation, stored in the router.

    Metrics (also stored in the router's config): ``final_loss`` (all ``rows``, inference
    temperature), ``loss_curve`` (``[step, loss]`` every 10 steps), ``mean_gate`` per member,
    and with ``domains``: ``specialisation`` (mean gate per domain per member) and
    ``specialisation_score``.
    """
    _check_features(features, domains)
    x_all = features.detach().to(torch.float32).cpu()
    rows = torch.arange(x_all.shape[0]) if rows is None else rows
    router = _new_router(x_all, members, base_model, cfg)
    curve = _train_steps(router, x_all, rows, cfg, loss_fn, progress, label)
    router.set_temperature(cfg.t_end)
    router.eval()
    metrics = _metrics(router, x_all, rows, members, loss_fn, curve, domains, label)
    router.cfg = router.cfg.model_copy(update={"trained_steps": cfg.steps, "metrics": metrics})
    return router, metrics


def _check_features(features: torch.Tensor, domains: Sequence[str] | None) -> None:
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty [N, D] tensor, got {list(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or inf")
    if domains is not None and len(domains) != features.shape[0]:
        raise ValueError(f"{len(domains)} domains for {features.shape[0]} feature rows")


def _new_router(x_all: torch.Tensor, members: Sequence[str], base_model: str, cfg: RouterTrainConfig) -> Router:
    """A router initialised from ``torch.manual_seed(cfg.seed)``, its features standardised on ``x_all``."""
    n, d = x_all.shape
    torch.manual_seed(cfg.seed)
    router = Router(
        RouterConfig(
            variant=cfg.variant,
            members=list(members),
            feature=cfg.feature,
            input_dim=d,
            hidden_dim=cfg.hidden_dim,
            floor_max=cfg.floor_max,
            t_start=cfg.t_start,
            t_end=cfg.t_end,
            anneal=cfg.anneal,
            base_model=base_model,
        )
    )
    with torch.no_grad():
        router.feature_mean.copy_(x_all.mean(dim=0))
        std = x_all.std(dim=0, unbiased=False) if n > 1 else torch.ones(d)
        router.feature_scale.copy_(torch.where(std > _EPS, std, torch.ones_like(std)))
    return router


def _train_steps(
    router: Router,
    x_all: torch.Tensor,
    rows: torch.Tensor,
    cfg: RouterTrainConfig,
    loss_fn: Callable[[Router, torch.Tensor, torch.Tensor], torch.Tensor],
    progress: bool,
    label: str | None,
) -> list[list[float]]:
    """``cfg.steps`` AdamW steps on batches of ``rows`` (weights decayed, biases not); returns the loss curve."""
    decay = [p for name, p in router.named_parameters() if name.endswith("weight")]
    no_decay = [p for name, p in router.named_parameters() if not name.endswith("weight")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = min(cfg.batch_size, rows.numel())
    order = rows[torch.randperm(rows.numel(), generator=gen)]
    pos = 0
    curve: list[list[float]] = []
    router.train()
    desc = f"router ({cfg.variant}{', ' + label if label else ''})"
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, unit="step")
    for step in bar:
        router.anneal(step, cfg.steps)
        if pos + batch > order.numel():  # new epoch: a fresh permutation from the same generator
            order, pos = rows[torch.randperm(rows.numel(), generator=gen)], 0
        idx = order[pos : pos + batch]
        pos += batch
        loss = loss_fn(router, x_all[idx], idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % LOSS_EVERY == 0 or step == cfg.steps - 1:
            curve.append([step, round(loss.item(), 6)])
            bar.set_postfix(loss=f"{loss.item():.4f}", t=f"{router.temperature:.2f}")
    return curve


def _metrics(
    router: Router,
    x_all: torch.Tensor,
    rows: torch.Tensor,
    members: Sequence[str],
    loss_fn: Callable[[Router, torch.Tensor, torch.Tensor], torch.Tensor],
    curve: list[list[float]],
    domains: Sequence[str] | None,
    label: str | None,
) -> dict[str, Any]:
    """The trained router's metrics (see :func:`fit_router`), at its inference temperature."""
    with torch.no_grad():
        final_loss = loss_fn(router, x_all[rows], rows).item()
        gates = router(x_all)
    metrics: dict[str, Any] = {
        "final_loss": final_loss,
        "loss_curve": curve,
        "mean_gate": {name: float(v) for name, v in zip(members, gates.mean(dim=0).tolist())},
        "floors": {name: float(v) for name, v in zip(members, router.floors().tolist())},
        "examples": x_all.shape[0],
    }
    if label:
        metrics["objective"] = label
    if domains is not None:
        table = specialisation_table(gates, domains, list(members))
        metrics["specialisation"] = table
        metrics["specialisation_score"] = specialisation_score(table)
    return metrics
