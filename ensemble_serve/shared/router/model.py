"""The router's config and module: prompt features ``[B, D]`` -> one gate per member ``[B, M]``.

Two variants, chosen by :class:`RouterConfig` so that the ablation harness can compare them:

``softmax`` (the baseline)
    A linear layer (optionally one hidden layer) over the mean of the prompt's token embeddings,
    then a softmax over members. The gate is zero-sum: raising one member lowers all others.

``sigmoid_floor`` (the rewrite the design is built on)
    One independent sigmoid gate per member, ``g_i = floor_i + (1 - floor_i) * sigmoid(logit_i / T)``,
    with a learnable floor ``floor_i = floor_max * sigmoid(phi_i)`` so that no member is ever
    silenced completely, a temperature ``T`` annealed within ``[t_end, t_start]`` during training,
    and post-stack hidden states of the frozen base (mean-pooled) as the feature.

Each switch of the rewrite is reachable from the config so the factors can be crossed: ``feature``
is settable for both variants, ``floor_max=0`` removes the floor, and ``t_start == t_end`` removes
the anneal. The softmax baseline has no temperature (it always uses ``T = 1``). Invariants: gate
``i`` belongs to ``cfg.members[i]``; softmax rows sum to 1; sigmoid_floor gates lie in
``[floor_i, 1]`` with ``floor_i > 0`` whenever ``floor_max > 0``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ensemble_serve.shared.population.manifest import MEMBER_NAME_RE

__all__ = [
    "DEFAULT_FEATURE",
    "ROUTER_FORMAT_VERSION",
    "ROUTER_VARIANTS",
    "Anneal",
    "Feature",
    "Router",
    "RouterConfig",
    "RouterError",
    "RouterVariant",
    "Variant",
    "anneal_temperature",
]

ROUTER_FORMAT_VERSION = 1
"""The only ``router.json`` format version this code reads and writes."""

Feature = Literal["embedding_mean", "hidden_mean"]
Anneal = Literal["linear", "cosine"]


# --------------------------------------------------------------------------- variants


def softmax_gates(logits: torch.Tensor, floors: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax``: rows that sum to 1 (zero-sum); no floor and no temperature."""
    return torch.softmax(logits, dim=-1)


