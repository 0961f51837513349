"""The population's reliability table as the server holds it: loaded (or refused) with the population,
and the `calibrated` vote's weights for one prompt.

`status` is "none" (the population has no table), "active", or "refused: <why>": a table made for other
members or another base model, or a file that does not read, is refused at load; the `calibrated` vote
then counts every chain the same (a majority vote) and says so in `ensemble.calibration`.

The prompt's domain is the one whose centroid (the mean base-model feature of its calibration
prompts) is nearest by cosine to the prompt's feature; without centroids, or without the base model's
folder to compute features with, the table's overall estimates are used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ensemble_serve.shared.population import Population
from ensemble_serve.shared.population.reliability import (
    RELIABILITY_FILE,
    ReliabilityError,
    ReliabilityTable,
    log_odds_weight,
    read_reliability,
)
from ensemble_serve.shared.router import RouterError, RouterFeatures

log = logging.getLogger("ensemble_serve")


@dataclass
class Calibration:
    """The table, and what tells a prompt's domain (feature extractor and unit-length centroids)."""

    status: str = "none"
    table: ReliabilityTable | None = None
    features: Any = None  # RouterFeatures, shared with the router when it uses the same base
    domains: list[str] = field(default_factory=list)
    centroids: np.ndarray | None = None

    @classmethod
    def load(cls, population: Population, features: Any = None) -> Calibration:
        """The population's table; `features` is a RouterFeatures of the same base model to reuse, if any."""
        entry = population.manifest.reliability
        if not entry:
            return cls()
        path = population.root / str(entry.get("path", RELIABILITY_FILE))
        try:
            table = read_reliability(path, population.names, population.manifest.base_model.name)
        except ReliabilityError as e:
            log.warning("reliability table refused (%s); the calibrated vote counts every chain the same", e)
            return cls(status=f"refused: {e}")
        if not table.centroids:
            return cls(status="active", table=table)
        if features is None and population.base_model_path is not None:
            try:
                features = RouterFeatures(population.base_model_path)
            except (RouterError, OSError) as e:
                log.warning("reliability table: no features for its domains (%s); using its overall estimates", e)
        domains = sorted(table.centroids)
        centroids = np.asarray([table.centroids[d] for d in domains], dtype=np.float64)
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        return cls(status="active", table=table, features=features, domains=domains, centroids=centroids)

    def domain_of(self, text: str) -> str | None:
        """The domain of the nearest centroid to the prompt's feature; None when that cannot be told."""
        if self.table is None or self.centroids is None or self.features is None:
            return None
        feature = np.asarray(self.features([text], self.table.feature)[0].tolist(), dtype=np.float64)
        norm = np.linalg.norm(feature)
        if not np.isfinite(norm) or norm == 0:
            return None
        return self.domains[int(np.argmax(self.centroids @ (feature / norm)))]

    def weights_for(self, text: str, members: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
        """The `calibrated` vote's member weights for this prompt, and what `ensemble.calibration` reports."""
        if self.table is None:
            reason = self.status if self.status != "none" else "the population has no reliability table"
            return {}, {"used": False, "reason": f"{reason}; every chain counted the same"}
        domain = self.domain_of(text)
        estimates = self.table.estimates(domain)
        weights = {m: log_odds_weight(estimates[m].p) for m in members if m in estimates}
        neutral = [m for m in members if m not in estimates]
        info = {
            "used": True,
            "domain": domain if domain is not None else "all",
            "method": self.table.method,
            "weights": {m: round(w, 4) for m, w in weights.items()},
        }
        if neutral:
            info["neutral"] = neutral  # not in the table (e.g. born after the calibration): weight 0
        return weights, info
