"""Remote servers' liveness in `RemoteBackend`, without vLLM: fake vLLM servers behind `httpx.MockTransport`.

A server goes down on a connection error or timeout, a 5xx answer or an engine-dead error in a
stream; a down server is retried with capped exponential backoff and re-discovered when its
/health answers 200 again; `servers_of` offers only up servers; `unavailable_members()`,
`health()` and the metrics gauges report the state. The real thing (two vLLM servers, one killed)
is tests/remote/test_remote_health_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from ensemble_serve.engine.remote import RemoteBackend, RemoteDiscoveryError, RemoteError
from ensemble_serve.errors import BadRequestError, MemberUnavailableError
from ensemble_serve.http.errors import error_response
from ensemble_serve.service.metrics import Metrics
from ensemble_serve.shared.population import Population, load_population
from ensemble_serve.testing.servers import plain_embedded

MEMBERS = [f"m0{i}" for i in range(8)]
A, B = "http://node-a:8001", "http://node-b:8001"
PROBE_IDS = [7, 8, 9]
ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."


# --------------------------------------------------------------------------- fakes


class FakeTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(PROBE_IDS)


@dataclass
class FakeVLLM:
    """One fake vLLM OpenAI server; its fields say how it behaves now."""

    members: list[str]
    alive: bool = True  # False: connections are refused
    health: int = 200
    models_status: int = 200
    completions: str = "ok"  # ok | 500 | 501 | 400 | engine_dead | timeout
    server_info: dict | None = None  # None: 404 (no VLLM_SERVER_DEV_MODE)
    calls: list[str] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls.append(path)
        if not self.alive:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if path == "/health":
            return httpx.Response(self.health)
        if path == "/v1/models":
            if self.models_status != 200:
                return httpx.Response(self.models_status, json={"error": {"message": "boom"}})
            cards = [{"id": "base", "max_model_len": 256}] + [{"id": m, "parent": "base"} for m in self.members]
            return httpx.Response(200, json={"data": cards})
        if path == "/tokenize":
            return httpx.Response(200, json={"tokens": PROBE_IDS})
        if path == "/server_info":
            if self.server_info is None:
                return httpx.Response(404, json={"detail": "Not Found"})
            return httpx.Response(200, json={"vllm_config": self.server_info, "vllm_env": {}, "system_env": {}})
        if path == "/v1/completions":
            return self._complete(request)
        return httpx.Response(404)

    def _complete(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        mode = self.completions
        if mode == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if mode in ("500", "501", "400"):
            return httpx.Response(int(mode), json={"error": {"message": f"status {mode}", "code": int(mode)}})
        if not body.get("stream"):  # a scoring request
            n = len(body["prompt"])
            lps = [None] + [{str(t): {"logprob": -0.5}} for t in body["prompt"][1:n]]
            return httpx.Response(200, json={"choices": [{"prompt_logprobs": lps}]})
        events = [{"choices": [{"index": 0, "text": "4", "logprobs": {"tokens": ["token_id:4"]}}]}]
        if mode == "engine_dead":
            events.append({"error": {"message": ENGINE_DEAD, "type": "InternalServerError", "code": 500}})
        else:
            events.append(
                {
                    "choices": [
                        {"index": 0, "text": "2", "logprobs": {"tokens": ["token_id:2"]}, "finish_reason": "stop"}
                    ]
                }
            )
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


class Cluster:
    """Fake servers A (m00-m03) and B (m04-m07) and a transport that routes to them by host."""

    def __init__(self) -> None:
        self.servers = {A: FakeVLLM(MEMBERS[:4]), B: FakeVLLM(MEMBERS[4:])}
        self.transport = httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        return self.servers[f"{request.url.scheme}://{request.url.host}:{request.url.port}"].handle(request)

    @property
    def a(self) -> FakeVLLM:
        return self.servers[A]

    @property
    def b(self) -> FakeVLLM:
        return self.servers[B]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def population() -> Population:
    return load_population(plain_embedded(), check_weights=False)  # m00..m07, no router or table


@pytest.fixture()
def cluster() -> Cluster:
    return Cluster()


@pytest.fixture()
def clock() -> Clock:
    return Clock()


def make_backend(population: Population, cluster: Cluster, clock: Clock | None = None, **kw: Any) -> RemoteBackend:
    kw.setdefault("backoff_jitter", 0.0)
    if clock is not None:
        kw["clock"] = clock
    return RemoteBackend(population, [A, B], tokenizer=FakeTokenizer(), transport=cluster.transport, **kw)


def params(**kw: Any) -> SimpleNamespace:
    """The fields of vLLM's SamplingParams that `request_body` reads."""
    base = dict(
        structured_outputs=None,
        max_tokens=4,
        logprobs=None,
        n=1,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        repetition_penalty=1.0,
        min_tokens=0,
        ignore_eos=False,
        skip_special_tokens=True,
        spaces_between_special_tokens=True,
        include_stop_str_in_output=False,
        seed=None,
        stop=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


async def generate(backend: RemoteBackend, member: str | None) -> list[int]:
    last = None
    async for out in backend.generate([1, 2, 3], params(), member, backend.next_id("t")):
        last = out
    return last.outputs[0].token_ids


def run(coro_fn, backend: RemoteBackend):
    """Run `coro_fn()` on a fresh loop, then close the backend's clients on that loop."""

    async def main():
        try:
            return await coro_fn()
        finally:
            await backend.aclose()

    return asyncio.run(main())


def server(backend: RemoteBackend, url: str):
    return next(s for s in backend.servers if s.url == url)


# --------------------------------------------------------------------------- marked down by requests


def test_all_up_at_start(population, cluster):
    backend = make_backend(population, cluster)
    assert backend.unavailable_members() == []
    assert backend.health() == {
        "servers": [
            {"url": A, "up": True, "reason": None, "retry_in_s": None, "members": MEMBERS[:4]},
            {"url": B, "up": True, "reason": None, "retry_in_s": None, "members": MEMBERS[4:]},
        ]
    }
    assert not backend.errored
    assert run(lambda: generate(backend, "m05"), backend) == [4, 2]


def test_connection_error_marks_the_server_down(population, cluster, clock):
    backend = make_backend(population, cluster, clock)
    cluster.b.alive = False

    async def go():
        with pytest.raises(RemoteError, match="ConnectError"):
            await generate(backend, "m05")
        return await generate(backend, "m01")  # A still answers

    assert run(go, backend) == [4, 2]
    b = server(backend, B)
    assert not b.up and "ConnectError" in b.reason
    assert backend.unavailable_members() == MEMBERS[4:]
    health = backend.health()["servers"]
    assert health[0]["up"] and health[0]["reason"] is None
    assert health[1] == {"url": B, "up": False, "reason": b.reason, "retry_in_s": 1.0, "members": MEMBERS[4:]}

    # a member whose only server is down: a 503 that names it, its server and the retry time
    assert [s.url for s in backend.servers_of("m01")] == [A]
    assert [s.url for s in backend.servers_of(None)] == [A]  # the base model: any up server
    with pytest.raises(MemberUnavailableError) as e:
        backend.servers_of("m06")
    msg = str(e.value)
    assert "'m06'" in msg and B in msg and "ConnectError" in msg and "retry in 1.0 s" in msg
    resp = error_response(e.value)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert json.loads(resp.body)["error"]["code"] == "member_unavailable"
    with pytest.raises(RemoteError, match="m99"):  # not a member at all: still the old error
        backend.servers_of("m99")


@pytest.mark.parametrize("mode", ["500", "engine_dead", "timeout"])
def test_5xx_engine_dead_stream_and_timeout_mark_the_server_down(population, cluster, mode):
    backend = make_backend(population, cluster)
    cluster.b.completions = mode

    async def go():
        with pytest.raises(Exception) as e:
            await generate(backend, "m04")
        return e.value

    err = run(go, backend)
    b = server(backend, B)
    assert not b.up, mode
    assert {"500": "answered 500", "engine_dead": "EngineCore encountered", "timeout": "ReadTimeout"}[mode] in b.reason
    if mode == "engine_dead":
        assert "in a stream" in b.reason and ENGINE_DEAD in str(err)
    assert backend.unavailable_members() == MEMBERS[4:]
    assert server(backend, A).up


@pytest.mark.parametrize("mode", ["400", "501"])
def test_errors_about_the_request_leave_the_server_up(population, cluster, mode):
    backend = make_backend(population, cluster)
    cluster.b.completions = mode

    async def go():
        with pytest.raises(Exception) as e:
            await generate(backend, "m04")
        return e.value

    err = run(go, backend)
    assert server(backend, B).up and backend.unavailable_members() == []
    if mode == "400":
        assert isinstance(err, BadRequestError)


def test_scoring_failures_mark_the_server_down(population, cluster):
    backend = make_backend(population, cluster)

    async def go():
        ok = await backend.score([1, 2], [[3, 4]], "m06")
        cluster.b.alive = False
        with pytest.raises(RemoteError, match="scoring"):
            await backend.score([1, 2], [[3, 4]], "m06")
        return ok

    assert run(go, backend) == [pytest.approx(-0.5)]
    assert not server(backend, B).up and "while scoring" in server(backend, B).reason


def test_every_server_down(population, cluster):
    backend = make_backend(population, cluster)
    cluster.a.alive = cluster.b.alive = False

    async def go():
        for m in ("m00", "m07"):
            with pytest.raises(RemoteError):
                await generate(backend, m)
        with pytest.raises(MemberUnavailableError, match="base model"):
            await generate(backend, None)

    run(go, backend)
    assert backend.unavailable_members() == MEMBERS
    assert [s["up"] for s in backend.health()["servers"]] == [False, False]


# --------------------------------------------------------------------------- retries, backoff, recovery


def test_backoff_doubles_up_to_the_cap(population, cluster, clock):
    backend = make_backend(population, cluster, clock, backoff_initial=1.0, backoff_max=30.0)
    b = server(backend, B)
    cluster.b.alive = False
    backend._mark_down(b, "test")
    waits = [b.retry_at - clock.now]

    async def go():
        for _ in range(7):
            clock.now = b.retry_at
            assert not await backend.check_server(b)
            waits.append(b.retry_at - clock.now)

    run(go, backend)
    assert waits == [1, 2, 4, 8, 16, 30, 30, 30]
    assert b.failures == 7 and "ConnectError" in b.reason
    assert backend.health()["servers"][1]["retry_in_s"] == 30.0


def test_backoff_jitter_shortens_each_wait_within_bounds(population, cluster, clock):
    backend = make_backend(population, cluster, clock, backoff_jitter=0.2, rng=random.Random(0))
    waits = [backend._backoff(k) for k in range(8) for _ in range(20)]
    for k in range(8):
        cap = min(30.0, 2.0**k)
        mine = waits[20 * k : 20 * (k + 1)]
        assert all(0.8 * cap <= w <= cap for w in mine)
        assert len(set(mine)) > 1  # jittered
    with pytest.raises(ValueError, match="jitter"):
        make_backend(population, cluster, backoff_jitter=1.0)


def test_marking_down_twice_keeps_the_first_reason_and_backoff(population, cluster, clock):
    backend = make_backend(population, cluster, clock)
    b = server(backend, B)
    backend._mark_down(b, "first")
    retry = b.retry_at
    clock.now += 0.5
    backend._mark_down(b, "second")
    assert (b.reason, b.retry_at) == ("first", retry)


def test_recovery_rediscovers_the_members(population, cluster, clock):
    backend = make_backend(population, cluster, clock)
    b = server(backend, B)
    cluster.b.alive = False

    async def go():
        with pytest.raises(RemoteError):
            await generate(backend, "m04")
        old_epoch = b.epoch
        # back, but the engine is dead: /health 503 keeps it down
        cluster.b.alive, cluster.b.health = True, 503
        clock.now = b.retry_at
        assert not await backend.check_server(b)
        assert "503" in b.reason and b.failures == 1
        # /health 200 but /v1/models fails: still down, and discovery says why
        cluster.b.health, cluster.b.models_status = 200, 500
        clock.now = b.retry_at
        assert not await backend.check_server(b)
        assert "discovery" in b.reason and "/v1/models answered 500" in b.reason and b.failures == 2
        # restarted with only m04 and m05: up again, and routing follows what it serves now
        cluster.b.models_status = 200
        cluster.b.members = ["m04", "m05"]
        calls = len(cluster.b.calls)
        clock.now = b.retry_at
        assert await backend.check_server(b)
        assert cluster.b.calls[calls:] == ["/health", "/v1/models", "/tokenize", "/server_info"]
        assert b.up and b.reason is None and b.retry_at is None and b.failures == 0 and b.epoch == old_epoch + 1
        assert await generate(backend, "m05") == [4, 2]
        assert backend.unavailable_members() == ["m06", "m07"]
        with pytest.raises(MemberUnavailableError, match="no remote vLLM server serves it now"):
            backend.servers_of("m07")
        # a request sent before the server came back cannot mark it down
        backend._mark_down(b, "stale", epoch=old_epoch)
        assert b.up

    run(go, backend)
    assert backend.health()["servers"][1] == {
        "url": B,
        "up": True,
        "reason": None,
        "retry_in_s": None,
        "members": ["m04", "m05"],
    }


def test_an_up_server_whose_health_fails_goes_down(population, cluster, clock):
    backend = make_backend(population, cluster, clock)
    a = server(backend, A)

    async def go():
        assert await backend.check_server(a)
        assert a.next_probe == clock.now + backend.probe_interval
        cluster.a.health = 503
        assert not await backend.check_server(a)

    run(go, backend)
    assert not a.up and a.reason == "GET /health answered 503 (its engine is dead)"
    assert backend.unavailable_members() == MEMBERS[:4]


def test_monitor_probes_and_recovers_on_its_own(population, cluster):
    backend = make_backend(population, cluster, probe_interval=0.02, backoff_initial=0.02, backoff_max=0.1)
    b = server(backend, B)

    async def until(cond, timeout=5.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            assert asyncio.get_running_loop().time() < deadline, "timed out"
            await asyncio.sleep(0.01)

    async def go():
        await backend.start_monitor()
        tasks = list(backend._monitors)
        await backend.warm()  # idempotent: the app calls warm() after each refresh
        assert backend._monitors == tasks and len(tasks) == 2
        cluster.b.health = 503
        await until(lambda: not b.up)
        assert backend.unavailable_members() == MEMBERS[4:]
        await until(lambda: b.failures >= 2)  # retried with backoff while down
        cluster.b.health = 200
        await until(lambda: b.up)
        assert backend.unavailable_members() == []
        # a request that finds the server gone wakes the monitor; it comes back on its own
        cluster.b.alive = False
        with pytest.raises(RemoteError):
            await generate(backend, "m04")
        assert not b.up
        cluster.b.alive = True
        await until(lambda: b.up)
        backend.shutdown()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        assert all(t.cancelled() for t in tasks) and backend._monitors == []

    run(go, backend)


# --------------------------------------------------------------------------- refresh with a server down


def test_refresh_skips_a_down_server_and_marks_an_unreachable_one_down(population, cluster):
    backend = make_backend(population, cluster)
    b = server(backend, B)
    backend._mark_down(b, "test")
    before = len(cluster.b.calls)
    backend.set_population(population)  # B is not asked: its members stay as last seen
    assert cluster.b.calls[before:] == [] and not backend.errored
    assert backend.unavailable_members() == MEMBERS[4:]

    a = server(backend, A)
    cluster.a.alive = False  # found down by the refresh: marked down, the refresh still succeeds
    backend.set_population(population)
    assert not a.up and "cannot reach" in a.reason and not backend.errored
    assert backend.unavailable_members() == MEMBERS

    async def go():
        await backend.start()  # the async discovery does the same
        assert not backend.errored

    run(go, backend)


def test_refresh_with_a_misconfigured_server_fails_and_marks_it_down(population, cluster):
    backend = make_backend(population, cluster)
    cluster.a.models_status = 401
    with pytest.raises(RemoteDiscoveryError, match="401"):
        backend.set_population(population)
    assert backend.errored and not server(backend, A).up
    cluster.a.models_status = 200

    async def go():
        assert await backend.check_server(server(backend, A))  # B is up too: errored clears

    run(go, backend)
    assert not backend.errored


def test_start_refuses_an_unreachable_server(population, cluster):
    cluster.b.alive = False
    with pytest.raises(RemoteDiscoveryError, match="cannot reach"):
        make_backend(population, cluster)


# --------------------------------------------------------------------------- settings check


CPU_CHUNKED = {"device_config": {"device": "cpu"}, "scheduler_config": {"enable_chunked_prefill": True}}


@pytest.mark.parametrize(
    "info, expect",
    [
        (None, "cannot check its settings"),
        (CPU_CHUNKED, "runs on the CPU with chunked prefill enabled"),
        ({**CPU_CHUNKED, "scheduler_config": {"enable_chunked_prefill": False}}, None),
        ({**CPU_CHUNKED, "device_config": {"device": "cuda"}}, None),
    ],
)
def test_discovery_warns_about_chunked_prefill_on_cpu(population, cluster, caplog, info, expect):
    cluster.a.server_info = cluster.b.server_info = info

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "--no-enable-chunked-prefill" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="ensemble_serve"):
        backend = make_backend(population, cluster)  # never refused for this
        first = warnings()
        backend.set_population(population)  # a refresh does not check again
        assert warnings() == first
        b = server(backend, B)
        backend._mark_down(b, "test")
        assert run(lambda: backend.check_server(b), backend)  # re-discovered after being down: checked again
        again = warnings()[len(first) :]
    if expect is None:
        assert first == again == []
        return
    assert len(first) == 2  # one per server
    for url, w in zip([A, B], first):
        assert url in w and expect in w
    if info is None:  # that it cannot be checked is said once per server
        assert again == []
    else:  # a CPU server with chunked prefill is named each time it comes (back) up
        assert len(again) == 1 and B in again[0] and expect in again[0]


# --------------------------------------------------------------------------- metrics


def test_metrics_gauges(population, cluster):
    backend = make_backend(population, cluster)
    backend._mark_down(server(backend, B), "test")
    metrics = Metrics()
    metrics.observe_availability(population.names, backend.unavailable_members(), backend.health()["servers"])
    text = metrics.render().decode()
    assert 'ensemble_member_available{member="m00"} 1.0' in text
    assert 'ensemble_member_available{member="m04"} 0.0' in text
    assert f'ensemble_remote_server_up{{server="{A}"}} 1.0' in text
    assert f'ensemble_remote_server_up{{server="{B}"}} 0.0' in text
    # a later call replaces the series: members that left the population and servers are dropped
    metrics.observe_availability(["m00"], [], None)
    text = metrics.render().decode()
    assert 'ensemble_member_available{member="m00"} 1.0' in text and 'member="m04"' not in text
    assert "ensemble_remote_server_up{" not in text
    backend.shutdown()
