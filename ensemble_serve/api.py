"""The HTTP layer: `build_app(config)`, a lifespan that owns the engine, and thin routes.

A route takes the service from `app.state`, awaits it, and returns JSON, an SSE
stream, or (through `errors.error_response`) an error in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ensemble_serve.config import API_KEY_ENV, ServeConfig
from ensemble_serve.errors import AuthenticationError, ServiceUnavailableError, error_response, install_error_handlers
from ensemble_serve.metrics import Metrics
from ensemble_serve.population import Population, load_population
from ensemble_serve.protocol import ChatCompletionRequest, CompletionRequest
from ensemble_serve.serving import EnsembleService, ServeSettings

log = logging.getLogger("ensemble_serve")


class PopulationWatcher:
    """Reloads the population when population.json changes (and on `POST /admin/reload`).

    The manifest is replaced atomically by the trainer, so one read sees one whole
    generation; it is validated completely (adapters included) before it replaces the
    served one. A broken generation is refused and the old one keeps serving.
    """

    def __init__(self, app: FastAPI, root: Path, interval: float):
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

    async def reload(self) -> Population:
        async with self._lock:
            service: EnsembleService = self.app.state.service
            metrics: Metrics = self.app.state.metrics
            self._stamp = self._current_stamp()
            try:
                population = await asyncio.to_thread(load_population, self.root)
                await asyncio.to_thread(service.set_population, population)  # copies and checks adapters
                await _warm(service.backend)
            except Exception as e:
                self.last_error = str(e)
                metrics.reloads.labels(result="refused").inc()
                log.error(
                    "population refresh refused, still serving generation %s: %s",
                    service.population.manifest.generation,
                    e,
                )
                raise
            self.last_error = None
            metrics.reloads.labels(result="ok").inc()
            metrics.generation.set(population.manifest.generation)
            log.info("serving generation %s: %s", population.manifest.generation, ", ".join(population.names))
            return population

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            stamp = self._current_stamp()
            if stamp is not None and stamp != self._stamp:
                with contextlib.suppress(Exception):  # logged and counted by reload()
                    await self.reload()


def _build_backend(config: ServeConfig, population: Population) -> Any:
    """The in-process vLLM engine, or with `config.remote` the remote vLLM servers (discovered synchronously)."""
    from ensemble_serve.engine import AsyncEngine, EngineConfig

    if config.remote:
        from ensemble_serve.remote import RemoteBackend

        ignored = sorted(set(EngineConfig.model_fields) & config.model_fields_set)
        if ignored:
            log.warning("remote mode: the vLLM servers have their own settings; ignoring %s", ", ".join(ignored))
        return RemoteBackend(population, config.remote, api_key=config.remote_api_key)
    return AsyncEngine(population, config.engine_config())


def build_app(
    config: ServeConfig, backend_factory: Callable[[ServeConfig, Population], Any] = _build_backend
) -> FastAPI:
    """The FastAPI app; the engine starts in the lifespan (so tests build the app with a real engine)."""

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
        app.state.metrics = metrics
        metrics.generation.set(population.manifest.generation)
        gate = getattr(backend, "gate", None)
        if gate is not None:
            metrics.track_inflight(lambda: gate.state[0])
        app.state.backend = backend
        app.state.service = EnsembleService(backend, population, settings, metrics)
        app.state.watcher = PopulationWatcher(app, config.population_dir, config.watch_interval)
        await _warm(backend)
        task = asyncio.create_task(app.state.watcher.run()) if config.watch else None
        _announce(config, population, backend)
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            shutdown = getattr(backend, "shutdown", None)
            if shutdown is not None:
                shutdown()
            app.state.service.close()

    app = FastAPI(title="ensemble-serve", lifespan=lifespan)
    install_error_handlers(app)
    api_key = config.api_key or os.environ.get(API_KEY_ENV) or None

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise AuthenticationError(
                "Incorrect API key provided." if header else "Missing API key: send `Authorization: Bearer KEY`."
            )

    auth = [Depends(require_key)]

    @app.get("/health")
    async def health(request: Request) -> Response:
        backend = request.app.state.backend
        if getattr(backend, "errored", False):
            return error_response(ServiceUnavailableError("the engine is not running"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth)
    async def models(request: Request) -> JSONResponse:
        return JSONResponse(request.app.state.service.list_models().model_dump(exclude_none=True))

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        service: EnsembleService = request.app.state.service
        return await _respond(request, lambda: service.chat(req), req.model)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        service: EnsembleService = request.app.state.service
        return await _respond(request, lambda: service.completion(req), req.model)

    @app.post("/admin/reload", dependencies=auth)
    async def reload(request: Request) -> JSONResponse:
        """Re-read the population directory now; 400 (and the old population keeps serving) if it is broken."""
        population = await request.app.state.watcher.reload()
        return JSONResponse({"generation": population.manifest.generation, "members": population.names})

    @app.get("/admin/population", dependencies=auth)
    async def population(request: Request) -> JSONResponse:
        service: EnsembleService = request.app.state.service
        return JSONResponse(service.population.manifest.model_dump(mode="json"))

    return app


async def _warm(backend: Any) -> None:
    warm = getattr(backend, "warm", None)
    if warm is not None:
        await warm()


def _announce(config: ServeConfig, population: Population, backend: Any) -> None:
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


async def _respond(request: Request, handler: Callable[[], Awaitable[Any]], model: str) -> Response:
    """Run `handler`, cancelling it (and every generation it started) if the client goes away."""
    service: EnsembleService = request.app.state.service
    started = time.perf_counter()
    work = asyncio.create_task(handler())
    disconnect = asyncio.create_task(_client_gone(request))
    try:
        done, _ = await asyncio.wait({work, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
    if work not in done:
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        log.info("client disconnected after %.2fs; request for %s aborted", time.perf_counter() - started, model)
        return Response(status_code=499)
    try:
        result = work.result()
    except Exception as e:
        response = error_response(e)
        service.metrics.observe_error(_kind(service, model), response.status_code)
        return response
    if hasattr(result, "__aiter__"):
        return StreamingResponse(_guard_stream(result, service, model), media_type="text/event-stream")
    return JSONResponse(result.model_dump(exclude_none=True))


async def _guard_stream(events: AsyncIterator[str], service: EnsembleService, model: str) -> AsyncIterator[str]:
    """An error after the stream began becomes a final `data: {"error": ...}` event, as vLLM does."""
    try:
        async for event in events:
            yield event
    except asyncio.CancelledError:
        raise
    except Exception as e:
        response = error_response(e)
        service.metrics.observe_error(_kind(service, model), response.status_code)
        yield f"data: {response.body.decode()}\n\n"
        yield "data: [DONE]\n\n"


def _kind(service: EnsembleService, model: str) -> str:
    try:
        return service.kind_of(model)
    except Exception:
        return "unknown"


async def _client_gone(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
