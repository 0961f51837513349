"""A population refresh while 50 ensemble requests are in flight, on the real server (vLLM CPU engine).

Each request takes one snapshot of the population when it starts (`ensemble_serve/service/served.py`).
Here the population is rewritten under a loaded server (a new generation with other request defaults
and member weights) and reloaded while 50 requests run, some streamed. Every answer must come from
exactly one population version: its members, the weights its votes were counted with and its vote
rule all those of the version it names (`ensemble.population`, and `x-ensemble-population` on a
non-streamed answer). The scripted-engine version of this, and the unit tests of the snapshot, are in
test_served.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from ensemble_serve.shared.population import read_manifest, write_manifest
from ensemble_serve.testing.servers import copy_embedded, start_server

pytestmark = pytest.mark.engine

ENSEMBLE = "sandbox-ensemble"
REQUESTS = 50
BEFORE, DURING = 20, 10  # sent before the refresh, while it runs; the rest after it is served
STAGGER_S = 0.03  # between two requests of one group
PROBLEMS = ["add 478+365", "sort 52 17 83 4", "add 12+30", "sub 91-17", "sort 9 3 7"]
B_MEMBERS = 4  # the new generation's default member count (top-4 by fitness)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("race")
    population = copy_embedded(root)  # plain: 8 members, no router, no reliability table
    manifest = read_manifest(population)
    # the first population votes weighted too, with other weights: a vote counted with the wrong
    # population's weights shows in the sums (1..8 here, powers of two in the next generation)
    weights = {m.name: float(i + 1) for i, m in enumerate(manifest.members)}
    write_manifest(
        population, manifest.model_copy(update={"voting_weights": weights, "ensemble_defaults": {"vote": "weighted"}})
    )
    srv = start_server(population, root / "server.log", "--no-watch", "--served-model-name", ENSEMBLE)
    yield srv
    srv.kill()


def _expected(manifest: Any) -> dict[str, Any]:
    """What an answer from `manifest` must show: its members, its rule, each member's vote weight."""
    defaults = manifest.ensemble_defaults or {}
    members = [m for m in manifest.members]
    k = defaults.get("members")
    if k is not None:
        top = sorted(members, key=lambda m: -(m.fitness if m.fitness is not None else float("-inf")))[:k]
        members = [m for m in members if m in top]  # manifest order
    weights = manifest.voting_weights if defaults.get("vote") == "weighted" else None
    return {
        "members": [m.name for m in members],
        "rule": defaults.get("vote", "majority"),
        "weight": (lambda name: weights.get(name, 1.0)) if weights else (lambda name: 1.0),
    }


def _check(ens: dict[str, Any], expected: dict[str, Any]) -> None:
    """Members, rule and the vote's weights of one answer, against one population's."""
    assert ens["members"] == expected["members"], ens["members"]
    assert ens["rule"] == expected["rule"]
    assert {c["member"] for c in ens["chains"]} <= set(expected["members"])
    counted: dict[str, float] = {}
    for c in ens["chains"]:
        if c["status"] == "ok":
            counted[c["answer"]] = counted.get(c["answer"], 0.0) + expected["weight"](c["member"])
    assert ens["votes"] == pytest.approx(counted), (ens["votes"], counted)


async def _ask(client: Any, i: int) -> tuple[str | None, dict[str, Any], float]:
    """(x-ensemble-population, the `ensemble` object, when the answer was complete); every 5th streamed."""
    kw = {
        "model": ENSEMBLE,
        "messages": [{"role": "user", "content": PROBLEMS[i % len(PROBLEMS)]}],
        "temperature": 0,
        "max_tokens": 32,
        "extra_body": {"ensemble": {"return_chains": True}},
    }
    if i % 5 == 4:
        ens = None
        async for chunk in await client.chat.completions.create(stream=True, **kw):
            ens = (chunk.model_extra or {}).get("ensemble") or ens
        return None, ens, time.monotonic()
    raw = await client.chat.completions.with_raw_response.create(**kw)
    return raw.headers.get("x-ensemble-population"), raw.parse().model_extra["ensemble"], time.monotonic()


async def _inflight(http: httpx.AsyncClient, url: str) -> float:
    text = (await http.get(url + "/metrics")).text
    line = next(x for x in text.splitlines() if x.startswith("ensemble_engine_requests_inflight "))
    return float(line.rsplit(" ", 1)[1])


def test_every_answer_comes_from_exactly_one_population_version_while_it_is_refreshed(server):
    root = server.population
    first = read_manifest(root)
    second = first.model_copy(
        update={
            "generation": first.generation + 1,
            "voting_weights": {m.name: float(2**i) for i, m in enumerate(first.members)},  # sums name their members
            "ensemble_defaults": {"vote": "weighted", "members": B_MEMBERS},
        }
    )
    models = httpx.get(server.url + "/v1/models", headers=server.headers, timeout=30).json()
    version_a = models["data"][0]["ensemble"]["population"]["version"]

    async def run() -> tuple[list[tuple[str | None, dict[str, Any], float]], str, float]:
        client = server.async_client(timeout=600)
        async with httpx.AsyncClient(headers=server.headers, timeout=120) as http:
            tasks = []
            for i in range(BEFORE):
                tasks.append(asyncio.create_task(_ask(client, i)))
                await asyncio.sleep(STAGGER_S)
            deadline = time.monotonic() + 60
            while await _inflight(http, server.url) == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the refresh must land while chains are generating
            assert not all(t.done() for t in tasks), "every request finished before the refresh"
            write_manifest(root, second)
            reload = asyncio.create_task(http.post(server.url + "/admin/reload"))
            for i in range(BEFORE, BEFORE + DURING):
                tasks.append(asyncio.create_task(_ask(client, i)))
                await asyncio.sleep(STAGGER_S)
            resp = await reload
            reloaded_at = time.monotonic()
            assert resp.status_code == 200, resp.text
            for i in range(BEFORE + DURING, REQUESTS):
                tasks.append(asyncio.create_task(_ask(client, i)))
                await asyncio.sleep(STAGGER_S)
            results = await asyncio.gather(*tasks)
        await client.close()
        return results, resp.json()["version"], reloaded_at

    results, version_b, reloaded_at = asyncio.run(run())
    assert version_b != version_a and version_b.startswith(f"{second.generation}-")
    expected = {version_a: _expected(first), version_b: _expected(second)}
    seen = {version_a: 0, version_b: 0}
    kept_across = 0  # answers from the old population that were still running when the new one was served
    for i, (header, ens, finished_at) in enumerate(results):
        population = ens["population"]
        version = population["version"]
        assert version in expected, population
        assert population["generation"] == int(version.split("-")[0])
        if header is not None:
            assert header == version
        _check(ens, expected[version])
        seen[version] += 1
        kept_across += version == version_a and finished_at > reloaded_at
        if i >= BEFORE + DURING:
            assert version == version_b, i  # sent after the refresh was served
    print(f"answers by population version: {seen}; old-version answers completed after the refresh: {kept_across}")
    assert len(results) == REQUESTS and seen[version_a] >= 1 and seen[version_b] >= REQUESTS - BEFORE - DURING
    assert kept_across >= 1, "no request of the old population was in flight across the refresh"
    assert server.alive()
