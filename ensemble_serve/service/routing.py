"""The population's mixture router as the server holds it: loaded (or refused) with the population, gates per prompt.

`status` is "none" (the population has no router), "active", or "refused: <why>": a router that cannot
be used (trained for another population, corrupt files...) is refused at load, and the ensemble then
votes unrouted and says so in every response's `ensemble.routing`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ensemble_serve.shared.population import Population
from ensemble_serve.shared.router import RouterError, RouterFeatures, load_population_router, safe_gates

log = logging.getLogger("ensemble_serve")


@dataclass
class Routing:
    """The loaded router, its feature extractor (a copy of the base model) and its default top-k."""

    status: str = "none"
    router: Any = None
    features: Any = None
    top_k: int | None = None

    @classmethod
    def load(cls, population: Population, previous: Routing | None = None) -> Routing:
        entry = population.manifest.router
        if not entry:
            return cls()
        try:
            router = load_population_router(population)
            if population.base_model_path is None:
                raise RouterError("the router needs the base model's folder for its features; the manifest has none")
            # a refresh (every evolve generation) keeps the base model's copy: the base cannot change under a server
            features = previous.features if previous is not None and previous.features is not None else None
            features = features or RouterFeatures(population.base_model_path)
        except (RouterError, OSError) as e:
            log.warning("router refused (%s); the ensemble votes unrouted", e)
            return cls(status=f"refused: {e}")
        top_k = entry.get("top_k")
        return cls(status="active", router=router, features=features, top_k=top_k if isinstance(top_k, int) else None)

    def gates(self, prompt: str) -> tuple[dict[str, float] | None, str | None]:
        """Gate per member for one prompt, or (None, why) when the router's output is unusable."""
        feats = self.features([prompt], self.router.feature)
        gates, problem = safe_gates(self.router, feats)
        if problem is not None:
            return None, problem
        return {m: float(g) for m, g in zip(self.router.members, gates[0].tolist())}, None
