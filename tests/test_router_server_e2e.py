"""The router in the real server: routed top-k fan-out, a refused router, and no router at all.

One server on a private copy of the embedded population, with the population watcher on: the
test installs a router (trained here on the real substrate's features), then a router made for
another population, and watches the server pick each up, through the real `openai` client.
Slow: starts vLLM once.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import torch

from ensemble_serve.shared.population import read_manifest, write_manifest
from ensemble_serve.testing.servers import copy_embedded, start_server

pytestmark = pytest.mark.engine

ENSEMBLE = "sandbox-ensemble"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("routed")
    population = copy_embedded(root)
    srv = start_server(population, root / "server.log", "--watch-interval", "0.5", "--served-model-name", ENSEMBLE)
    yield srv
    srv.kill()


def _train_router(population, members: list[str]):
    """A small real router: features of sandbox prompts from the substrate; add/sub prefer the first members."""
    from ensemble_serve.shared.router import RouterFeatures
    from trainer.router.train import RouterTrainConfig, train_router
    from trainer.tasks.sandbox import generate_problems

    problems = generate_problems(24, seed=3, split="train", domains=["add", "sub", "sort", "mod"])
    feats = RouterFeatures(population.parent / "substrate")([p.prompt for p in problems], "hidden_mean")
    quality = torch.zeros(len(problems), len(members))
    for i, p in enumerate(problems):
        quality[i, 0 if p.domain in ("add", "sub") else len(members) - 1] = 1.0
    router, _ = train_router(
        feats, quality, members, "sandbox-substrate", RouterTrainConfig(variant="sigmoid_floor", steps=40)
    )
    return router


def _install(population, router, top_k: int) -> None:
    from ensemble_serve.shared.router import save_router

    save_router(router, population / "router")
    manifest = read_manifest(population)
    write_manifest(population, manifest.model_copy(update={"router": {"path": "router", "top_k": top_k}}))


def _router_status(server) -> str:
    models = httpx.get(server.url + "/v1/models", headers=server.headers, timeout=10).json()["data"]
    return next(m for m in models if m["id"] == ENSEMBLE)["ensemble"]["router"]


def _wait_status(server, predicate, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _router_status(server)
        if predicate(status):
            return status
        time.sleep(0.5)
    raise AssertionError(f"router status stayed {status!r}")


def _ask(client, **ensemble):
    resp = client.chat.completions.create(
        model=ENSEMBLE,
        messages=[{"role": "user", "content": "add 478+365"}],
        temperature=0,
        max_tokens=64,
        extra_body={"ensemble": ensemble} if ensemble else None,
    )
    return resp.model_extra["ensemble"]


def test_router_lifecycle_in_the_server(server):
    client = server.client()
    population = server.population
    names = read_manifest(population).names

    # no router: unrouted, and asking for routing is a clear 400
    assert _router_status(server) == "none"
    info = _ask(client)
    assert "routing" not in info or info["routing"] is None
    assert len(info["members"]) == len(names)
    with pytest.raises(openai.BadRequestError, match="no router"):
        _ask(client, route=True)
    with pytest.raises(openai.BadRequestError, match="mixture"):
        _ask(client, mode="mixture")

    # a router for this population: the fan-out goes to the router's top-k, with gates reported
    _install(population, _train_router(population, names), top_k=3)
    _wait_status(server, lambda s: s == "active")
    info = _ask(client, vote="weighted")
    routing = info["routing"]
    assert routing["used"] is True and routing["top_k"] == 3
    assert set(routing["gates"]) == set(names) and all(0 < g <= 1 for g in routing["gates"].values())
    top3 = sorted(names, key=lambda m: -routing["gates"][m])[:3]
    assert sorted(info["members"]) == sorted(top3)
    assert info["answer"] is not None
    # the request's own member count overrides the router's top_k; a list of names bypasses the router
    assert len(_ask(client, members=2)["members"]) == 2
    explicit = _ask(client, members=["m05", "m06"])
    assert explicit["members"] == ["m05", "m06"] and not explicit.get("routing")
    assert len(_ask(client, route=False)["members"]) == len(names)
    # mixture mode: one adapter whose update is the gate-weighted mix of the routed members, cached per route
    first = _ask(client, mode="mixture")
    mixture = first["routing"]["mixture"]
    assert mixture["adapter"].startswith("mix-") and first["members"] == [mixture["adapter"]]
    assert sorted(mixture["members"]) == sorted(top3) and mixture["cached"] is False
    assert first["answer"] is not None
    again = _ask(client, mode="mixture")
    assert again["routing"]["mixture"] == {**mixture, "cached": True} and again["answer"] == first["answer"]

    # a router trained for another population: refused at load, the ensemble votes unrouted and says so
    other = [*names[:-1], "stranger"]
    _install(population, _train_router(population, other), top_k=2)
    status = _wait_status(server, lambda s: s.startswith("refused"))
    assert "another population" in status
    info = _ask(client)
    assert info["routing"]["used"] is False and "another population" in info["routing"]["reason"]
    assert len(info["members"]) == len(names) and info["answer"] is not None
    with pytest.raises(openai.BadRequestError, match="another population"):
        _ask(client, mode="mixture")
    assert server.alive()
    # the server still answers plain member requests
    resp = client.chat.completions.create(
        model="m00", messages=[{"role": "user", "content": "sort 5 3 9"}], temperature=0, max_tokens=32
    )
    assert resp.choices[0].message.content
