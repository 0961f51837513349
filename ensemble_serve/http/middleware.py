"""What every HTTP request passes before a route: its id, the body-size bound, the drain.

One pure ASGI middleware (no body re-reading through Starlette's `BaseHTTPMiddleware`):

* every request gets an id, the client's `X-Request-Id` if it sent one (as vLLM does) or a new one;
  it goes back in the `x-request-id` header and into the log and body of a 500;
* a body larger than `max_bytes` is answered with a 413 before anything parses it: at once when
  `Content-Length` says so, else as soon as the bytes read pass the bound;
* while the server drains (see `shutdown.py`), new requests get a 503 with `Connection: close`;
  `/health` and `/metrics` still answer, so a load balancer sees the drain.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ensemble_serve.errors import APIError, RequestTooLargeError, ServiceUnavailableError
from ensemble_serve.http.errors import error_response
from ensemble_serve.http.shutdown import Drain

OPEN_PATHS = ("/health", "/metrics")  # answered while draining
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # a client's X-Request-Id is echoed only when it looks like one


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers") or ():
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _CLIENT_ID.fullmatch(text):
                return text
    return f"req-{uuid.uuid4().hex}"


class RequestGuard:
    """Request ids, the 413 bound on bodies and the 503 while draining."""

    def __init__(self, app: ASGIApp, max_bytes: int, drain: Drain):
        self.app, self.max_bytes, self.drain = app, max_bytes, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = rid
            await send(message)

        if self.drain.draining and scope.get("path") not in OPEN_PATHS:
            refusal = ServiceUnavailableError("the server is shutting down", headers={"Connection": "close"})
            await self._refuse(refusal, rid, scope, receive, send_with_id)
            return
        declared = _content_length(scope)
        too_large = RequestTooLargeError(
            f"the request body is larger than this server accepts ({self.max_bytes} bytes; --max-request-bytes)"
        )
        if declared is not None and declared > self.max_bytes:
            await self._refuse(too_large, rid, scope, receive, send_with_id)
            return
        body = await self._read_body(receive)
        if body is _GONE:
            return  # the client left before sending its body: nobody to answer
        if body is _TOO_LARGE:
            await self._refuse(too_large, rid, scope, receive, send_with_id)
            return
        self.drain.inflight += 1
        try:
            await self.app(scope, _replay(body, receive), send_with_id)
        finally:
            self.drain.inflight -= 1

    async def _read_body(self, receive: Receive) -> bytes | object:
        """The whole body, or _TOO_LARGE as soon as it passes the bound, or _GONE if the client left."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _GONE
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return _TOO_LARGE
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _refuse(exc: APIError, rid: str, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(exc, rid)
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


_GONE, _TOO_LARGE = object(), object()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then passes on (disconnects)."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