def sigmoid_floor_gates(logits: torch.Tensor, floors: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sigmoid_floor``: independent gates ``floor_i + (1 - floor_i) * sigmoid(logit_i / T)`` in ``[floor_i, 1]``."""
    return (floors + (1.0 - floors) * torch.sigmoid(logits / temperature)).clamp(max=1.0)


class RouterVariant(NamedTuple):
    """One router variant: how logits become gates, and what it reads and learns."""

    gates: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    """``(logits [B, M], floors [M], temperature) -> gates [B, M]``."""
    default_feature: Feature
    """The prompt feature it reads unless the config says otherwise (the baseline vs the rewrite)."""
    floored: bool
    """Whether it learns per-member gate floors (the ``phi`` parameter)."""


ROUTER_VARIANTS: dict[str, RouterVariant] = {
    "softmax": RouterVariant(softmax_gates, "embedding_mean", floored=False),
    "sigmoid_floor": RouterVariant(sigmoid_floor_gates, "hidden_mean", floored=True),
}
"""The router variants by name: the one list of them (``RouterConfig`` and the trainer's configs read it)."""

Variant = Literal[tuple(ROUTER_VARIANTS)]  # type: ignore[valid-type]  # the registry's names, as a pydantic type

DEFAULT_FEATURE: dict[str, Feature] = {name: v.default_feature for name, v in ROUTER_VARIANTS.items()}
"""The feature each variant uses unless the config says otherwise (the baseline vs the rewrite)."""

# A learnable floor must never reach exactly zero (float32 sigmoid underflows near -88), so phi is
# clamped here; sigmoid(-30) ~ 1e-13 is still a strictly positive floor.
_PHI_BOUND = 30.0


class RouterError(ValueError):
    """A router folder is missing, corrupt, or does not fit the population or base it is used with.

    The message names the folder and says what is wrong, so the server can log it and fall back
    to unrouted voting.
    """


# --------------------------------------------------------------------------- config


class RouterConfig(BaseModel):
    """Everything needed to rebuild a router's module from its weights, plus training provenance.

    Stored as ``router.json``. ``members`` fixes the gate order: gate ``i`` belongs to
    ``members[i]``, which is why a router only fits the population it was trained for.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = Field(default=ROUTER_FORMAT_VERSION, strict=True, description="router.json format version.")
    variant: Variant = Field(description="'softmax' (zero-sum baseline) or 'sigmoid_floor' (parallel floored gates).")
    members: list[str] = Field(min_length=1, description="Member names in gate order.")
    feature: Feature = Field(
        description="Prompt feature the router reads; default per variant (softmax: embedding_mean, "
        "sigmoid_floor: hidden_mean), settable so the ablation can cross them."
    )
    input_dim: int = Field(gt=0, strict=True, description="Feature dimension D.")
    hidden_dim: int = Field(default=0, ge=0, strict=True, description="Width of the one hidden layer; 0 = linear.")
    floor_max: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="sigmoid_floor: upper bound of each learnable floor; 0 removes the floor.",
    )
    t_start: float = Field(default=2.0, gt=0, allow_inf_nan=False, description="Anneal: temperature at step 0.")
    t_end: float = Field(default=0.5, gt=0, allow_inf_nan=False, description="Anneal: temperature at the last step.")
    anneal: Anneal = Field(default="cosine", description="Anneal schedule by step: 'linear' or 'cosine'.")
    temperature: float = Field(
        gt=0,
        allow_inf_nan=False,
        description="sigmoid_floor: temperature used at inference (default: t_end). Unused by softmax.",
    )
    base_model: str = Field(min_length=1, description="Name of the base model the features come from.")
    trained_steps: int = Field(default=0, ge=0, strict=True, description="Optimizer steps the router was trained for.")
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Free-form training report (loss, per-domain gate means...)."
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_variant(cls, data: Any) -> Any:
        """Fill ``feature`` from the variant and ``temperature`` from ``t_end`` when they are not given."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("feature") is None and data.get("variant") in DEFAULT_FEATURE:
            data["feature"] = DEFAULT_FEATURE[data["variant"]]
        if data.get("temperature") is None:
            data["temperature"] = data.get("t_end", 0.5)
        return data

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != ROUTER_FORMAT_VERSION:
            raise ValueError(f"format_version {v} is not supported; this code reads {ROUTER_FORMAT_VERSION}")
        return v

    @field_validator("members")
    @classmethod
    def _check_members(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if not isinstance(n, str) or not re.match(MEMBER_NAME_RE, n)]
        if bad:
            raise ValueError(f"invalid member names {bad}")
        dup = sorted({n for n in v if v.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate member names {dup}")
        return v

    @model_validator(mode="after")
    def _bounded_anneal(self) -> RouterConfig:
        if self.t_end > self.t_start:
            raise ValueError(f"t_end ({self.t_end}) must be <= t_start ({self.t_start}): the anneal only cools")
        return self


def anneal_temperature(step: int, total_steps: int, t_start: float, t_end: float, schedule: Anneal) -> float:
    """Temperature at ``step`` of ``total_steps``: ``t_start`` at step 0, ``t_end`` at the last step.

    Bounded on purpose: before step 0 it is ``t_start``, past the last step it stays ``t_end``, and
    the result is clamped to ``[t_end, t_start]`` so a schedule can never overshoot.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not (0 < t_end <= t_start):
        raise ValueError(f"need 0 < t_end <= t_start, got t_start={t_start}, t_end={t_end}")
    p = 1.0 if total_steps == 1 else min(max(step, 0) / (total_steps - 1), 1.0)
    if schedule == "linear":
        t = t_start + (t_end - t_start) * p
    elif schedule == "cosine":
        t = t_end + (t_start - t_end) * 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        raise ValueError(f"unknown anneal schedule {schedule!r}; known: linear, cosine")
    return min(max(t, t_end), t_start)


# --------------------------------------------------------------------------- module


class Router(torch.nn.Module):
    """Features ``[B, D]`` -> gates ``[B, M]``, one per member in ``cfg.members`` order.

    Features are standardised with stored per-dimension statistics (``feature_mean``,
    ``feature_scale``, set by the trainer from its training features) because hidden states and
    embedding means have arbitrary scales that a small linear head otherwise trains poorly on.
    """

    def __init__(self, cfg: RouterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.temperature = float(cfg.temperature)
        d, m, h = cfg.input_dim, len(cfg.members), cfg.hidden_dim
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_scale", torch.ones(d))
        self.hidden = torch.nn.Linear(d, h) if h else None
        self.out = torch.nn.Linear(h or d, m)
        # Floors start at floor_max / 2 (phi = 0) and are learned from there.
        self.phi = torch.nn.Parameter(torch.zeros(m)) if ROUTER_VARIANTS[cfg.variant].floored else None

    @property
    def members(self) -> list[str]:
        """Member names in gate order."""
        return list(self.cfg.members)

    @property
    def feature(self) -> Feature:
        """The feature this router reads (pass it to :class:`RouterFeatures`)."""
        return self.cfg.feature

    def config(self) -> RouterConfig:
        """The config to save: ``cfg`` with the current inference temperature."""
        return self.cfg.model_copy(update={"temperature": self.temperature})

    def set_temperature(self, t: float) -> None:
        """Set the sigmoid temperature used from now on (the softmax baseline ignores it)."""
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        self.temperature = float(t)

    def anneal(self, step: int, total_steps: int) -> float:
        """Set the temperature the config's schedule gives at ``step`` and return it."""
        t = anneal_temperature(step, total_steps, self.cfg.t_start, self.cfg.t_end, self.cfg.anneal)
        self.set_temperature(t)
        return t

    def floors(self) -> torch.Tensor:
        """Per-member lower bound of the gates ``[M]``: > 0 for sigmoid_floor (floor_max > 0), 0 for softmax."""
        if self.phi is None:
            return torch.zeros(len(self.cfg.members), device=self.out.weight.device)
        return self.cfg.floor_max * torch.sigmoid(self.phi.clamp(-_PHI_BOUND, _PHI_BOUND))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Raw per-member scores ``[B, M]`` before temperature and gating (the trainer's softmax loss needs them)."""
        if features.dim() != 2 or features.shape[1] != self.cfg.input_dim:
            raise RouterError(
                f"router expects features of shape [B, {self.cfg.input_dim}] ({self.cfg.feature} of "
                f"{self.cfg.base_model!r}), got {list(features.shape)}"
            )
        x = (features.to(self.out.weight.dtype) - self.feature_mean) / self.feature_scale
        if self.hidden is not None:
            x = torch.nn.functional.gelu(self.hidden(x))
        return self.out(x)

    def gates_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Turn logits into gates by the variant's rule: softmax rows, or floored sigmoids at the current temperature."""
        return ROUTER_VARIANTS[self.cfg.variant].gates(logits, self.floors(), self.temperature)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Gates ``[B, M]``: softmax rows sum to 1; sigmoid_floor gates lie in ``[floor_i, 1]``."""
        return self.gates_from_logits(self.logits(features))
