"""Generation and scoring over HTTP: one request at a time to the server `Router.pick` chooses, holding its gate.

Generation streams `POST /v1/completions` (bodies and answers: `wire.py`); cancelling the
iteration closes the HTTP stream, and vLLM aborts the request when its client goes away. A
request that finds its server broken (cannot connect, timed out, 5xx, an engine-dead error in
the stream) marks it down (`liveness.py`) and fails with the mapped error.

Scoring (cross votes) uses vLLM's `prompt_logprobs` and passes, per remote server, the same
`ScoringGate` as the in-process engine: generation holds the server's gate shared, scoring holds
it exclusively. vLLM's CPU build (0.32) kills its engine core when a prompt-logprobs request
under a LoRA adapter shares an engine step with any other request, even one under the same
adapter (the LoRA logits of the prompt are computed with the batch's per-request adapter
indices), so a scoring request must have the server to itself: under the exclusive gate the
continuations are scored one request at a time. A request left running on a server (a
generation stream closed before it finished, a scoring request cancelled or cut off) keeps the
gate for `abort_grace` seconds more: a margin for vLLM to notice the closed connection and abort
the request before anything else is scheduled next to it. The gate only orders this backend's
own requests: other clients (or another ensemble-serve) sending traffic to the same CPU vLLM
servers can still trigger the bug and kill a server, so servers used for `cross` votes should be
dedicated to one ensemble-serve.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx

from ensemble_serve.engine.remote.liveness import Liveness
from ensemble_serve.engine.remote.routing import Router
from ensemble_serve.engine.remote.servers import RemoteServer
from ensemble_serve.engine.remote.wire import (
    DONE,
    RemoteError,
    RemoteRequestOutput,
    StreamFold,
    decode_event,
    engine_dead,
    error_message,
    event_data,
    mapped_error,
    marks_down,
    mean_logprob,
    prompt_logprobs,
    request_body,
    score_body,
    stream_error,
)

log = logging.getLogger("ensemble_serve")


class Calls:
    """Generation and scoring requests for members, sent to the servers `router` picks.

    `liveness` marks a server down when a request finds it broken; `next_id` names the scoring
    requests.
    """

    abort_grace: float = 0.5  # seconds a request left running keeps its server's gate (see the module docstring)

    def __init__(self, router: Router, liveness: Liveness, next_id: Callable[[str], str]):
        self._router = router
        self._liveness = liveness
        self._next_id = next_id
        self._late_releases: set[asyncio.Task] = set()

    async def generate(
        self, prompt_ids: list[int], params: Any, member: str | None, request_id: str
    ) -> AsyncIterator[RemoteRequestOutput]:
        """Stream cumulative outputs for one request from the server that serves `member`."""
        server = self._router.pick(member)
        model = member if member is not None else server.base_model
        body = request_body(prompt_ids, params, model, self._router.max_model_len)
        body["request_id"] = request_id
        outputs = StreamFold(request_id, params.n, keep_logprobs=params.logprobs is not None)
        await server.gate.acquire_shared()
        server.inflight += 1
        epoch = server.epoch
        over = False  # True once the server is done with the request (finished, or refused it)
        try:
            async with server.client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    over = True
                    await resp.aread()
                    raise self._http_error(server, resp, model, epoch)
                async for line in resp.aiter_lines():
                    data = event_data(line)
                    if data is None:
                        continue
                    if data == DONE:
                        outputs.done = over = True
                        break
                    chunk = decode_event(data, server.url)
                    if "error" in chunk:
                        over = True
                        raise self._stream_error(server, chunk["error"], model, epoch)
                    out = outputs.add(chunk)
                    if out is not None:
                        yield out
                if not outputs.complete():
                    raise RemoteError("a remote vLLM server ended the stream before the request finished")
        except httpx.HTTPError as e:
            raise self._failed(
                server, e, epoch, f"during {request_id}", "during a request", "during the request"
            ) from None
        finally:
            server.inflight -= 1
            if over:
                await server.gate.release_shared()
            else:  # vLLM aborts the request when it notices the closed connection: until then keep scoring out
                self._release_later(server, exclusive=False)

    async def score(self, prompt_ids: list[int], continuations: Sequence[list[int]], member: str | None) -> list[float]:
        """Mean log-probability of each continuation after the prompt, under one member (prompt logprobs).

        Runs with the chosen server's gate held exclusively and one request at a time (see
        the module docstring). A continuation that reaches the context limit is scored on
        the tokens that fit.
        """
        server = self._router.pick(member)
        model = member if member is not None else server.base_model
        n = len(prompt_ids)
        limit = (server.max_model_len or self._router.max_model_len) - 1  # the request still asks for one token
        running = False  # a scoring request was sent and its answer has not come back
        epoch = server.epoch
        await server.gate.acquire_exclusive()
        server.inflight += 1
        try:
            scores = []
            for cont in continuations:  # never two prompt-logprobs requests in one step
                ids = (list(prompt_ids) + list(cont))[:limit]
                if not cont or len(ids) <= n:
                    scores.append(float("-inf"))
                    continue
                running = True
                resp = await self._post_score(server, score_body(model, ids, self._next_id("score")), epoch)
                running = False
                if resp.status_code != 200:
                    raise self._http_error(server, resp, model, epoch)
                scores.append(mean_logprob(prompt_logprobs(resp), ids, n))
            return scores
        finally:
            server.inflight -= 1
            if running:  # cancelled or cut off mid-request: let vLLM abort it first
                self._release_later(server, exclusive=True)
            else:
                await server.gate.release_exclusive()

    async def _post_score(self, server: RemoteServer, body: dict[str, Any], epoch: int) -> httpx.Response:
        try:
            return await server.client.post("/v1/completions", json=body)
        except httpx.HTTPError as e:
            raise self._failed(server, e, epoch, "while scoring", "while scoring", "while scoring") from None

    def _release_later(self, server: RemoteServer, *, exclusive: bool) -> None:
        """Release the server's gate `abort_grace` seconds from now (a request was left running there)."""

        async def release() -> None:
            try:
                await asyncio.sleep(self.abort_grace)
            finally:
                await (server.gate.release_exclusive() if exclusive else server.gate.release_shared())

        task = asyncio.get_running_loop().create_task(release())
        self._late_releases.add(task)
        task.add_done_callback(self._late_releases.discard)

    # ------------------------------------------------------------------ failures

    def _failed(
        self, server: RemoteServer, e: httpx.HTTPError, epoch: int, in_log: str, in_reason: str, in_error: str
    ) -> RemoteError:
        """The error for a request to `server` that failed with `e`; a transport error (cannot connect, timed out,
        connection lost) marks the server down. `in_log`, `in_reason`, `in_error`: when it failed, as the log, the
        server's down reason and the error say it."""
        log.warning("remote vLLM server %s failed %s: %s: %s", server.url, in_log, type(e).__name__, e)
        if isinstance(e, httpx.TransportError):
            self._liveness.mark_down(server, f"{type(e).__name__} {in_reason}", epoch=epoch)
        return RemoteError(f"a remote vLLM server failed {in_error} ({type(e).__name__})")

    def _http_error(self, server: RemoteServer, resp: httpx.Response, model: str, epoch: int) -> Exception:
        message, param = error_message(resp)
        if resp.status_code >= 500 or resp.status_code in (401, 403, 404):
            log.warning("remote vLLM server %s answered %s for %s: %s", server.url, resp.status_code, model, message)
        if marks_down(resp.status_code) or engine_dead(message):
            self._liveness.mark_down(server, f"answered {resp.status_code}: {message[:200]}", epoch=epoch)
        return mapped_error(resp.status_code, message, param, model)

    def _stream_error(self, server: RemoteServer, err: Any, model: str, epoch: int) -> Exception:
        """An error event inside the stream (vLLM sends `data: {"error": {...}}` after a 200)."""
        message, status, param = stream_error(err)
        log.warning("remote vLLM server %s sent an error for %s: %s", server.url, model, message)
        if marks_down(status) or engine_dead(message):  # vLLM's EngineDeadError comes as a 500 in the stream
            self._liveness.mark_down(server, f"error {status} in a stream: {message[:200]}", epoch=epoch)
        return mapped_error(status, message, param, model)
