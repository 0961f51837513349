"""One snapshot per request (`ensemble_serve/service/served.py`), with a scripted engine: no vLLM engine starts.

A refresh that lands while a request runs (after it took its snapshot, before it planned, while its
chains run) changes nothing of that request: its members, weights, rule and `ensemble.population`
come from the population it started with, and the next request gets the new one. Also here: the
population's version, the one weight-precedence rule of a plan, `EnsembleOutcome` by keyword, the
version in the body, the header, `/v1/models` and `/admin/reload`, and the `timeout` minimum in the
served document and through the app. The real engine's path is test_population_race_e2e.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_serving import ScriptedBackend, _req

from ensemble_serve.config import ServeConfig
from ensemble_serve.http.app import build_app
from ensemble_serve.http.headers import ensemble_headers
from ensemble_serve.protocol import MIN_TIMEOUT_S, PopulationVersion
from ensemble_serve.service.metrics import Metrics
from ensemble_serve.service.plan import EnsemblePlan
from ensemble_serve.service.served import Served, ServeSettings, population_version
from ensemble_serve.service.service import EnsembleService
from ensemble_serve.service.vote import EnsembleOutcome
from ensemble_serve.shared.population import Population, load_population
from ensemble_serve.testing.servers import plain_embedded

# m00-m04 answer 3, m05-m07 answer 4: a majority says 3; weighing m05-m07 ten times says 4
CHAINS = {f"m0{i}": ("1+2=3\n#### 3" if i < 5 else "1+2=4\n#### 4") for i in range(8)}
HEAVY = {f"m0{i}": (10.0 if i >= 5 else 1.0) for i in range(8)}


def _population() -> Population:
    return load_population(plain_embedded())


def _next(population: Population, **update: Any) -> Population:
    """The same members as a new manifest: generation + 1 and `update` (in memory: nothing is written)."""
    manifest = population.manifest
    return dataclasses.replace(
        population, manifest=manifest.model_copy(update={"generation": manifest.generation + 1, **update})
    )


def _weighted(population: Population) -> Population:
    return _next(population, voting_weights=HEAVY, ensemble_defaults={"vote": "weighted"})


class RefreshingBackend(ScriptedBackend):
    """Runs `on_plan` when the planner asks which members are down, and `on_generate` at the first generation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.on_plan: Any = None
        self.on_generate: Any = None

    def unavailable_members(self) -> list[str]:
        hook, self.on_plan = self.on_plan, None
        if hook is not None:
            hook()
        return []

    async def generate(self, prompt_ids, params, member, request_id):
        hook, self.on_generate = self.on_generate, None
        if hook is not None:
            hook()
        async for out in super().generate(prompt_ids, params, member, request_id):
            yield out


# ---------------------------------------------------------------- the snapshot


def test_a_refresh_during_a_request_changes_nothing_of_it_and_the_next_request_sees_it() -> None:
    backend = RefreshingBackend(dict(CHAINS))
    first = _population()
    service = EnsembleService(backend, first, ServeSettings(ensemble_name="ens"), Metrics())
    old = service.served
    second, third = _weighted(first), _next(_weighted(first), ensemble_defaults={"vote": "weighted", "members": 2})
    backend.on_plan = lambda: service.set_population(second)  # after the request's snapshot, before its plan
    backend.on_generate = lambda: service.set_population(third)  # while its chains run, before the vote
    resp = asyncio.run(service.chat(_req(return_chains=True)))
    ens = resp.ensemble
    assert service.served.version == population_version(third) != old.version  # both refreshes landed
    assert ens.population == PopulationVersion(generation=first.manifest.generation, version=old.version)
    assert ens.rule == "majority" and ens.members == first.names and ens.answer == "3"
    assert ens.votes == {"3": 5.0, "4": 3.0}  # one vote per chain: the first population's (no) weights

    after = asyncio.run(service.chat(_req(return_chains=True))).ensemble
    assert after.population.version == population_version(third) and after.population.generation == 2
    assert after.rule == "weighted" and len(after.members) == 2  # third's defaults: weighted, two members
    assert after.votes == {a: sum(HEAVY[c.member] for c in after.chains if c.answer == a) for a in after.votes}


def test_a_refresh_is_one_assignment_and_a_refused_one_keeps_the_old_snapshot() -> None:
    class Refusing(ScriptedBackend):
        def set_population(self, population) -> None:
            raise ValueError("the base model changed")

    first = _population()
    service = EnsembleService(Refusing(dict(CHAINS)), first, ServeSettings(ensemble_name="ens"), Metrics())
    before = service.served
    with pytest.raises(ValueError, match="base model changed"):
        service.set_population(_weighted(first))
    assert service.served is before
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.population = first  # type: ignore[misc]


def test_the_version_names_the_manifest_s_content_and_generation() -> None:
    first = _population()
    version = population_version(first)
    assert re.fullmatch(rf"{first.manifest.generation}-[0-9a-f]{{12}}", version)
    assert population_version(_population()) == version  # the same manifest read again
    same_generation = dataclasses.replace(
        first, manifest=first.manifest.model_copy(update={"ensemble_defaults": {"vote": "weighted"}})
    )
    assert population_version(same_generation) != version  # new defaults: a new version
    assert population_version(same_generation).split("-")[0] == version.split("-")[0]
    served = Served.load(_weighted(first), ServeSettings(ensemble_name="ens"))
    assert served.about == PopulationVersion(generation=first.manifest.generation + 1, version=served.version)
    assert served.member_weights() == HEAVY and served.options(None).vote == "weighted"


