"""`build_app(config)`: the app assembled from its parts; a lifespan that owns the engine.

The routes are in `routes.py` (thin), what every generation route needs in `guard.py`, what every
request passes first in `middleware.py`, errors in OpenAI's shape in `errors.py`, the document in
`openapi.py`, the drain in `shutdown.py`. Tests build the app with a real small engine, or with an
engine of their own (`backend_factory`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from ensemble_serve.config import API_KEY_ENV, ServeConfig
from ensemble_serve.engine.base import Engine
from ensemble_serve.engine.inprocess import AsyncEngine
from ensemble_serve.engine.remote import RemoteBackend
from ensemble_serve.http.errors import install_error_handlers
from ensemble_serve.http.middleware import RequestGuard
from ensemble_serve.http.openapi import describe_api
from ensemble_serve.http.routes import api_routes, open_routes
from ensemble_serve.http.shutdown import Drain
from ensemble_serve.service.metrics import Metrics
from ensemble_serve.service.served import ServeSettings
from ensemble_serve.service.service import EnsembleService
from ensemble_serve.service.watcher import PopulationWatcher
from ensemble_serve.shared.engine_config import EngineConfig
from ensemble_serve.shared.population import Population, load_population

log = logging.getLogger("ensemble_serve")


def _build_backend(config: ServeConfig, population: Population) -> Engine:
    """The in-process vLLM engine, or with `config.remote` the remote vLLM servers (discovered synchronously)."""
    if config.remote:
        ignored = sorted(set(EngineConfig.model_fields) & config.model_fields_set)
        if ignored:
            log.warning("remote mode: the vLLM servers have their own settings; ignoring %s", ", ".join(ignored))
        return RemoteBackend(population, config.remote, api_key=config.remote_api_key)
    return AsyncEngine(population, config.engine_config())


def build_app(
    config: ServeConfig,
    backend_factory: Callable[[ServeConfig, Population], Engine] = _build_backend,
    drain: Drain | None = None,
) -> FastAPI:
    """The FastAPI app; the engine starts in the lifespan (so tests build the app with a real engine).

    `drain` is the shutdown state the server's signal handler shares (see `shutdown.py`).
    """
    drain = drain if drain is not None else Drain(config.shutdown_grace)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        population = load_population(config.population_dir)
        backend = backend_factory(config, population)
        metrics = Metrics()
        settings = ServeSettings(
            ensemble_name=config.ensemble_name,
            default_members=config.default_members,
            semantic_threshold=config.semantic_threshold,
            route=config.route,
            mixture_cache=config.mixture_cache,
        )
        metrics.generation.set(population.manifest.generation)
        metrics.track_inflight(backend.inflight)
        app.state.backend = backend
        app.state.service = EnsembleService(backend, population, settings, metrics)
        app.state.watcher = PopulationWatcher(app, config.population_dir, config.watch_interval)
        await backend.warm()
        task = asyncio.create_task(app.state.watcher.run()) if config.watch else None
        _announce(config, population, backend)
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            backend.shutdown()
            app.state.service.close()

    app = FastAPI(title="ensemble-serve", lifespan=lifespan)
    app.state.config = config
    app.state.drain = drain
    app.state.api_key = config.api_key or os.environ.get(API_KEY_ENV) or None
    install_error_handlers(app)
    app.include_router(open_routes)
    app.include_router(api_routes)
    app.add_middleware(RequestGuard, max_bytes=config.max_request_bytes, drain=drain)
    describe_api(app, config)
    return app


def _announce(config: ServeConfig, population: Population, backend: Engine) -> None:
    m = population.manifest
    lines = [
        f"ensemble-serve: listening on http://{config.host}:{config.port}/v1",
        f"  ensemble  {config.ensemble_name}  ({len(m.members)} members, generation {m.generation}, "
        f"context {backend.max_model_len} tokens)",
        f"  members   {', '.join(population.names)}",
        f"  base      {m.base_model.name}  ({population.base_model_path or m.base_model.hub_id})",
        f"  population {population.root}" + ("  (watched for new generations)" if config.watch else ""),
    ]
    if config.api_key or os.environ.get(API_KEY_ENV):
        lines.append("  API key required on /v1 and /admin routes")
    print("\n".join(lines), flush=True)
