"""EnsembleService logic with a scripted backend (the real path is covered by test_server_e2e.py).

The backend here replays fixed chains per member, so the fan-out, failure handling, early stop
and response assembly can be checked exactly, including a member whose generation raises.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

import pytest
from transformers import AutoTokenizer

from ensemble_serve.engine.base import Engine
from ensemble_serve.errors import BadRequestError, NotFoundError, ServiceUnavailableError
from ensemble_serve.protocol import ChatCompletionRequest
from ensemble_serve.service.metrics import Metrics
from ensemble_serve.service.service import EnsembleService, ServeSettings
from ensemble_serve.shared.embedded import EMBEDDED_SUBSTRATE
from ensemble_serve.shared.population import load_population
from ensemble_serve.testing.servers import plain_embedded


@dataclass
class Out:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cumulative_logprob: float | None = -1.0
    logprobs: list | None = None


@dataclass
class RequestOut:
    outputs: list[Out]


@dataclass
class ScriptedBackend:
    """Each member answers with a fixed chain, one token per step; `fail` members raise; `slow` ones lag."""

    chains: dict[str, str]
    fail: set[str] = field(default_factory=set)
    slow: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)
    max_model_len: int = 256

    def __post_init__(self):
        self.tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_SUBSTRATE))
        self._n = 0

    def next_id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-{self._n}"

    def set_population(self, population) -> None:
        pass

    def unavailable_members(self) -> list[str]:
        return []

    errored = False

    def health(self) -> dict:
        return {}

    def inflight(self) -> int:
        return 0

    async def warm(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    async def generate(self, prompt_ids, params, member, request_id):
        if member in self.fail:
            raise RuntimeError(f"adapter {member} could not be loaded")
        text = self.chains[member]
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        try:
            for k in range(1, len(ids) + 1):
                await asyncio.sleep(0.02 if member in self.slow else 0.001)
                done = k == len(ids)
                yield RequestOut(
                    [Out(i, self.tokenizer.decode(ids[:k]), ids[:k], "stop" if done else None) for i in range(params.n)]
                )
        except asyncio.CancelledError:
            self.aborted.append(member)
            raise

    async def score(self, prompt_ids, continuations, member):
        return [-float(len(c)) for c in continuations]


def _service(backend: ScriptedBackend) -> EnsembleService:
    assert isinstance(backend, Engine)  # the whole interface the service uses
    population = load_population(plain_embedded())
    return EnsembleService(backend, population, ServeSettings(ensemble_name="ens"), Metrics())


def _req(**ensemble) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "ens", "messages": [{"role": "user", "content": "add 1+2"}], "max_tokens": 32, "ensemble": ensemble}
    )


ANSWERS = {f"m0{i}": "1+2=3\n#### 3" for i in range(8)}


def test_a_failing_member_is_excluded_and_reported():
    chains = dict(ANSWERS, m06="1+2=4\n#### 4")
    backend = ScriptedBackend(chains, fail={"m02"})
    resp = asyncio.run(_service(backend).chat(_req(return_chains=True)))
    ens = resp.ensemble
    assert ens.answer == "3" and ens.votes == {"3": 6.0, "4": 1.0}
    assert [(f.member, f.sample) for f in ens.failed] == [("m02", 0)]
    assert "could not be loaded" in ens.failed[0].reason
    assert resp.choices[0].message.content == "1+2=3\n#### 3"
    tokens = len("1+2=3\n#### 3")
    assert resp.usage.completion_tokens == 7 * tokens  # the failed member generated nothing


def test_every_member_failing_is_a_503_not_an_answer():
    backend = ScriptedBackend(ANSWERS, fail=set(ANSWERS))
    with pytest.raises(ServiceUnavailableError, match="every member failed"):
        asyncio.run(_service(backend).chat(_req()))


def test_early_stop_aborts_the_chains_that_cannot_change_the_vote():
    backend = ScriptedBackend(ANSWERS, slow={"m05", "m06", "m07"})
    resp = asyncio.run(_service(backend).chat(_req(early_stop=True, return_chains=True)))
    ens = resp.ensemble
    assert ens.answer == "3" and ens.early_stopped
    assert sorted(backend.aborted) == ["m05", "m06", "m07"]  # 5 of 8 agreeing settles it
    assert sorted(f.member for f in ens.failed) == ["m05", "m06", "m07"]
    assert all(f.reason == "stopped early" for f in ens.failed)
    full = len("1+2=3\n#### 3")
    stopped_tokens = sum(c.tokens for c in ens.chains if c.member in {"m05", "m06", "m07"})
    assert resp.usage.completion_tokens == 5 * full + stopped_tokens
    assert ens.tokens_saved == 3 * full - stopped_tokens


def test_member_selection_by_name_count_and_errors():
    backend = ScriptedBackend(ANSWERS)
    service = _service(backend)
    resp = asyncio.run(service.chat(_req(members=["m03", "m01"])))
    assert resp.ensemble.members == ["m03", "m01"]
    top = asyncio.run(service.chat(_req(members=2)))
    fitness = {m.name: m.fitness for m in service.population.manifest.members}
    best_two = sorted(fitness, key=lambda n: -fitness[n])[:2]
    assert sorted(top.ensemble.members) == sorted(best_two)
    with pytest.raises(NotFoundError, match="ghost"):
        asyncio.run(service.chat(_req(members=["m00", "ghost"])))
    with pytest.raises(BadRequestError, match="has 8 members"):
        asyncio.run(service.chat(_req(members=9)))
    with pytest.raises(NotFoundError, match="does not exist"):
        asyncio.run(
            service.chat(
                ChatCompletionRequest.model_validate({"model": "nope", "messages": [{"role": "user", "content": "x"}]})
            )
        )


def test_cross_vote_uses_the_jury_scores():
    # m00-m04 say 3 with a long chain, m05-m07 say 4 with a short one; jurors prefer shorter chains here
    chains = {f"m0{i}": "1+2=3, so the sum is\n#### 3" for i in range(5)}
    chains.update({f"m0{i}": "#### 4" for i in range(5, 8)})
    resp = asyncio.run(_service(ScriptedBackend(chains)).chat(_req(vote="cross")))
    assert resp.ensemble.answer == "4" and resp.ensemble.rule == "cross"
    assert sum(resp.ensemble.votes.values()) == pytest.approx(1.0)
    majority = asyncio.run(_service(ScriptedBackend(chains)).chat(_req(vote="majority")))
    assert majority.ensemble.answer == "3"


class _FixedGates:
    """A stand-in router state: fixed gates per member (or NaN ones), as `Routing.gates` returns them."""

    def __init__(self, gates: dict[str, float]):
        self.status, self.router, self.top_k, self._gates = "active", object(), 3, gates

    def gates(self, prompt: str):
        import math

        if any(math.isnan(g) for g in self._gates.values()):
            return None, "gates are NaN"
        return dict(self._gates), None


def test_routing_picks_top_k_and_weights_the_vote_by_gates():
    # m00-m01 (high gates) say 4; m02-m07 say 3: routed top-3 + gate-weighted vote picks 4
    chains = dict(ANSWERS, m00="1+2=4\n#### 4", m01="1+2=4\n#### 4")
    service = _service(ScriptedBackend(chains))
    gates = {f"m0{i}": 0.1 for i in range(8)} | {"m00": 0.9, "m01": 0.8, "m05": 0.3}
    service.served = replace(service.served, routing=_FixedGates(gates))
    resp = asyncio.run(service.chat(_req(vote="weighted")))
    ens = resp.ensemble
    assert ens.members == ["m00", "m01", "m05"] and ens.routing["used"] is True and ens.routing["top_k"] == 3
    assert ens.answer == "4" and ens.votes["4"] == pytest.approx((0.9 + 0.8) / 2.0)
    # unrouted, the same chains vote 3
    assert asyncio.run(service.chat(_req(vote="weighted", route=False))).ensemble.answer == "3"


def test_unusable_gates_fall_back_to_unrouted_voting_and_say_so():
    service = _service(ScriptedBackend(ANSWERS))
    service.served = replace(service.served, routing=_FixedGates({f"m0{i}": float("nan") for i in range(8)}))
    resp = asyncio.run(service.chat(_req()))
    assert resp.ensemble.routing["used"] is False and "NaN" in resp.ensemble.routing["reason"]
    assert len(resp.ensemble.members) == 8 and resp.ensemble.answer == "3"
    assert service.metrics.route_fallbacks._value.get() == 1


def test_mixture_mode_needs_a_router_and_the_in_process_engine():
    service = _service(ScriptedBackend(ANSWERS))
    with pytest.raises(BadRequestError, match="needs the population's router"):
        asyncio.run(service.chat(_req(mode="mixture")))
    service.served = replace(service.served, routing=_FixedGates({f"m0{i}": 0.5 for i in range(8)}))
    with pytest.raises(BadRequestError, match="in-process engine"):  # the scripted backend cannot load adapters
        asyncio.run(service.chat(_req(mode="mixture")))


@dataclass
class _MixingBackend(ScriptedBackend):
    """A scripted backend that accepts mixed adapters, as the in-process engine does, and records them."""

    registered: list = field(default_factory=list)
    max_lora_rank: int = 64

    def register_extra(self, name, folder, keep=None):
        self.registered.append((name, keep))
        self.chains.setdefault(name, "1+2=3\n#### 3")


def test_mixture_cache_size_comes_from_the_settings_and_bounds_the_registered_adapters():
    backend = _MixingBackend(dict(ANSWERS))
    population = load_population(plain_embedded())
    service = EnsembleService(backend, population, ServeSettings(ensemble_name="ens", mixture_cache=2), Metrics())
    try:
        names = []
        for top in ("m00", "m01", "m02", "m00"):
            service.served = replace(
                service.served, routing=_FixedGates({f"m0{i}": 0.1 for i in range(8)} | {top: 0.9})
            )
            resp = asyncio.run(service.chat(_req(mode="mixture")))
            names.append(resp.ensemble.routing["mixture"]["adapter"])
        assert service.mixtures.cache.capacity == 2 and len(service.mixtures.cache) == 2
        assert len(set(names[:3])) == 3  # three distinct routes, three mixed adapters
        assert names[3] == names[0]  # the same gates again: the same route name
        # m00's route was evicted by the time it came back (capacity 2), so it was mixed again
        assert resp.ensemble.routing["mixture"]["cached"] is False
        assert all(keep == 4 for _, keep in backend.registered)  # twice the cache stays registered
    finally:
        service.close()
