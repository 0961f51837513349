"""The reliability table of a population: each member's accuracy p per domain, for the `calibrated` vote.

`reliability.json` in the population directory, named by the manifest's `reliability` entry
(``{"path": "reliability.json", ...}``), written by `ensemble-train calibrate`:

* ``domains``: domain -> member -> ``{"p", "n"}``: the member's estimated accuracy on that domain and
  the number of problems the estimate rests on; ``overall`` the same over all domains (used when a
  request's domain cannot be told);
* ``method``: ``labelled`` (p from answers checked against held-out labels), ``agreement`` (p
  estimated from who agrees with whom, no labels: a one-coin Dawid-Skene model) or ``evolved`` (the
  labelled table evolved so that the vote is right most often, members frozen: then p is a weight,
  no longer an accuracy estimate; ``overall`` stays labelled);
* ``centroids`` (optional): domain -> the mean base-model feature (``feature``, as the router
  computes it) of that domain's calibration prompts; the server gives a request the domain whose
  centroid is nearest (cosine) to the prompt's feature.

A chain's vote weighs :func:`log_odds_weight` (p): log(p / (1 - p)), the optimal weighted majority of
independent voters. p is Laplace-smoothed by the writer ((right + 1) / (n + 2)) and clipped here to
[P_MIN, P_MAX] = [0.05, 0.95], so no weight is infinite (at most log(19) = 2.94); a member no better
than a coin flip on a domain (p <= 0.5) weighs 0 there: it does not vote.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ensemble_serve.shared.fsutil import atomic_write_text

RELIABILITY_FILE = "reliability.json"
RELIABILITY_FORMAT = 1
P_MIN, P_MAX = 0.05, 0.95
Method = Literal["labelled", "agreement", "evolved"]


class ReliabilityError(ValueError):
    """A reliability table that cannot be used for this population (other members or base, bad file)."""


class Estimate(BaseModel):
    """A member's estimated accuracy on a domain and how many problems it rests on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    p: float = Field(ge=0.0, le=1.0)
    n: int = Field(ge=0)


class ReliabilityTable(BaseModel):
    """Content of `reliability.json`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = RELIABILITY_FORMAT
    base_model: str
    members: list[str] = Field(min_length=1)
    method: Method
    domains: dict[str, dict[str, Estimate]] = Field(default_factory=dict)
    overall: dict[str, Estimate]
    feature: str | None = None
    centroids: dict[str, list[float]] | None = None
    created_at: str | None = None

    @field_validator("format_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != RELIABILITY_FORMAT:
            raise ValueError(f"format_version {v} is not supported (this version reads {RELIABILITY_FORMAT})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ReliabilityTable:
        known = set(self.members)
        for where, row in [("overall", self.overall), *((f"domains.{d}", r) for d, r in self.domains.items())]:
            unknown = sorted(set(row) - known)
            if unknown:
                raise ValueError(f"{where} names members the table is not for: {unknown}")
        if self.centroids is not None:
            if self.feature is None:
                raise ValueError("centroids need the `feature` they were computed with")
            sizes = {len(c) for c in self.centroids.values()}
            if len(sizes) > 1 or not all(math.isfinite(x) for c in self.centroids.values() for x in c):
                raise ValueError("centroids must be finite vectors of one length")
            missing = sorted(set(self.centroids) - set(self.domains))
            if missing:
                raise ValueError(f"centroids of domains without estimates: {missing}")
        return self

    def estimates(self, domain: str | None) -> dict[str, Estimate]:
        """Each member's estimate on `domain` (None or unknown: the overall ones)."""
        return self.domains.get(domain, self.overall) if domain is not None else self.overall


def log_odds_weight(p: float) -> float:
    """A chain's vote weight for a member of accuracy p: log(p / (1 - p)), p clipped to [P_MIN, P_MAX], >= 0."""
    q = min(max(float(p), P_MIN), P_MAX)
    return max(0.0, math.log(q / (1.0 - q)))


def smoothed(right: float, n: int) -> float:
    """Laplace's estimate of an accuracy: (right + 1) / (n + 2): 0.5 with no evidence, never exactly 0 or 1."""
    return (right + 1.0) / (n + 2.0)


def read_reliability(path: Path, members: list[str], base_model: str) -> ReliabilityTable:
    """The table at `path`, checked against the population it is served with; ReliabilityError otherwise."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReliabilityError(f"{path}: no such reliability table") from None
    except (OSError, ValueError) as e:
        raise ReliabilityError(f"{path}: unreadable reliability table ({e})") from None
    try:
        table = ReliabilityTable.model_validate(raw)
    except ValidationError as e:
        raise ReliabilityError(f"{path}: invalid reliability table: {e.errors()[0]['msg']}") from None
    if table.base_model != base_model:
        raise ReliabilityError(f"{path}: the table is for base model {table.base_model!r}, not {base_model!r}")
    if table.members != list(members):
        extra = sorted(set(table.members) - set(members))
        if extra or not set(members) & set(table.members):
            raise ReliabilityError(f"{path}: the table is for other members ({sorted(table.members)}), not {members}")
    return table


def write_reliability(root: Path, table: ReliabilityTable) -> Path:
    """Write `reliability.json` atomically into the population directory `root`."""
    path = Path(root) / RELIABILITY_FILE
    atomic_write_text(path, table.model_dump_json(indent=1) + "\n")
    return path


def table_entry(table: ReliabilityTable) -> dict[str, Any]:
    """The manifest's `reliability` entry for a table written by :func:`write_reliability`."""
    return {"path": RELIABILITY_FILE, "method": table.method, "domains": sorted(table.domains)}
