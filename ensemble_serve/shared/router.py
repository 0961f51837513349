"""The mixture router: given a prompt, one weight (gate) per population member.

The server uses the gates to pick the top-k members a request fans out to and to weight their
votes. Two variants, chosen by :class:`RouterConfig` so that the ablation harness can compare them:

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
the anneal. The softmax baseline has no temperature (it always uses ``T = 1``).

On disk a router is the reserved ``router/`` folder of a population directory: ``router.json``
(the config) and ``router.safetensors`` (the weights, never pickle), written together atomically.
This module is the inference side; training lives in the trainer, which writes through
:func:`save_router`. Only torch, safetensors and pydantic are imported at module level;
transformers loads when :class:`RouterFeatures` is built.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors.torch import load_file, save

from ensemble_serve.shared.fsutil import fsync_dir, remove_tree, tmp_dir_beside
from ensemble_serve.shared.population import MEMBER_NAME_RE

__all__ = [
    "DEFAULT_FEATURE",
    "ROUTER_CONFIG",
    "ROUTER_DIR",
    "ROUTER_FORMAT_VERSION",
    "ROUTER_WEIGHTS",
    "Router",
    "RouterConfig",
    "RouterError",
    "RouterFeatures",
    "anneal_temperature",
    "load_router",
    "normalised_weights",
    "safe_gates",
    "save_router",
    "top_k",
]

ROUTER_DIR = "router"
"""Name of the router folder inside a population directory (reserved by the population format)."""
ROUTER_CONFIG = "router.json"
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_FORMAT_VERSION = 1
"""The only ``router.json`` format version this code reads and writes."""

Variant = Literal["softmax", "sigmoid_floor"]
Feature = Literal["embedding_mean", "hidden_mean"]
Anneal = Literal["linear", "cosine"]

DEFAULT_FEATURE: dict[str, Feature] = {"softmax": "embedding_mean", "sigmoid_floor": "hidden_mean"}
"""The feature each variant uses unless the config says otherwise (the baseline vs the rewrite)."""

# A learnable floor must never reach exactly zero (float32 sigmoid underflows near -88), so phi is
# clamped here; sigmoid(-30) ~ 1e-13 is still a strictly positive floor.
_PHI_BOUND = 30.0
# Slack for float rounding when checking gates against their bounds.
_GATE_TOL = 1e-5
_SUM_TOL = 1e-3


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
        self.phi = torch.nn.Parameter(torch.zeros(m)) if cfg.variant == "sigmoid_floor" else None

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
        """Turn logits into gates: softmax rows, or floored sigmoids at the current temperature."""
        if self.cfg.variant == "softmax":
            return torch.softmax(logits, dim=-1)
        floor = self.floors()
        return (floor + (1.0 - floor) * torch.sigmoid(logits / self.temperature)).clamp(max=1.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Gates ``[B, M]``: softmax rows sum to 1; sigmoid_floor gates lie in ``[floor_i, 1]``."""
        return self.gates_from_logits(self.logits(features))


# --------------------------------------------------------------------------- files


