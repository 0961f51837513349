"""The ``population.json`` schema: frozen pydantic models of the manifest, its format version and the layout names.

A :class:`Manifest` is one complete generation: the base model every member was trained on
(:class:`BaseModelRef`) and the members (:class:`Member`, each a PEFT LoRA folder inside the
population directory). Everything here is checked on construction and touches no file:
member names are unique, member folders are unique, never nested, never outside the directory
and never a reserved name; voting weights name members and are finite and >= 0; only
:data:`FORMAT_VERSION` is accepted. The file-system checks live in
:mod:`ensemble_serve.shared.population.load`.
"""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILES",
    "ADAPTER_README",
    "ADAPTER_WEIGHTS",
    "FORMAT_VERSION",
    "HISTORY_FILE",
    "MANIFEST_FILE",
    "MEMBERS_DIR",
    "MEMBER_NAME_RE",
    "PICKLE_SUFFIXES",
    "RESERVED_NAMES",
    "BaseModelRef",
    "Manifest",
    "Member",
    "check_member_path",
]

FORMAT_VERSION = 1
"""The only ``population.json`` format version this code reads and writes."""

MANIFEST_FILE = "population.json"
HISTORY_FILE = "history.jsonl"
MEMBERS_DIR = "members"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_README = "README.md"
#: Files copied from an adapter folder into a member folder (others are ignored).
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_README)
#: Suffixes of pickle-based weight files, which are refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: Top-level names a member path may not start with.
RESERVED_NAMES = frozenset({MANIFEST_FILE, HISTORY_FILE, "router", "reliability.json"})

MEMBER_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaseModelRef(_Frozen):
    """The base model every member adapter was trained on."""

    name: str = Field(
        min_length=1,
        description="Identifier that each member's adapter_config.json `base_model_name_or_path` must equal.",
    )
    path: str | None = Field(
        default=None,
        description="Folder of a Hugging Face model; a relative path is resolved "
        "against the population directory (e.g. '../substrate').",
    )
    hub_id: str | None = Field(default=None, description="Hugging Face hub id of the base model.")
    sha256: str | None = Field(
        default=None,
        description="fingerprint_model_dir() of the base weights; checked on load when `path` is set.",
    )

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, v: str | None) -> str | None:
        if v is not None and not _SHA256_RE.match(v):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {v!r}")
        return v

    @model_validator(mode="after")
    def _need_location(self) -> BaseModelRef:
        # sha256 alone: a shipped population whose server is told where its base is (`ensemble-train export`)
        if not self.path and not self.hub_id and not self.sha256:
            raise ValueError("base_model needs at least one of `path`, `hub_id` or `sha256`")
        return self


def check_member_path(v: str) -> str:
    """Validate a member path and return its normal form ('./a/' -> 'a')."""
    if not v or "\\" in v or "\x00" in v:
        raise ValueError(f"member path {v!r} must be a non-empty relative POSIX path")
    pp = PurePosixPath(v)
    if pp.is_absolute():
        raise ValueError(
            f"member path {v!r} is absolute: outside the population directory "
            "(use a path relative to it, e.g. 'members/<name>')"
        )
    if ".." in pp.parts:
        raise ValueError(f"member path {v!r} contains '..': outside the population directory")
    if not pp.parts:
        raise ValueError(f"member path {v!r} must name a folder inside the population directory")
    if any(part.startswith(".") for part in pp.parts):
        raise ValueError(f"member path {v!r} must not contain hidden components (starting with '.')")
    if pp.parts[0] in RESERVED_NAMES:
        raise ValueError(f"member path {v!r} uses the reserved name {pp.parts[0]!r}")
    return pp.as_posix()