# ---------------------------------------------------------------- one weight-precedence rule


def _plan(**weights: Any) -> EnsemblePlan:
    population = PopulationVersion(generation=0, version="0-000000000000")
    return EnsemblePlan(prompt_ids=[1], params=None, members=["a", "b"], population=population, **weights)


def test_the_vote_counts_with_the_first_weights_there_reliability_then_gates_then_the_population_s() -> None:
    reliability, gates, population = {"a": 3.0}, {"a": 0.25, "b": 0.75}, {"a": 0.5, "b": 0.1}
    assert _plan(reliability=reliability, gates=gates, population_weights=population).vote_weights == reliability
    assert _plan(gates=gates, population_weights=population).vote_weights == gates
    assert _plan(population_weights=population).vote_weights == population
    assert _plan().vote_weights == {}  # nothing weighs: every chain counts 1
    # a calibrated vote without a usable table counts every chain the same, whatever else there is
    assert _plan(reliability={}, gates=gates, population_weights=population).vote_weights == {}


def test_adaptive_trust_reads_the_same_order_but_skips_a_source_that_says_nothing() -> None:
    reliability, gates, population = {"a": 3.0}, {"a": 0.25, "b": 0.75}, {"a": 0.5, "b": 0.1}
    assert _plan(reliability=reliability, gates=gates, population_weights=population).trust == reliability
    assert _plan(gates=gates, population_weights=population).trust == gates
    assert _plan(reliability={}, gates=gates, population_weights=population).trust == gates
    assert _plan(reliability={}, population_weights=population).trust == population
    assert _plan(reliability={}).trust == {}


def test_an_outcome_is_built_by_keyword_only() -> None:
    with pytest.raises(TypeError):
        EnsembleOutcome([], [], [], None, None)  # type: ignore[misc]


# ---------------------------------------------------------------- through the app


def _app_client(backend: ScriptedBackend) -> TestClient:
    cfg = ServeConfig(population=plain_embedded(), served_model_name="ens", watch=False)
    return TestClient(build_app(cfg, backend_factory=lambda _cfg, _pop: backend), raise_server_exceptions=False)


ASK = {"model": "ens", "messages": [{"role": "user", "content": "add 1+2"}], "max_tokens": 32}


def test_the_answer_names_its_population_in_the_body_the_header_and_the_model_list() -> None:
    with _app_client(ScriptedBackend(dict(CHAINS))) as client:
        resp = client.post("/v1/chat/completions", json=ASK)
        assert resp.status_code == 200, resp.text
        population = resp.json()["ensemble"]["population"]
        version = population_version(_population())
        assert population == {"generation": _population().manifest.generation, "version": version}
        assert resp.headers["x-ensemble-population"] == version
        card = client.get("/v1/models").json()["data"][0]
        assert card["ensemble"]["population"] == population
        reload = client.post("/admin/reload")
        assert reload.status_code == 200 and reload.json()["version"] == version  # nothing changed on disk
        doc = client.get("/openapi.json").json()
    info = doc["components"]["schemas"]["EnsembleInfo"]["properties"]["population"]
    assert "PopulationVersion" in str(info)
    ok = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]
    assert "x-ensemble-population" in ok["headers"]


def test_a_header_only_when_the_body_names_a_population() -> None:
    from test_headers import _chat

    from ensemble_serve.protocol import EnsembleInfo

    assert "x-ensemble-population" not in ensemble_headers(_chat(EnsembleInfo(answer="1", members=["a"])))
    named = EnsembleInfo(answer="1", members=["a"], population=PopulationVersion(generation=3, version="3-abc"))
    assert ensemble_headers(_chat(named))["x-ensemble-population"] == "3-abc"


# ---------------------------------------------------------------- the timeout's minimum


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_a_timeout_below_the_minimum_is_a_400_before_any_work_and_the_document_states_it(route: str) -> None:
    backend = RefreshingBackend(dict(CHAINS))
    calls: list[str] = []
    backend.on_plan = lambda: calls.append("planned")
    body = dict(ASK) if route.endswith("chat/completions") else {"model": "ens", "prompt": "add 1+2", "max_tokens": 8}
    with _app_client(backend) as client:
        resp = client.post(route, json={**body, "timeout": 5e-324})  # the fuzzing's finding: was a 504
        doc = client.get("/openapi.json").json()
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "timeout" and error["type"] == "invalid_request_error"
    assert error["message"] == f"timeout: Input should be greater than or equal to {MIN_TIMEOUT_S:g} (got 5e-324)"
    assert calls == []  # refused at validation: nothing planned, nothing generated
    name = "ChatCompletionRequest" if route.endswith("chat/completions") else "CompletionRequest"
    timeout = doc["components"]["schemas"][name]["properties"]["timeout"]
    number = next(alt for alt in timeout["anyOf"] if alt.get("type") == "number")
    assert number["minimum"] == MIN_TIMEOUT_S and "exclusiveMinimum" not in number
    assert "504" in timeout["description"]
    assert "at its deadline" in doc["paths"][route]["post"]["responses"]["504"]["description"]