def save_router(router: Router, folder: str | os.PathLike[str]) -> Path:
    """Write ``router.json`` + ``router.safetensors`` into ``folder`` atomically and return it.

    Both files go into a temporary folder beside ``folder`` that is then renamed onto it, so a
    reader never sees weights from one training with the config of another. An existing folder is
    first moved aside and deleted only after the new one is in place (it is restored if the swap
    fails); between the two renames a reader finds no router and falls back to unrouted voting.
    """
    target = Path(folder)
    cfg = router.config()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in router.state_dict().items()}
    tmp = tmp_dir_beside(target)
    old: Path | None = None
    try:
        (tmp / ROUTER_WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
        (tmp / ROUTER_CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
        for name in (ROUTER_WEIGHTS, ROUTER_CONFIG):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if target.exists() or target.is_symlink():
            old = tmp_dir_beside(target)
            os.rename(target, old / "previous")
        try:
            os.rename(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(old / "previous", target)
                remove_tree(old)
                old = None
            raise
        fsync_dir(target.parent)
    finally:
        remove_tree(tmp)
        if old is not None:
            remove_tree(old)
    return target


def _read_config(folder: Path) -> RouterConfig:
    path = folder / ROUTER_CONFIG
    if not path.is_file():
        raise RouterError(f"{path}: router config is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RouterError(f"{path}: router config is not readable JSON ({e})") from e
    if not isinstance(raw, dict):
        raise RouterError(f"{path}: router config must be a JSON object, got {type(raw).__name__}")
    try:
        return RouterConfig.model_validate(raw)
    except ValidationError as e:
        raise RouterError(f"{path}: invalid router config:\n{e}") from e


def _read_weights(folder: Path, router: Router) -> dict[str, torch.Tensor]:
    path = folder / ROUTER_WEIGHTS
    if not path.is_file():
        raise RouterError(f"{path}: router weights are missing")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several kinds on a damaged file; all mean "corrupt"
        raise RouterError(f"{path}: router weights are not a readable safetensors file ({e})") from e
    expected = {k: v.shape for k, v in router.state_dict().items()}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise RouterError(
            f"{path}: weights do not match {ROUTER_CONFIG} (variant {router.cfg.variant!r}, "
            f"hidden_dim {router.cfg.hidden_dim}): missing tensors {missing}, unexpected tensors {extra}"
        )
    for k, shape in expected.items():
        t = tensors[k]
        if t.shape != shape:
            raise RouterError(
                f"{path}: tensor {k!r} has shape {list(t.shape)}, {ROUTER_CONFIG} implies {list(shape)} "
                f"(input_dim {router.cfg.input_dim}, {len(router.cfg.members)} members)"
            )
        if not t.is_floating_point():
            raise RouterError(f"{path}: tensor {k!r} has dtype {t.dtype}, expected a floating-point type")
        if not torch.isfinite(t).all():
            raise RouterError(f"{path}: tensor {k!r} contains NaN or inf")
    return tensors


def _check_members(folder: Path, have: list[str], expected: list[str]) -> None:
    if have == expected:
        return
    lead = f"{folder}: router was trained for another population"
    missing = [n for n in expected if n not in have]
    extra = [n for n in have if n not in expected]
    parts = []
    if missing:
        parts.append(f"no gate for population member(s) {missing}")
    if extra:
        parts.append(f"gates for member(s) {extra} that are not in the population")
    if not parts and len(have) != len(expected):
        parts.append(f"member count differs: router has {len(have)}, population has {len(expected)}")
    if not parts:
        parts.append(f"same members in a different order: router {have}, population {expected}")
    raise RouterError(f"{lead}: " + "; ".join(parts))


def load_router(
    folder: str | os.PathLike[str],
    expected_members: Sequence[str] | None = None,
    base_model: str | None = None,
) -> Router:
    """Load a router saved by :func:`save_router`, in eval mode.

    ``expected_members`` (the population's member names in manifest order) and ``base_model``
    (the population's base model name) are checked when given: gates are positional, so a router
    trained for other members or on another base would route to the wrong adapters.
    Every failure is a :class:`RouterError`.
    """
    root = Path(folder)
    if not root.is_dir():
        raise RouterError(f"{root}: router folder not found")
    cfg = _read_config(root)
    if expected_members is not None:
        _check_members(root, list(cfg.members), list(expected_members))
    if base_model is not None and cfg.base_model != base_model:
        raise RouterError(
            f"{root}: router was trained on base model {cfg.base_model!r}, but the population uses {base_model!r}"
        )
    router = Router(cfg)
    router.load_state_dict(_read_weights(root, router))
    return router.eval()


# --------------------------------------------------------------------------- serving helpers


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


# --------------------------------------------------------------------------- features


class RouterFeatures:
    """Prompt features from the frozen base model, computed the same way in training and serving.

    The base is loaded once (float32, eval, no grad). Prompts are rendered as one user turn with
    the generation prompt, exactly what the members see, then batched with right padding so real
    tokens never attend to (or get positions shifted by) pads; pooling respects the attention mask,
    so a prompt's feature does not depend on what it is batched with.

    ``embedding_mean``: mean of the input embeddings of the prompt tokens.
    ``hidden_mean``: mean of the last hidden state, i.e. after the final norm (in Hugging Face
    decoders ``output_hidden_states=True``'s last entry equals this ``last_hidden_state``); it is
    taken from the decoder stack alone so the LM head is never computed.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        device: str = "cpu",
        batch_size: int = 32,
        max_length: int | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise RouterError(f"{self.model_dir}: base model folder not found")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        if self.tokenizer.pad_token_id is None:  # only a mask-respecting pad is needed; any token id works
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        # Over-long prompts keep their end: the generation prompt is what the model answers from.
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        self.model.to(self.device).eval().requires_grad_(False)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = max_length or limit
        # Fast tokenizers are not safe to call with per-call padding/truncation from several threads.
        self._lock = threading.Lock()

    def dim(self, feature: str) -> int:
        """Feature dimension D for ``feature``."""
        if feature == "embedding_mean":
            return int(self.model.get_input_embeddings().weight.shape[1])
        if feature == "hidden_mean":
            return int(self.model.config.get_text_config().hidden_size)
        raise RouterError(f"unknown router feature {feature!r}; known: embedding_mean, hidden_mean")

    def render(self, prompt: str) -> str:
        """The chat-templated text of one user turn with the generation prompt (raw text without a template)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def __call__(self, prompts: Sequence[str], feature: str) -> torch.Tensor:
        """Features ``[len(prompts), dim(feature)]`` (float32, on CPU)."""
        d = self.dim(feature)
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        texts = [self.render(p) for p in prompts]
        out: list[torch.Tensor] = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                out.append(self._pool(texts[i : i + self.batch_size], feature).cpu())
        return torch.cat(out) if out else torch.zeros(0, d)

    def _pool(self, texts: list[str], feature: str) -> torch.Tensor:
        # The rendered template already carries any BOS the model expects, so no special tokens are added.
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            add_special_tokens=False,
        )
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        if feature == "embedding_mean":
            states = self.model.get_input_embeddings()(ids)
        elif self.model.base_model is not self.model:
            states = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        else:  # no separate decoder stack to call: run the whole model and take the last hidden state
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            states = out.hidden_states[-1]
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
