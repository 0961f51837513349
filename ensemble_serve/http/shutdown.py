"""Shutdown that drains, with a bound.

The first SIGTERM (or Ctrl-C) starts a drain: uvicorn stops accepting connections, requests that
arrive on open connections get a 503, and requests in flight may finish for up to `grace`
seconds. When the grace runs out, :class:`Drain` tells every request still in flight to stop:
its engine work is aborted and it is answered with a 503 (a stream ends with an error event),
so uvicorn sees every connection close and the lifespan shuts the engine down; the process
exits 0. A second SIGTERM or Ctrl-C exits at once (128 + the signal number), killing the
engine's processes, even while a request is stuck.

In a terminal, Ctrl-C reaches vLLM's engine processes too (they share the terminal's process
group), so requests in flight end at once with a 503 rather than finishing; SIGTERM, as a
process manager sends it to the server's own process, drains as described.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from types import FrameType

import psutil
import uvicorn

log = logging.getLogger("ensemble_serve")


class Drain:
    """The server's shutdown state, shared by the middleware, the routes and the signal handler.

    `draining` turns true at the first signal; `expired` is set `grace` seconds later, and every
    request still in flight then stops.
    """

    def __init__(self, grace: float):
        self.grace = grace
        self.draining = False
        self.expired = asyncio.Event()
        self.inflight = 0  # HTTP requests being answered now (streams included)

    def begin(self) -> None:
        """Start draining (idempotent); must run on the event loop."""
        if self.draining:
            return
        self.draining = True
        log.info(
            "shutting down: %d request(s) in flight may finish within %.1f s; new requests get a 503",
            self.inflight,
            self.grace,
        )
        asyncio.get_running_loop().call_later(self.grace, self._expire)

    def _expire(self) -> None:
        if self.inflight:
            log.warning("shutdown grace of %.1f s is over: aborting %d request(s)", self.grace, self.inflight)
        self.expired.set()


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a bounded drain on the first signal and an immediate exit on the second."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # not recorded in self._captured_signals: uvicorn would re-raise it after the shutdown and the
        # process would end by the signal instead of exiting 0
        if self.should_exit:
            _exit_now(sig)
        self.should_exit = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.drain.begin)


def _exit_now(sig: int) -> None:
    """Kill the engine's processes and leave, without waiting for anything."""
    name = signal.Signals(sig).name
    log.warning("second %s: exiting now", name)
    try:
        for child in psutil.Process().children(recursive=True):
            child.kill()
    except Exception as e:  # pragma: no cover - best effort on the way out
        log.warning("could not stop the engine's processes: %s", e)
    logging.shutdown()
    os._exit(128 + sig)
