"""The routes: module-level routers, each route a few lines (the work is the service's, the guard's and the middleware's).

`open_routes` (`/health`, `/metrics`) answer without a key, as in vLLM; `api_routes` (`/v1/...`,
`/admin/...`) need `Authorization: Bearer KEY` when the server has one.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ensemble_serve.errors import AuthenticationError, BadRequestError, ServiceUnavailableError
from ensemble_serve.http.errors import error_response
from ensemble_serve.http.guard import guarded
from ensemble_serve.protocol import ChatCompletionRequest, CompletionRequest
from ensemble_serve.service.service import EnsembleService

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
        served = await request.app.state.watcher.reload()
    except (ValueError, OSError) as e:  # a broken generation: the population's fault, reported as such
        raise BadRequestError(f"population refused, still serving the previous one: {e}") from None
    return JSONResponse(
        {"generation": served.generation, "version": served.version, "members": served.population.names}
    )


@api_routes.get("/admin/population")
async def population(request: Request) -> JSONResponse:
    service: EnsembleService = request.app.state.service
    return JSONResponse(service.population.manifest.model_dump(mode="json"))
