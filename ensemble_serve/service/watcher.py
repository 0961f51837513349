"""Population refresh: re-read the population directory when its manifest changes, or on demand.

The trainer replaces `population.json` atomically, so one read sees one whole generation. A new
generation is validated completely (adapters included) before it replaces the served one; a
broken generation is refused (logged, counted, and a 400 on `POST /admin/reload`) and the old
one keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from ensemble_serve.service.served import Served
from ensemble_serve.shared.population import load_population

log = logging.getLogger("ensemble_serve")


class PopulationWatcher:
    """Reloads the population when population.json changes (and on `POST /admin/reload`)."""

    def __init__(self, app: Any, root: Path, interval: float):
        self.app, self.root, self.interval = app, Path(root), interval
        self._stamp = self._current_stamp()
        self._lock = asyncio.Lock()
        self.last_error: str | None = None

    def _current_stamp(self) -> tuple[int, int] | None:
        try:
            st = (self.root / "population.json").stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    async def reload(self) -> Served:
        """Load the directory, check it, and serve it; the new snapshot. Raises (the old one keeps serving) if refused."""
        async with self._lock:
            service = self.app.state.service
            metrics = service.metrics
            self._stamp = self._current_stamp()
            try:
                population = await asyncio.to_thread(load_population, self.root)
                served = await asyncio.to_thread(service.set_population, population)  # copies and checks adapters
                await service.backend.warm()
            except Exception as e:
                self.last_error = str(e)
                metrics.reloads.labels(result="refused").inc()
                log.error("population refresh refused, still serving %s: %s", service.served.version, e)
                raise
            self.last_error = None
            metrics.reloads.labels(result="ok").inc()
            metrics.generation.set(population.manifest.generation)
            log.info("serving generation %s (%s): %s", served.generation, served.version, ", ".join(population.names))
            return served

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            stamp = self._current_stamp()
            if stamp is not None and stamp != self._stamp:
                with contextlib.suppress(Exception):  # logged and counted by reload()
                    await self.reload()
