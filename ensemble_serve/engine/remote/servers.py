"""One remote vLLM OpenAI server as the backend holds it: its HTTP client, gate, what discovery found, its liveness.

A `RemoteServer` is up, or down with a reason and a time for its next retry (see `liveness.py`
for who changes that and when). `epoch` grows by one each time the server comes back up: a
request sent before then carries the old epoch and cannot mark the new server down. Times are
on the backend's clock. What discovery found on a server (`Found`) stays on it while it is down,
so that a refresh can route its members as they were when it was last seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from ensemble_serve.engine.gate import ScoringGate


@dataclass(frozen=True)
class Found:
    """What discovery found on a server."""

    base_model: str  # the server's name for its base model
    max_model_len: int
    models: frozenset[str]  # the LoRA adapters the server serves


@dataclass
class RemoteServer:
    """One vLLM OpenAI server and what discovery found on it."""

    url: str
    client: httpx.AsyncClient
    gate: ScoringGate = field(default_factory=ScoringGate)
    base_model: str | None = None  # the server's name for its base model
    max_model_len: int | None = None
    members: frozenset[str] = frozenset()
    inflight: int = 0
    # liveness (see liveness.py); times are on the backend's clock
    up: bool = True
    reason: str | None = None  # why it is down
    retry_at: float | None = None  # when a down server is tried next
    failures: int = 0  # failed retries since it went down: the backoff's exponent
    epoch: int = 0  # +1 each time it comes back up: a request sent before then cannot mark it down
    next_probe: float = 0.0  # when an up server's /health is probed next
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # wakes its monitor when it goes down

    def adopt(self, found: Found) -> None:
        """Take what discovery found on the server as what it serves now."""
        self.base_model, self.max_model_len, self.members = found.base_model, found.max_model_len, found.models

    def last_seen(self) -> Found:
        """What discovery found on the server when it was last reached (a refresh does not ask a down server)."""
        return Found(self.base_model or "", self.max_model_len or 0, self.members)

    def due(self) -> float:
        """When its next liveness check is due: the next probe while up, the next retry while down."""
        if self.up:
            return self.next_probe
        return self.retry_at if self.retry_at is not None else 0.0


class MarkDown(Protocol):
    """Takes a server out of routing (see `Liveness.mark_down`)."""

    def __call__(self, s: RemoteServer, reason: str, *, epoch: int | None = None) -> None: ...


class GateView:
    """All servers' gates as one, for the app's in-flight metric (`state[0]`: generations in flight)."""

    def __init__(self, servers: Sequence[RemoteServer]):
        self._servers = servers

    @property
    def state(self) -> tuple[int, bool]:
        states = [s.gate.state for s in self._servers]
        return sum(r for r, _ in states), any(w for _, w in states)


def normalize_url(url: str) -> str:
    """`http://host:8000/v1/` -> `http://host:8000`: the server's root, where /v1, /health and /tokenize live."""
    u = url.strip().rstrip("/").removesuffix("/v1")
    if not u.startswith(("http://", "https://")):
        raise ValueError(f"remote server URL {url!r} must start with http:// or https://")
    return u


def open_server(url: str, headers: dict[str, str], timeout: httpx.Timeout, transport: Any = None) -> RemoteServer:
    """A server at `url` with its own HTTP client (`transport`: an `httpx.MockTransport` in tests)."""
    client = httpx.AsyncClient(
        base_url=url,
        headers=headers,
        timeout=timeout,
        # an ensemble request holds one stream per member: no pool limit to queue them behind
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        transport=transport,
    )
    return RemoteServer(url, client)
