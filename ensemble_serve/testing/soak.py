"""A bounded loopback soak of a running server: many mixed requests at a fixed concurrency.

Shared by tests/hostile/test_soak_e2e.py (the regression test) and bench/soak.py (the figures in
BENCHMARKS.md). The mix covers every vote rule and answer mode of the ensemble, chat and text
completions, members with n > 1 and seeds, the base model, lists of prompts and token-id prompts,
streams read to the end, and streams the client abandons after the first chunk. The server's
API-process RSS is sampled while it runs.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

ENSEMBLE = "sandbox-ensemble"
PROBLEMS = ["add 478+365", "sub 603-278", "calc (3+4)*5-6", "sort 52 17 83 4", "mod 347%7", "add 19+23"]
VOTES = ("majority", "weighted", "cross")
ANSWERS: tuple[Any, ...] = ("auto", "marked", "number", "boxed", "choice", "text", {"regex": r"#### (\d+)"})


@dataclass
class SoakResult:
    requests: int
    seconds: float
    statuses: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MB)
    latency_s: dict[str, float] = field(default_factory=dict)

    def rss_thirds(self) -> tuple[float, float]:
        """Mean RSS (MB) over the first and the last third of the run."""
        end = self.seconds
        first = [mb for t, mb in self.rss_mb if t <= end / 3]
        last = [mb for t, mb in self.rss_mb if t >= 2 * end / 3]
        return statistics.fmean(first), statistics.fmean(last)

    def summary(self) -> dict[str, Any]:
        first, last = self.rss_thirds()
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 1),
            "requests_per_s": round(self.requests / self.seconds, 2),
            "statuses": self.statuses,
            "by_kind": self.by_kind,
            "unexpected": self.unexpected[:10],
            "rss_mb_first_third": round(first, 1),
            "rss_mb_last_third": round(last, 1),
            "rss_growth": round(last / first - 1, 4),
            "latency_s": self.latency_s,
        }


def _request(i: int, rng: random.Random, members: list[str]) -> tuple[str, str, dict[str, Any], bool]:
    """(kind, route, body, abandon after the first chunk) for request i."""
    problem = rng.choice(PROBLEMS)
    chat = {"messages": [{"role": "user", "content": problem}], "max_tokens": 48}
    kind = i % 10
    if kind <= 3:  # ensemble: every vote rule and answer mode in turn
        vote, answer = VOTES[i % len(VOTES)], ANSWERS[(i // 3) % len(ANSWERS)]
        options = {"vote": vote, "answer": answer, "samples_per_member": 1 + i % 2, "return_chains": i % 4 == 0}
        return (
            f"ensemble-{vote}",
            "/v1/chat/completions",
            {"model": ENSEMBLE, **chat, "temperature": 0.8, "ensemble": options},
            False,
        )
    if kind == 4:  # ensemble, streamed (sometimes abandoned)
        body = {
            "model": ENSEMBLE,
            **chat,
            "temperature": 0.8,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return "ensemble-stream", "/v1/chat/completions", body, i % 20 == 4
    if kind == 5:  # a member with n > 1 and a seed
        body = {"model": rng.choice(members), **chat, "temperature": 1.0, "n": 4, "seed": i}
        return "member-n", "/v1/chat/completions", body, False
    if kind == 6:  # a member streamed, half of them abandoned after the first chunk
        body = {"model": rng.choice(members), **chat, "temperature": 0.7, "stream": True, "max_tokens": 96}
        return "member-stream", "/v1/chat/completions", body, i % 20 == 6
    if kind == 7:  # text completions: a list of prompts for the ensemble
        body = {"model": ENSEMBLE, "prompt": [problem, rng.choice(PROBLEMS)], "max_tokens": 48, "temperature": 0.5}
        return "ensemble-prompts", "/v1/completions", body, False
    if kind == 8:  # token-id prompt to a member
        body = {"model": rng.choice(members), "prompt": [5, 6, 7, 8], "max_tokens": 24, "logprobs": 2}
        return "member-token-ids", "/v1/completions", body, False
    body = {"model": "sandbox-substrate", **chat, "temperature": 0.0}
    return "base", "/v1/chat/completions", body, False


async def run_soak(
    url: str,
    members: list[str],
    *,
    requests: int = 300,
    concurrency: int = 32,
    headers: dict[str, str] | None = None,
    rss_of: Any = None,
    seed: int = 0,
) -> SoakResult:
    """Send `requests` mixed requests, `concurrency` at a time; `rss_of()` -> MB is sampled every 0.25 s."""
    rng = random.Random(seed)
    plan = [_request(i, rng, members) for i in range(requests)]
    result = SoakResult(requests, 0.0)
    latencies: dict[str, list[float]] = {}
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    started = time.monotonic()

    async def sample() -> None:
        while True:
            if rss_of is not None:
                result.rss_mb.append((time.monotonic() - started, rss_of()))
            await asyncio.sleep(0.25)

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                kind, route, body, abandon = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.monotonic()
            status = await _send(client, route, body, abandon)
            latencies.setdefault(kind, []).append(time.monotonic() - t0)
            result.by_kind[kind] = result.by_kind.get(kind, 0) + 1
            key = "abandoned" if abandon and status == 200 else str(status)
            result.statuses[key] = result.statuses.get(key, 0) + 1
            if status != 200:
                result.unexpected.append(f"{kind}: {status}")

    sampler = asyncio.create_task(sample())
    async with httpx.AsyncClient(base_url=url, headers=headers or {}, timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    sampler.cancel()
    result.seconds = time.monotonic() - started
    if rss_of is not None:
        result.rss_mb.append((result.seconds, rss_of()))
    result.latency_s = {k: round(statistics.median(v), 3) for k, v in sorted(latencies.items())}
    return result


async def _send(client: httpx.AsyncClient, route: str, body: dict[str, Any], abandon: bool) -> int | str:
    """The status, after reading the whole answer (a stream to its [DONE] or error event, or its first chunk)."""
    try:
        if not body.get("stream"):
            resp = await client.post(route, json=body)
            if resp.status_code == 200 and "choices" not in resp.json():
                return "no-choices"
            return resp.status_code
        async with client.stream("POST", route, json=body) as resp:
            if resp.status_code != 200:
                return resp.status_code
            async for line in resp.aiter_lines():
                if abandon and line.startswith("data:"):
                    return 200  # the client goes away mid-stream
                if line.startswith("data:") and '"error"' in line:
                    return "stream-error"
                if line.strip() == "data: [DONE]":
                    return 200
            return "stream-cut"
    except httpx.HTTPError as e:
        return type(e).__name__
