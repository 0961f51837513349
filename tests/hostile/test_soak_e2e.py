"""A bounded loopback soak of the real server (real vLLM CPU engine, embedded ensemble), kept as a regression test.

300 mixed requests at concurrency 32 (see tests/soak.py for the mix): every vote rule and answer mode,
members with n > 1 and seeds, lists of prompts, token-id prompts, streams, and clients that leave
mid-stream. It passes when nothing unexpected happens, the engine's in-flight count is back to 0, and
the API process's RSS grows by less than 10% between the first and the last third. bench/soak.py runs
the same soak and records its figures in BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import json
import time

import psutil
import pytest

from ensemble_serve.testing.servers import metric
from ensemble_serve.testing.soak import run_soak

pytestmark = pytest.mark.engine

MEMBERS = [f"m0{i}" for i in range(8)]


def test_300_mixed_requests_at_concurrency_32(server):
    process = psutil.Process(server.proc.pid)
    rss = lambda: process.memory_info().rss / 2**20  # noqa: E731
    # warm-up at the same concurrency: the API process's memory rises to a plateau during the first few
    # hundred requests at 32 in flight (measured: +12% in the first 300, then +0.05% and 0.0% in the next
    # two 300s), so the growth is measured after that
    warm = asyncio.run(run_soak(server.url, MEMBERS, requests=150, concurrency=32, seed=1))
    assert not warm.unexpected, warm.unexpected
    result = asyncio.run(run_soak(server.url, MEMBERS, requests=300, concurrency=32, rss_of=rss))
    summary = result.summary()
    print(json.dumps(summary, indent=1))
    assert not result.unexpected, summary
    assert sum(result.statuses.values()) == 300 and result.statuses.get("abandoned", 0) > 0
    assert {k.split("-")[0] for k in result.by_kind} == {"ensemble", "member", "base"}
    deadline = time.monotonic() + 10
    while metric(server.url, "ensemble_engine_requests_inflight") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server.url, "ensemble_engine_requests_inflight") == 0
    assert summary["rss_growth"] < 0.10, summary
    assert server.alive()