class Member(_Frozen):
    """One LoRA adapter of the population."""

    name: str = Field(pattern=MEMBER_NAME_RE, description="Unique member name (also the LoRA name served).")
    path: str = Field(
        description="Relative POSIX path of the member folder inside the population directory; "
        "defaults to 'members/<name>'."
    )
    rank: int = Field(gt=0, strict=True, description="LoRA rank `r` (must match adapter_config.json).")
    alpha: float = Field(gt=0, allow_inf_nan=False, description="LoRA alpha (must match `lora_alpha`).")
    fitness: float | None = Field(default=None, allow_inf_nan=False, description="Overall fitness score.")
    domain_scores: dict[str, float] = Field(
        default_factory=dict, description="Per-domain accuracy, e.g. {'math': 0.61}."
    )
    parents: list[str] = Field(default_factory=list, description="Names of the parent members.")
    born_generation: int = Field(default=0, ge=0, strict=True, description="Generation the member was created in.")
    seed: int | None = Field(default=None, strict=True, description="Training seed.")
    info: dict[str, Any] = Field(
        default_factory=dict, description="Free-form training details (lr, dropout, warm-up domains...)."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("path") is None and isinstance(data.get("name"), str):
            data = {**data, "path": f"{MEMBERS_DIR}/{data['name']}"}
        return data

    @field_validator("path")
    @classmethod
    def _normalise_path(cls, v: str) -> str:
        return check_member_path(v)

    @field_validator("domain_scores")
    @classmethod
    def _finite_scores(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, x in v.items() if not math.isfinite(x)]
        if bad:
            raise ValueError(f"domain_scores must be finite numbers; not finite: {bad}")
        return v


class Manifest(_Frozen):
    """Content of ``population.json``: one complete generation."""

    format_version: int = Field(default=FORMAT_VERSION, strict=True, description="Manifest format version.")
    base_model: BaseModelRef = Field(description="Base model shared by all members.")
    generation: int = Field(ge=0, strict=True, description="Generation number of this manifest.")
    members: list[Member] = Field(min_length=1, description="Members; unique names and unique folders.")
    router: dict[str, Any] | None = Field(default=None, description="Router settings (optional).")
    reliability: dict[str, Any] | None = Field(
        default=None,
        description="The reliability table of the `calibrated` vote (optional): {'path': 'reliability.json', ...}.",
    )
    ensemble_defaults: dict[str, Any] | None = Field(
        default=None,
        description="The `ensemble` options a request gets for what it leaves unset (the configuration that measured "
        "best for this population, e.g. {'vote': 'calibrated', 'samples_per_member': 4}); checked by the server.",
    )
    voting_weights: dict[str, float] | None = Field(
        default=None, description="Per-member voting weight (>= 0); keys must be member names."
    )
    training_cost: dict[str, int] | None = Field(
        default=None,
        description="What training the population cost in all (optional): the sum of its members' "
        "`info.training_cost` ({'steps', 'examples', 'tokens', 'target_tokens'}), a branched population's seed "
        "included, as `ensemble-train init` wrote it.",
    )
    config_hash: str | None = Field(default=None, description="Hash of the training config that produced it.")
    created_at: str | None = Field(default=None, description="Creation time (ISO 8601).")

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(
                f"format_version {v} is not supported; this version of ensemble_serve reads "
                f"format_version {FORMAT_VERSION}"
            )
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Manifest:
        names = [m.name for m in self.members]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate member names: {dup}")
        paths = [m.path for m in self.members]
        dup = sorted({p for p in paths if paths.count(p) > 1})
        if dup:
            raise ValueError(f"several members share the folder(s) {dup}")
        for p in paths:
            for q in paths:
                if q.startswith(p + "/"):
                    raise ValueError(f"member folders must not be nested: {q!r} is inside {p!r}")
        if self.voting_weights is not None:
            unknown = sorted(set(self.voting_weights) - set(names))
            if unknown:
                raise ValueError(f"voting_weights has keys that are not member names: {unknown}")
            bad = sorted(k for k, w in self.voting_weights.items() if not (math.isfinite(w) and w >= 0))
            if bad:
                raise ValueError(f"voting_weights must be finite and >= 0; bad: {bad}")
        return self

    @property
    def names(self) -> list[str]:
        """Member names in manifest order."""
        return [m.name for m in self.members]
