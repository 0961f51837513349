"""End to end, remote mode under stress and failure: two real CPU vLLM OpenAI servers started as
README's "Beyond one machine" shows (with `--no-enable-chunked-prefill`), `ensemble-serve up
--remote` in front.

1. a burst of seeded `n=8` member requests leaves both servers alive;
2. SIGKILL one server: ensemble-serve's monitor marks it down within seconds, its members are
   reported unavailable (503 `member_unavailable`, `/health` "degraded", `ensemble.unavailable`,
   `ensemble_member_available 0`) while the others keep answering;
3. restart it on the same port: it is re-discovered and serves again.

The cluster is the package's (tests/remote/conftest.py), shared with test_remote_e2e.py, which runs
first; this module kills and restarts B, so it runs last.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import openai
import pytest

from ensemble_serve.testing.servers import wait_healthy

from .cluster import MEMBERS, Cluster

pytestmark = pytest.mark.engine

PROBLEM = "add 478+365"
DOWN_WITHIN = 15.0  # seconds from the kill to "down": the monitor probes every 5 s
BACK_WITHIN = 60.0  # seconds from the server answering /health again to "up": retries back off to 30 s


def _log(cluster: Cluster) -> str:
    return cluster.ensemble.log.read_text(errors="replace")


def _wait_for(what: str, cond, timeout: float, cluster: Cluster) -> float:
    """Poll `cond()` until true; the seconds it took."""
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n{_log(cluster)[-3000:]}")
        time.sleep(0.25)
    return time.monotonic() - started


def _health(cluster: Cluster) -> tuple[int, dict]:
    r = httpx.get(cluster.ensemble.url + "/health", timeout=10)
    return r.status_code, r.json()


def _find_list(obj: Any, wanted: list[str]) -> bool:
    """Whether `wanted` appears as a list anywhere in a JSON value."""
    if isinstance(obj, list):
        return obj == wanted or any(_find_list(x, wanted) for x in obj)
    if isinstance(obj, dict):
        return any(_find_list(x, wanted) for x in obj.values())
    return False


def _gauge(cluster: Cluster, name: str, **labels: str) -> float | None:
    text = httpx.get(cluster.ensemble.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[-1])
    return None


def _member(cluster: Cluster, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": PROBLEM}], "max_tokens": 16, "temperature": 0}
    return httpx.post(
        cluster.ensemble.url + "/v1/chat/completions", headers=cluster.ensemble.headers, json=body, timeout=120
    )


def _ensemble(cluster: Cluster) -> dict:
    client = cluster.ensemble.client()
    resp = client.chat.completions.create(
        model="sandbox-ensemble",
        messages=[{"role": "user", "content": PROBLEM}],
        temperature=0,
        max_tokens=64,
    )
    assert resp.choices[0].message.content
    return resp.model_extra["ensemble"]


# ---------------------------------------------------------------- discovery checked what it could


def test_discovery_checks_the_servers_settings(cluster: Cluster):
    log = _log(cluster)
    # B has no /server_info: one warning that names it and the flag; A was checked and is fine
    unchecked = [line for line in log.splitlines() if "cannot check its settings" in line]
    assert len(unchecked) == 1 and cluster.b.url in unchecked[0] and "--no-enable-chunked-prefill" in unchecked[0]
    assert "chunked prefill enabled" not in log
    info = httpx.get(cluster.a.url + "/server_info", params={"config_format": "json"}, timeout=60).json()
    assert info["vllm_config"]["scheduler_config"]["enable_chunked_prefill"] is False


# ---------------------------------------------------------------- the burst that used to kill a server


def _long_prompt(i: int) -> str:
    """About 70 tokens: 12 such requests x n=8 on one server exceed vLLM's 2048-token step budget, so with
    chunked prefill some prompt is split over engine steps, which kills the CPU engine when seeded (checked:
    without --no-enable-chunked-prefill this burst kills the server; with short prompts it does not)."""
    return " ".join(f"add {100 + 7 * i + k}+{13 * i + k}" for k in range(6))


def test_seeded_burst_leaves_both_servers_alive(cluster: Cluster):
    async def burst() -> list:
        client = cluster.ensemble.async_client(timeout=600)
        jobs = [
            client.chat.completions.create(
                model=MEMBERS[i % 8],
                messages=[{"role": "user", "content": _long_prompt(i)}],
                temperature=1.0,
                max_tokens=24,
                n=8,
                seed=i,
            )
            for i in range(24)
        ]
        return await asyncio.gather(*jobs, return_exceptions=True)

    started = time.monotonic()
    results = asyncio.run(burst())
    took = time.monotonic() - started
    print(f"seeded burst: {took:.1f} s")
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, f"{len(errors)} of 24 failed: {errors[:3]}"
    assert all(len(r.choices) == 8 for r in results)
    assert cluster.a.healthy() and cluster.b.healthy(), took
    for s in (cluster.a, cluster.b):
        assert "CPU Generator does not use offset" not in s.log.read_text(errors="replace")
    assert "is down" not in _log(cluster)
    status, body = _health(cluster)
    assert status == 200 and body["status"] == "ok", body


# ---------------------------------------------------------------- a server dies


def test_a_killed_server_is_marked_down_and_its_members_reported(cluster: Cluster):
    b = cluster.b
    b.kill()
    # the monitor notices without any traffic
    took = _wait_for(
        "B marked down", lambda: f"remote vLLM server {b.url} is down" in _log(cluster), DOWN_WITHIN, cluster
    )
    print(f"B marked down {took:.1f} s after the kill")

    # a member of B: 503 member_unavailable naming its server; a member of A still answers
    r = _member(cluster, "m04")
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "member_unavailable" and "m04" in err["message"] and b.url in err["message"]
    assert int(r.headers["retry-after"]) >= 1
    assert _member(cluster, "m01").status_code == 200

    # what the service reports (/health, the ensemble object, /metrics)
    status, body = _health(cluster)
    assert body["status"] == "degraded", body
    assert _find_list(body, MEMBERS[4:]), body
    ens = _ensemble(cluster)
    assert ens["unavailable"] == MEMBERS[4:]
    assert ens["members"] and not set(ens["members"]) & set(MEMBERS[4:])
    assert _gauge(cluster, "ensemble_member_available", member="m04") == 0
    assert _gauge(cluster, "ensemble_member_available", member="m00") == 1
    assert _gauge(cluster, "ensemble_remote_server_up", server=b.url) == 0
    assert _gauge(cluster, "ensemble_remote_server_up", server=cluster.a.url) == 1
    assert cluster.a.healthy() and cluster.ensemble.proc.poll() is None


def test_a_restarted_server_is_rediscovered(cluster: Cluster):
    assert not cluster.b.healthy()
    b = cluster.restart_b()
    wait_healthy([b])
    took = _wait_for(
        "B up again", lambda: f"remote vLLM server {b.url} is up again" in _log(cluster), BACK_WITHIN, cluster
    )
    print(f"B up again {took:.1f} s after it answered /health")
    assert re.search(rf"{re.escape(b.url)} is up again; it serves m04, m05, m06, m07", _log(cluster))

    r = _member(cluster, "m04")
    assert r.status_code == 200, r.text
    status, body = _health(cluster)
    assert status == 200 and body["status"] == "ok", body
    ens = _ensemble(cluster)
    assert ens["members"] == MEMBERS and not ens.get("unavailable")
    assert _gauge(cluster, "ensemble_member_available", member="m04") == 1
    assert _gauge(cluster, "ensemble_remote_server_up", server=b.url) == 1


def test_openai_client_sees_the_503(cluster: Cluster):
    """Last: kill B again and check the error as the `openai` client raises it."""
    cluster.b.kill()
    _wait_for(
        "B down again",
        lambda: _log(cluster).count(f"remote vLLM server {cluster.b.url} is down") >= 2,
        DOWN_WITHIN,
        cluster,
    )
    with pytest.raises(openai.APIStatusError) as e:
        cluster.ensemble.client().chat.completions.create(
            model="m06", messages=[{"role": "user", "content": PROBLEM}], max_tokens=8
        )
    assert e.value.status_code == 503 and e.value.code == "member_unavailable"
