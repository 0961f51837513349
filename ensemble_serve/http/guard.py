"""One guard for every generation route: its deadline, the client's presence, the drain, and error mapping.

:func:`guarded` wraps a route that returns a response model or an async iterator of SSE lines (as
vLLM's `with_cancellation` wraps its routes). Whichever comes first of the client leaving (499,
nothing sent), the deadline (504) and the end of the shutdown grace (503) cancels the route's work,
which aborts its generations inside the engine. A stream stays under the same deadline and drain:
one that runs past them ends with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ensemble_serve.errors import RequestTimeoutError, ServiceUnavailableError
from ensemble_serve.http.errors import error_response, request_id_of
from ensemble_serve.http.headers import ensemble_headers
from ensemble_serve.http.shutdown import Drain
from ensemble_serve.protocol import ChatCompletionRequest, CompletionRequest
from ensemble_serve.service.service import EnsembleService

log = logging.getLogger("ensemble_serve")


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
        return JSONResponse(result.model_dump(exclude_none=True), headers=ensemble_headers(result))

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
