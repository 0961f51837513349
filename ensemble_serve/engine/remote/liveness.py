"""Liveness: remote servers marked down and up, retried with capped exponential backoff, watched by a monitor.

A server goes down when a request to it cannot connect or times out, when it answers 5xx (501
aside: that is about the request), or when a stream carries an error of 500 or more (vLLM's
`EngineDeadError` arrives that way); whoever sees that calls `Liveness.mark_down`. The monitor
(`Monitor.start`, on the running loop; `Monitor.stop` cancels it) runs one task per server: it
probes an up server's `GET /health` every `probe_interval` seconds (vLLM answers 503 once its
engine is dead) and retries a down server with exponential backoff (`Backoff`: `initial`
doubling to `max`, less up to `jitter` of it at random, so that servers do not retry in step).
A down server that answers /health 200 is discovered again (its /v1/models: which members it
serves now; its /tokenize) before it is up: that is the backend's `check_server`, which the
monitor calls when a server is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from ensemble_serve.engine.remote.routing import Router
from ensemble_serve.engine.remote.servers import Found, RemoteServer

log = logging.getLogger("ensemble_serve")

PROBE_INTERVAL = 5.0  # seconds between two /health probes of a server that is up
PROBE_TIMEOUT = 10.0  # a /health probe that takes longer marks the server down
BACKOFF_INITIAL = 1.0  # seconds from a server going down to its first retry; doubles with each failed retry
BACKOFF_MAX = 30.0
BACKOFF_JITTER = 0.2  # each wait is shortened by up to this fraction, at random (servers do not retry in step)


@dataclass(frozen=True)
class Backoff:
    """Waits between the retries of a down server: `initial` seconds doubling to `max`, less up to `jitter` of it."""

    initial: float = BACKOFF_INITIAL
    max: float = BACKOFF_MAX
    jitter: float = BACKOFF_JITTER

    def __post_init__(self) -> None:
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff_jitter must be in [0, 1), got {self.jitter}")

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds before retry number `failures + 1` (capped, with jitter drawn from `rng`)."""
        delay = min(self.max, self.initial * 2.0**failures)
        return delay * (1.0 - self.jitter * rng.random())


class Liveness:
    """Marks servers down and up and schedules their probes and retries, on `clock` (monotonic seconds).

    `router` says which members a server going down takes away (for the log); `rng` draws the
    backoff's jitter.
    """

    def __init__(
        self,
        router: Router,
        *,
        clock: Callable[[], float],
        backoff: Backoff,
        rng: random.Random,
        probe_interval: float = PROBE_INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
    ):
        self.router = router
        self.clock = clock
        self.backoff = backoff
        self.rng = rng
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout

    def wait(self, failures: int) -> float:
        """Seconds before retry number `failures + 1` of a down server (capped, with jitter)."""
        return self.backoff.delay(failures, self.rng)

    def mark_down(self, s: RemoteServer, reason: str, *, epoch: int | None = None) -> None:
        """Take `s` out of routing (no-op if it is already down, or if it came back up since `epoch`)."""
        if not s.up or (epoch is not None and epoch != s.epoch):
            return
        s.up, s.reason, s.failures = False, reason, 0
        s.retry_at = self.clock() + self.wait(0)
        log.warning(
            "remote vLLM server %s is down (%s); unavailable now: %s; retrying in %.1f s",
            s.url,
            reason,
            ", ".join(self.router.lost_with(s)) or "no member",
            s.retry_at - self.clock(),
        )
        s.wake.set()

    def still_down(self, s: RemoteServer, problem: str | None) -> None:
        """A retry of `s` failed (`problem` says how): wait twice as long before the next (up to the cap)."""
        s.failures += 1
        s.reason = problem
        s.retry_at = self.clock() + self.wait(s.failures)
        log.info(
            "remote vLLM server %s is still down (%s); retrying in %.1f s", s.url, problem, s.retry_at - self.clock()
        )

    def mark_up(self, s: RemoteServer, found: Found) -> None:
        """`s` answered again and discovery found `found` on it: it serves that from now on (route it again)."""
        s.adopt(found)
        s.up, s.reason, s.retry_at, s.failures = True, None, None, 0
        s.epoch += 1
        s.next_probe = self.clock() + self.probe_interval
        log.warning(
            "remote vLLM server %s is up again; it serves %s", s.url, ", ".join(sorted(s.members)) or "no member"
        )

    async def probe(self, s: RemoteServer) -> str | None:
        """None if `s` answers `GET /health` with 200, else what went wrong."""
        try:
            resp = await s.client.get("/health", timeout=self.probe_timeout)
        except httpx.HTTPError as e:
            return f"GET /health failed: {type(e).__name__}: {e}".rstrip(": ")
        if resp.status_code != 200:
            return f"GET /health answered {resp.status_code}" + (
                " (its engine is dead)" if resp.status_code == 503 else ""
            )
        return None

    async def check_up(self, s: RemoteServer) -> bool:
        """Probe an up server's /health now: it stays up (next probe scheduled) or goes down. Whether it is up."""
        epoch = s.epoch
        problem = await self.probe(s)
        if problem is None:
            s.next_probe = self.clock() + self.probe_interval
        else:
            self.mark_down(s, problem, epoch=epoch)
        return s.up

    def report(self) -> dict[str, Any]:
        """Each server's state: `{"servers": [{"url", "up", "reason", "retry_in_s", "members"}]}`."""
        now = self.clock()
        return {
            "servers": [
                {
                    "url": s.url,
                    "up": s.up,
                    "reason": s.reason,
                    "retry_in_s": None if s.up or s.retry_at is None else round(max(0.0, s.retry_at - now), 2),
                    "members": sorted(s.members),
                }
                for s in self.router.servers
            ]
        }


class Monitor:
    """One task per server that runs `check(server)` whenever the server is due (see `RemoteServer.due`)."""

    def __init__(self, liveness: Liveness, check: Callable[[RemoteServer], Awaitable[bool]]):
        self._liveness = liveness
        self._check = check
        self.tasks: list[asyncio.Task] = []

    def start(self, servers: Sequence[RemoteServer]) -> None:
        """Start watching every server (on the running event loop). Idempotent."""
        if any(not t.done() for t in self.tasks):
            return
        loop = asyncio.get_running_loop()
        now = self._liveness.clock()
        for s in servers:
            if s.up:
                s.next_probe = now + self._liveness.probe_interval
        self.tasks = [loop.create_task(self._watch(s), name=f"ensemble-serve monitor {s.url}") for s in servers]

    def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.tasks = []

    async def _watch(self, s: RemoteServer) -> None:
        while True:
            delay = s.due() - self._liveness.clock()
            if delay > 0:
                s.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(s.wake.wait(), delay)
                continue  # woken (it went down) or due: look again
            try:
                await self._check(s)
            except asyncio.CancelledError:
                raise
            except Exception:  # the monitor must outlive any surprise
                log.exception("checking remote vLLM server %s failed", s.url)
                await asyncio.sleep(self._liveness.probe_interval)
