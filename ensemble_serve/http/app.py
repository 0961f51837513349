"""The HTTP layer: module-level routers, one guard for every generation route, and `build_app`.

A route takes the service from `app.state`, awaits it, and returns JSON or an SSE stream. What
every generation route needs lives in one decorator, :func:`guarded`: the request's deadline,
its abort when the client goes away or the drain's grace runs out, and the mapping of errors to
OpenAI's shape (`errors.error_response`). `build_app(config)` only assembles: the lifespan owns
the engine, the middleware (`middleware.py`) gives requests their id, the body bound and the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ensemble_serve.config import API_KEY_ENV, ServeConfig
from ensemble_serve.errors import (
    AuthenticationError,
    BadRequestError,
    RequestTimeoutError,
    ServiceUnavailableError,
    error_response,
    install_error_handlers,
    request_id_of,
)
from ensemble_serve.service.metrics import Metrics
from ensemble_serve.http.middleware import RequestGuard
from ensemble_serve.http.openapi import describe_api
from ensemble_serve.shared.population import Population, load_population
from ensemble_serve.protocol import ChatCompletionRequest, CompletionRequest
from ensemble_serve.service.service import EnsembleService, ServeSettings
from ensemble_serve.http.shutdown import Drain
from ensemble_serve.service.watcher import PopulationWatcher

log = logging.getLogger("ensemble_serve")

# --------------------------------------------------------------------------- auth


async def require_key(request: Request) -> None:
    """`Authorization: Bearer KEY` when the server has a key (/health and /metrics stay open, as in vLLM)."""
    api_key = request.app.state.api_key
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise AuthenticationError(
            "Incorrect API key provided." if header else "Missing API key: send `Authorization: Bearer KEY`."
        )


# --------------------------------------------------------------------------- the guard


def guarded(route: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Response]]:
    """Run a generation route under its deadline, the client's presence and the drain; map its errors.

    The route returns a response model or an async iterator of SSE lines. Whichever comes first of
    the client leaving (499, nothing sent), the deadline (504) and the end of the shutdown grace
    (503) cancels the route's work, which aborts its generations inside the engine. A stream stays
    under the same deadline and drain: one that runs past them ends with an error event.
    """

    @functools.wraps(route)
    async def wrapper(req: ChatCompletionRequest | CompletionRequest, request: Request) -> Response:
        state = request.app.state
        service: EnsembleService = state.service
        started = time.monotonic()
        limit = min(state.config.request_timeout, req.timeout or float("inf"))
        deadline = started + limit
        work = asyncio.create_task(route(req, request))
        stop = await _first_stop(work, request, state.drain, deadline)
        if stop is not None:
            await _cancel(work)
            if stop == "gone":
                log.info(
                    "client disconnected after %.2fs; request for %s aborted", time.monotonic() - started, req.model
                )
                return Response(status_code=499)
            return _error(_stop_error(stop, limit), request, service, req.model)
        try:
            result = work.result()
        except Exception as e:
            return _error(e, request, service, req.model)
        if hasattr(result, "__aiter__"):
            events = _bounded_stream(result, state.drain, deadline, limit, request, service, req.model)
            return StreamingResponse(events, media_type="text/event-stream")
        return JSONResponse(result.model_dump(exclude_none=True))

    return wrapper


async def _first_stop(work: asyncio.Task, request: Request, drain: Drain, deadline: float) -> str | None:
    """None when `work` finished first; else "gone" (client), "deadline" or "drain"."""
    gone = asyncio.create_task(_client_gone(request))
    drained = asyncio.create_task(drain.expired.wait())
    try:
        done, _ = await asyncio.wait(
            {work, gone, drained}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        gone.cancel()
        drained.cancel()
    if work in done:
        return None
    if gone in done:
        return "gone"
    return "drain" if drained in done else "deadline"


def _stop_error(stop: str, limit: float) -> Exception:
    if stop == "drain":
        return ServiceUnavailableError("the server is shutting down; the request was aborted")
    return RequestTimeoutError(f"the request did not finish within its deadline of {limit:g} s and was aborted")


async def _bounded_stream(
    events: AsyncIterator[str],
    drain: Drain,
    deadline: float,
    limit: float,
    request: Request,
    service: EnsembleService,
    model: str,
) -> AsyncIterator[str]:
    """The stream's events until its deadline or the drain's end; an error after the start becomes a final
    `data: {"error": ...}` event, as vLLM does."""
    drained = asyncio.create_task(drain.expired.wait())
    it = aiter(events)
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(it))
            done, _ = await asyncio.wait(
                {step, drained}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if step not in done:
                await _cancel(step)  # closes the generator: its generations are aborted
                raise _stop_error("drain" if drained in done else "deadline", limit)
            try:
                event = step.result()
            except StopAsyncIteration:
                return
            yield event
    except asyncio.CancelledError:
        raise
    except Exception as e:
        response = _error(e, request, service, model)
        yield f"data: {response.body.decode()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        drained.cancel()
        if step is not None and not step.done():  # the client left (or the deadline) while an event was awaited
            await _cancel(step)
        with contextlib.suppress(Exception):
            await it.aclose()


def _error(e: Exception, request: Request, service: EnsembleService, model: str) -> Response:
    response = error_response(e, request_id_of(request))
    service.metrics.observe_error(_kind(service, model), response.status_code)
    return response


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


async def _cancel(task: asyncio.Future) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


# --------------------------------------------------------------------------- routes

open_routes = APIRouter()
api_routes = APIRouter(dependencies=[Depends(require_key)])


@open_routes.get("/health")
async def health(request: Request) -> Response:
    """200 `ok`; 200 `degraded` (with the unreachable members) while some members cannot be asked;
    503 when the engine died, no member can be asked, or the server is shutting down."""
    state = request.app.state
    backend, service = state.backend, state.service
    if state.drain.draining:
        return error_response(ServiceUnavailableError("the server is shutting down"))
    if backend.errored:
        return error_response(ServiceUnavailableError("the engine is not running"))
    names = service.population.names
    unavailable = backend.unavailable_members()
    details = backend.health()
    service.metrics.observe_availability(names, unavailable, details.get("servers"))
    if unavailable and len(unavailable) == len(names):
        return error_response(ServiceUnavailableError(f"no member can be reached now: {', '.join(unavailable)}"))
    status = "degraded" if unavailable else "ok"
    return JSONResponse({"status": status, "unavailable_members": unavailable, **details})


@open_routes.get("/metrics")
async def metrics(request: Request) -> Response:
    state = request.app.state
    backend, service = state.backend, state.service
    service.metrics.observe_availability(
        service.population.names, backend.unavailable_members(), backend.health().get("servers")
    )
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")


@api_routes.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.service.list_models().model_dump(exclude_none=True))


@api_routes.post("/v1/chat/completions")
@guarded
async def chat(req: ChatCompletionRequest, request: Request) -> Any:
    return await request.app.state.service.chat(req)


@api_routes.post("/v1/completions")
@guarded
async def completions(req: CompletionRequest, request: Request) -> Any:
    return await request.app.state.service.completion(req)


@api_routes.post("/admin/reload")
async def reload(request: Request) -> JSONResponse:
    """Re-read the population directory now; 400 (and the old population keeps serving) if it is broken."""
    try:
        population = await request.app.state.watcher.reload()
    except (ValueError, OSError) as e:  # a broken generation: the population's fault, reported as such
        raise BadRequestError(f"population refused, still serving the previous one: {e}") from None
    return JSONResponse({"generation": population.manifest.generation, "members": population.names})


@api_routes.get("/admin/population")
async def population(request: Request) -> JSONResponse:
    service: EnsembleService = request.app.state.service
    return JSONResponse(service.population.manifest.model_dump(mode="json"))


# --------------------------------------------------------------------------- the app


def _build_backend(config: ServeConfig, population: Population) -> Any:
    """The in-process vLLM engine, or with `config.remote` the remote vLLM servers (discovered synchronously)."""
    from ensemble_serve.shared.vllm import AsyncEngine, EngineConfig

    if config.remote:
        from ensemble_serve.engine.remote import RemoteBackend

        ignored = sorted(set(EngineConfig.model_fields) & config.model_fields_set)
        if ignored:
            log.warning("remote mode: the vLLM servers have their own settings; ignoring %s", ", ".join(ignored))
        return RemoteBackend(population, config.remote, api_key=config.remote_api_key)
    return AsyncEngine(population, config.engine_config())


def build_app(
    config: ServeConfig,
    backend_factory: Callable[[ServeConfig, Population], Any] = _build_backend,
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
        metrics.track_inflight(lambda: backend.gate.state[0])
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
