"""SIGTERM with requests in flight: drained within --shutdown-grace, exit 0; a second SIGTERM exits at once.

The first test ends the package's server (tests/hostile/conftest.py), so this module runs last; the
second needs a long grace and starts a server of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from ensemble_serve.testing.servers import copy_embedded, start_server

pytestmark = pytest.mark.engine

ENSEMBLE = "sandbox-ensemble"
PROBLEM = "add 478+365"  # answer 843

SHORT = {"model": "m00", "messages": [{"role": "user", "content": PROBLEM}], "temperature": 0, "max_tokens": 32}
LONG = {
    "model": ENSEMBLE,
    "messages": [{"role": "user", "content": PROBLEM}],
    "temperature": 1.0,
    "max_tokens": 200,
    "ignore_eos": True,
    "ensemble": {"samples_per_member": 32},  # 256 chains: about 25 s on 2 cores
}


async def _in_flight_then_signal(url: str, pid: int, signals: int) -> tuple[list, float]:
    """19 short requests and one long one in flight, then `signals` SIGTERMs; (responses, seconds after the first)."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        tasks = [asyncio.create_task(c.post("/v1/chat/completions", json=SHORT)) for _ in range(19)]
        await asyncio.sleep(0.3)  # the short ones reach the engine first
        tasks.append(asyncio.create_task(c.post("/v1/chat/completions", json=LONG)))
        await asyncio.sleep(0.7)
        os.kill(pid, signal.SIGTERM)
        sent = time.monotonic()
        for _ in range(signals - 1):
            await asyncio.sleep(0.3)
            os.kill(pid, signal.SIGTERM)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results, time.monotonic() - sent


def test_sigterm_drains_in_flight_requests_within_the_grace_then_exits_0(server):
    """On the package's server (started with --shutdown-grace 4), after every other module's traffic."""
    results, _ = asyncio.run(_in_flight_then_signal(server.url, server.proc.pid, signals=1))
    statuses = [getattr(r, "status_code", repr(r)) for r in results]
    assert statuses[:19] == [200] * 19, statuses  # finished within the grace
    assert statuses[19] == 503, statuses  # the long one is aborted when the grace is over
    assert "shutting down" in results[19].json()["error"]["message"]
    code = server.proc.wait(timeout=60)
    assert code == 0, server.log.read_text()[-3000:]
    log = server.log.read_text()
    assert "shutdown grace of 4.0 s is over: aborting 1 request(s)" in log
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/health", timeout=2)


def test_a_second_sigterm_exits_at_once_even_with_a_request_stuck(tmp_path: Path):
    population = copy_embedded(tmp_path)
    srv = start_server(
        population,
        tmp_path / "server.log",
        "--shutdown-grace",
        "60",
        "--no-watch",
        "--served-model-name",
        ENSEMBLE,
        api_key=None,
    )
    try:
        asyncio.run(_second_signal(srv))
        assert srv.proc.returncode == 128 + signal.SIGTERM
        assert "second SIGTERM: exiting now" in srv.log.read_text()
    finally:
        srv.stop()


async def _second_signal(srv) -> None:
    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
        long = asyncio.create_task(c.post("/v1/chat/completions", json=LONG))
        await asyncio.sleep(1.0)
        os.kill(srv.proc.pid, signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert srv.proc.poll() is None  # draining: the long request has 60 s
        os.kill(srv.proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        while srv.proc.poll() is None and time.monotonic() - sent < 5:
            await asyncio.sleep(0.05)
        assert srv.proc.poll() is not None, "still running 5 s after the second SIGTERM"
        assert time.monotonic() - sent < 3
        with pytest.raises(httpx.HTTPError):
            await long
