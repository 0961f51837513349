"""`RemoteBackend`: remote vLLM OpenAI servers as the service's engine, composed of one part per concern.

Discovery (`discovery.py`) finds what each server serves; the router (`routing.py`) sends a
member's requests to an up server that serves it; liveness (`liveness.py`) marks servers down
and up, and its monitor retries them with backoff; the calls (`calls.py`) generate and score over
HTTP. The backend wires them together and is what the service sees: the engine interface
(`tokenizer`, `max_model_len`, `generate`, `score`, `next_id`, `set_population`, `warm`,
`shutdown`, `errored`, `unavailable_members`, `health`) plus `start`, `check_server` and
`servers_of`.

`errored` is True from a discovery that failed until one succeeds (or until every server has
come back up since). The backend and its HTTP clients belong to the event loop that first uses
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import httpx

from ensemble_serve.engine.remote.calls import Calls
from ensemble_serve.engine.remote.discovery import (
    DISCOVERY_TIMEOUT,
    Discovery,
    RemoteDiscoveryError,
    base_source,
)
from ensemble_serve.engine.remote.liveness import (
    BACKOFF_INITIAL,
    BACKOFF_JITTER,
    BACKOFF_MAX,
    PROBE_INTERVAL,
    PROBE_TIMEOUT,
    Backoff,
    Liveness,
    Monitor,
)
from ensemble_serve.engine.remote.routing import Router
from ensemble_serve.engine.remote.servers import Found, GateView, RemoteServer, normalize_url, open_server
from ensemble_serve.engine.remote.wire import RemoteError, RemoteRequestOutput
from ensemble_serve.shared.population import Population
from ensemble_serve.shared.vllm_api import TOKENIZER_PROBE

log = logging.getLogger("ensemble_serve")

DEFAULT_TIMEOUT = 600.0  # seconds a remote server may stay silent (a long prefill on a CPU) before a request fails
CONNECT_TIMEOUT = 10.0


class RemoteBackend:
    """Remote vLLM OpenAI servers as the service's backend (see the package docstring).

    `urls` are the servers' base URLs (a trailing `/v1` is accepted). `api_key` is sent
    as `Authorization: Bearer` to every server (vLLM's `--api-key`). `timeout`: seconds a
    server may stay silent during a request before it fails. Construction discovers the
    servers synchronously and raises `RemoteDiscoveryError` if one cannot be used.

    Liveness settings (keyword-only, short in tests): `probe_interval`, `probe_timeout`,
    `backoff_initial`, `backoff_max`, `backoff_jitter` (seconds, fraction), `clock` (a
    monotonic clock in seconds), `rng` (a `random.Random` for the jitter). `transport`
    replaces the HTTP transport of every client (an `httpx.MockTransport` in tests).
    """

    def __init__(
        self,
        population: Population,
        urls: Sequence[str],
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        tokenizer: Any = None,
        probe_interval: float = PROBE_INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        backoff_jitter: float = BACKOFF_JITTER,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        transport: Any = None,
    ):
        normalized = _unique_urls(urls)
        backoff = Backoff(backoff_initial, backoff_max, backoff_jitter)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        connect = min(CONNECT_TIMEOUT, timeout)
        self.servers = [open_server(u, headers, httpx.Timeout(timeout, connect=connect), transport) for u in normalized]
        self.gate = GateView(self.servers)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(population)
        self._router = Router(population, self.servers, clock)
        self._liveness = Liveness(
            self._router,
            clock=clock,
            backoff=backoff,
            rng=rng or random.Random(),
            probe_interval=probe_interval,
            probe_timeout=probe_timeout,
        )
        self._discovery = Discovery(
            headers=headers,
            timeout=httpx.Timeout(min(DISCOVERY_TIMEOUT, timeout), connect=connect),
            transport=transport,
            probe_ids=list(self.tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)),
            mark_down=self._liveness.mark_down,
        )
        self._monitor = Monitor(self._liveness, self.check_server)
        self._errored = False
        self._ids = itertools.count()
        self._tag = secrets.token_hex(4)  # request ids stay unique on servers shared by several processes
        self._closing: list[asyncio.Task] = []
        self._calls = Calls(self._router, self._liveness, self.next_id)
        try:
            self._router.apply(population, self._discover_sync(first=True))
        except BaseException:
            self._close_now()
            raise

    # ------------------------------------------------------------------ what the service reads

    @property
    def population(self) -> Population:
        """The population served now (changed by `set_population`)."""
        return self._router.population

    @property
    def max_model_len(self) -> int:
        """The context length: the smallest of the servers' `max_model_len`."""
        return self._router.max_model_len

    @property
    def probe_interval(self) -> float:
        """Seconds between two /health probes of a server that is up."""
        return self._liveness.probe_interval

    @property
    def errored(self) -> bool:
        """True while the last discovery could not reach or use a server (/health then answers 503)."""
        return self._errored

    def servers_of(self, member: str | None) -> list[RemoteServer]:
        """The servers that are up and serve `member` (see `Router.servers_of`)."""
        return self._router.servers_of(member)

    def unavailable_members(self) -> list[str]:
        """The population's members that no up server serves now, in manifest order."""
        return self._router.unavailable_members()

    def health(self) -> dict[str, Any]:
        """Each server's state: `{"servers": [{"url", "up", "reason", "retry_in_s", "members"}]}`."""
        return self._liveness.report()

    def inflight(self) -> int:
        """Generation requests this backend has in flight on all its servers."""
        return self.gate.state[0]

    # ------------------------------------------------------------------ discovery

    @contextlib.contextmanager
    def _discovering(self) -> Iterator[None]:
        """`errored` while a discovery fails, cleared when one succeeds."""
        try:
            yield
        except RemoteDiscoveryError:
            self._errored = True
            raise
        self._errored = False

    def _discover_sync(self, *, first: bool = False) -> dict[str, Found]:
        with self._discovering():
            return self._discovery.discover_sync(self.servers, base_source(self.population), first=first)

    async def start(self) -> None:
        """Discover the servers again (without blocking the event loop) for the current population."""
        with self._discovering():
            found = await self._discovery.discover(self.servers, base_source(self.population))
        self._router.apply(self.population, found)

    def set_population(self, population: Population) -> None:
        """Serve `population` from now on; discovers the servers again and refuses members none of them serve."""
        old = self.population
        if (
            population.manifest.base_model.sha256 != old.manifest.base_model.sha256
            or population.base_model_path != old.base_model_path
        ):
            raise ValueError(
                f"{population.root}: the base model changed; a new base model needs a restart of the server"
            )
        self._router.apply(population, self._discover_sync())

    # ------------------------------------------------------------------ liveness
    # (`_mark_down`, `_backoff` and `_monitors` are how the unit tests reach into liveness)

    def _mark_down(self, s: RemoteServer, reason: str, *, epoch: int | None = None) -> None:
        self._liveness.mark_down(s, reason, epoch=epoch)

    def _backoff(self, failures: int) -> float:
        return self._liveness.wait(failures)

    @property
    def _monitors(self) -> list[asyncio.Task]:
        return self._monitor.tasks

    async def check_server(self, s: RemoteServer) -> bool:
        """One liveness check of `s` now (what the monitor runs when it is due); returns whether it is up.

        An up server's /health is probed. A down server is retried: /health, then discovery
        (its members now, its tokenizer, its settings); on success it is up and routed again,
        otherwise its next retry waits twice as long as the last (up to `backoff_max`).
        """
        if s.up:
            return await self._liveness.check_up(s)
        problem = await self._liveness.probe(s)
        found = None
        if problem is None:
            try:
                found = await self._discovery.discover_one(s, base_source(self.population), check_settings=True)
            except RemoteDiscoveryError as e:
                problem = f"discovery: {e}"
        if s.up:  # brought up meanwhile by another check
            return True
        if found is None:
            self._liveness.still_down(s, problem)
            return False
        self._liveness.mark_up(s, found)
        self._router.reroute()
        if all(x.up for x in self.servers):
            self._errored = False  # every server has been discovered since the discovery that failed
        return True

    async def start_monitor(self) -> None:
        """Start watching every server (from the running event loop; `shutdown` stops it). Idempotent."""
        self._monitor.start(self.servers)

    async def warm(self) -> None:
        """Called by the app once the backend serves (and after each refresh): start the monitor."""
        await self.start_monitor()

    # ------------------------------------------------------------------ requests

    def next_id(self, prefix: str) -> str:
        return f"{prefix}-{self._tag}-{next(self._ids)}"

    def generate(
        self, prompt_ids: list[int], params: Any, member: str | None, request_id: str
    ) -> AsyncIterator[RemoteRequestOutput]:
        """Stream cumulative outputs for one request from the server that serves `member` (see `calls.py`)."""
        return self._calls.generate(prompt_ids, params, member, request_id)

    async def score(self, prompt_ids: list[int], continuations: Sequence[list[int]], member: str | None) -> list[float]:
        """Mean log-probability of each continuation after the prompt, under one member (see `calls.py`)."""
        return await self._calls.score(prompt_ids, continuations, member)

    # ------------------------------------------------------------------ lifecycle

    async def check_health(self) -> None:
        """Raise RemoteError unless every server answers `GET /health` with 200."""
        for s in self.servers:
            try:
                resp = await s.client.get("/health", timeout=self._discovery.timeout)
            except httpx.HTTPError as e:
                raise RemoteError(f"{s.url} is unreachable: {type(e).__name__}") from None
            if resp.status_code != 200:
                raise RemoteError(f"{s.url} is unhealthy: HTTP {resp.status_code}")

    async def aclose(self) -> None:
        self._monitor.stop()
        await asyncio.gather(*(s.client.aclose() for s in self.servers), return_exceptions=True)

    def shutdown(self) -> None:
        """Stop the monitor and close the HTTP clients (scheduled on the running loop when there is one)."""
        self._monitor.stop()
        self._close_now()

    def _close_now(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self._closing.append(loop.create_task(self.aclose()))
            return
        try:
            asyncio.run(self.aclose())
        except RuntimeError as e:  # pragma: no cover - closing idle connections at exit
            log.debug("closing the remote clients: %s", e)


def _unique_urls(urls: Sequence[str]) -> list[str]:
    """The servers' roots (see `normalize_url`); at least one, none twice."""
    normalized = [normalize_url(u) for u in urls]
    if not normalized:
        raise ValueError("remote mode needs at least one vLLM server URL")
    dup = sorted({u for u in normalized if normalized.count(u) > 1})
    if dup:
        raise ValueError(f"remote server URL(s) given twice: {dup}")
    return normalized


def load_tokenizer(population: Population) -> Any:
    """The population's base model's tokenizer (Hugging Face), from its local path or hub id."""
    from transformers import AutoTokenizer

    source = base_source(population)
    if source is None:
        raise ValueError(f"population {population.root} names no base model path or hub id")
    return AutoTokenizer.from_pretrained(str(source))
