"""What `ensemble.mode: mixture` needs besides the population: an engine that loads mixed adapters, and their cache.

The engine's :class:`~ensemble_serve.engine.base.AdapterMixing` capability is checked once, when the
service starts; the cache of mixed adapters this server wrote is created at the first mixture request
and removed when the server stops. Both outlive population refreshes (a route's name says which
members' folders and gates it mixes, so a new population's routes are new names).
"""

from __future__ import annotations

import shutil
import tempfile

from ensemble_serve.engine.base import AdapterMixing, Engine
from ensemble_serve.service.served import Served
from ensemble_serve.shared.mixture import MixtureCache


class Mixtures:
    """The mixing capability (None: the engine cannot load a mixed adapter) and the mixed adapters' cache."""

    def __init__(self, engine: Engine, capacity: int):
        self.mixing: AdapterMixing | None = engine if isinstance(engine, AdapterMixing) else None
        self.capacity = capacity
        self._cache: MixtureCache | None = None

    def can_mix(self, served: Served) -> bool:
        """Whether `ensemble.mode: mixture` can be served: a router, and an engine that loads mixed adapters."""
        return served.routing.router is not None and self.mixing is not None

    @property
    def cache(self) -> MixtureCache:
        """The mixed adapters this server wrote (created at the first use)."""
        if self._cache is None:
            self._cache = MixtureCache(tempfile.mkdtemp(prefix="ensemble-serve-mixtures-"), capacity=self.capacity)
        return self._cache

    @property
    def created(self) -> MixtureCache | None:
        """The cache if a mixture request created it, else None."""
        return self._cache

    def close(self) -> None:
        """Remove the mixed adapters this server wrote."""
        if self._cache is not None:
            shutil.rmtree(self._cache.root, ignore_errors=True)
