"""Adaptive fan-out: the stopping rule (pure), the waves on a scripted engine, and the bad input.

The real engine's path is in test_server_e2e.py::test_adaptive_fan_out_end_to_end.
"""

from __future__ import annotations

import asyncio
import math

import pytest
from test_serving import ANSWERS, ScriptedBackend, _req, _service

from ensemble_serve.errors import BadRequestError
from ensemble_serve.protocol import ChatCompletionRequest
from ensemble_serve.shared.voting.adaptive import leader_probability, stop_reason, wave_order, waves

# ---------------------------------------------------------------- the rule


def test_leader_probability_is_the_beta_posterior_of_the_top_two() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    for v1, v2 in [(1, 0), (2, 0), (3, 0), (4, 0), (3, 1), (5, 2), (7, 7), (12, 3)]:
        expected = scipy_stats.beta.sf(0.5, v1 + 1, v2 + 1)  # P(p > 1/2), p ~ Beta(v1 + 1, v2 + 1)
        assert leader_probability(v1, v2) == pytest.approx(expected, abs=1e-12)
    assert leader_probability(4, 4) == 0.5
    assert [leader_probability(k, 0) for k in (2, 3, 4)] == [0.875, 0.9375, 31 / 32]
    with pytest.raises(ValueError):
        leader_probability(1, 2)


def test_stop_reasons() -> None:
    assert stop_reason([4], remaining=4, confidence=0.95) == ("confident", 31 / 32)
    assert stop_reason([3], remaining=5, confidence=0.95)[0] is None  # 0.9375 < 0.95
    assert stop_reason([3], remaining=5, confidence=0.9)[0] == "confident"
    assert stop_reason([3, 1], remaining=1, confidence=0.99)[0] == "decided"  # 1 more chain cannot catch up
    assert stop_reason([2, 2], remaining=0, confidence=0.9)[0] == "exhausted"
    assert stop_reason([], remaining=4, confidence=0.9)[0] is None  # no answer yet: go on
    assert stop_reason([0, 0], remaining=0, confidence=0.9)[0] == "exhausted"
    for bad in (0, 1, 1.5, -0.1, math.nan):
        with pytest.raises(ValueError):
            stop_reason([1], 1, bad)


def test_waves_go_to_the_most_trusted_first_one_chain_each_before_a_second() -> None:
    order = wave_order(["a", "b", "c"], 2, {"b": 0.9, "c": 0.5, "a": 0.1})
    assert order == [("b", 0), ("c", 0), ("a", 0), ("b", 1), ("c", 1), ("a", 1)]
    assert wave_order(["a", "b"], 1, {}) == [("a", 0), ("b", 0)]  # no trust: the given order
    assert (waves(8, None), waves(3, None), waves(1, None), waves(8, 3)) == (4, 2, 1, 3)


# ---------------------------------------------------------------- the waves on a scripted engine


class RecordingBackend(ScriptedBackend):
    def __post_init__(self):
        super().__post_init__()
        self.calls: list[tuple[str, int, int | None]] = []

    async def generate(self, prompt_ids, params, member, request_id):
        self.calls.append((member, params.n, params.seed))
        async for out in super().generate(prompt_ids, params, member, request_id):
            yield out


def test_agreeing_members_stop_after_the_first_wave() -> None:
    backend = RecordingBackend(ANSWERS)
    resp = asyncio.run(_service(backend).chat(_req(adaptive={"confidence": 0.95}, return_chains=True)))
    ens = resp.ensemble
    assert ens.answer == "3" and ens.agreement == 1.0
    assert ens.adaptive["waves"] == 1 and ens.adaptive["chains"] == 4 and ens.adaptive["full_chains"] == 8
    assert ens.adaptive["stopped"] == "confident" and ens.adaptive["leader_probability"] == pytest.approx(31 / 32)
    full = len(backend.tokenizer.encode("1+2=3\n#### 3", add_special_tokens=False))
    assert ens.adaptive["tokens_saved"] == 4 * full and resp.usage.completion_tokens == 4 * full
    assert len(ens.members) == 4 and len(ens.chains) == 4 and len(backend.calls) == 4
    # the four members asked are the four most trusted (fitness: no router, no reliability here)
    service = _service(backend)
    fitness = {m.name: m.fitness for m in service.population.manifest.members}
    assert sorted(ens.members) == sorted(sorted(fitness, key=lambda n: -fitness[n])[:4])


def test_disagreement_samples_the_next_wave_and_votes_on_every_chain_sampled() -> None:
    chains = dict(ANSWERS)
    for m in ("m00", "m02", "m04", "m06"):
        chains[m] = "1+2=4\n#### 4"
    backend = RecordingBackend(chains)
    resp = asyncio.run(_service(backend).chat(_req(adaptive={"confidence": 0.99, "wave_size": 2})))
    ens = resp.ensemble
    assert ens.adaptive["waves"] == 4 and ens.adaptive["stopped"] == "exhausted" and ens.adaptive["chains"] == 8
    assert sum(ens.votes.values()) == 8 and ens.adaptive["tokens_saved"] == 0


def test_samples_of_a_member_in_later_waves_get_another_seed() -> None:
    backend = RecordingBackend({m: "#### 3" for m in ANSWERS})
    req = ChatCompletionRequest.model_validate(
        {
            "model": "ens",
            "messages": [{"role": "user", "content": "add 1+2"}],
            "temperature": 0.7,
            "seed": 11,
            "ensemble": {"members": ["m00", "m01"], "samples_per_member": 3, "adaptive": {"wave_size": 2}},
        }
    )
    resp = asyncio.run(_service(backend).chat(req))
    assert resp.ensemble.adaptive["waves"] == 2  # 2 agree: 0.875 < 0.95; 4 agree: 0.97
    assert sorted(backend.calls) == [("m00", 1, 11), ("m00", 1, 12), ("m01", 1, 11), ("m01", 1, 12)]


def test_a_member_that_fails_is_left_out_of_the_next_waves() -> None:
    chains = dict(ANSWERS, m01="#### 5", m02="#### 6")
    backend = RecordingBackend(chains, fail={"m00"})
    req = _req(
        members=["m00", "m01", "m02", "m03"], samples_per_member=2, adaptive={"wave_size": 4, "confidence": 0.99}
    )
    req = req.model_copy(update={"temperature": 0.7})
    resp = asyncio.run(_service(backend).chat(req))
    ens = resp.ensemble
    assert [c for c in backend.calls if c[0] == "m00"] == [("m00", 1, None)]  # asked once, never again
    assert ens.adaptive["waves"] == 2 and ens.adaptive["chains"] == 7
    assert [(f.member, f.sample) for f in ens.failed] == [("m00", 0)]


def test_the_client_leaving_aborts_the_wave_in_flight() -> None:
    backend = RecordingBackend(ANSWERS, slow=set(ANSWERS))

    async def leave() -> None:
        task = asyncio.create_task(_service(backend).chat(_req(adaptive=True)))
        for _ in range(1000):  # until the first wave is in flight (planning runs in threads first)
            if len(backend.calls) == 4:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave())
    assert len(backend.aborted) == 4  # the first wave's four engine requests


@pytest.mark.parametrize("vote", ["majority", "weighted", "cross", "calibrated"])
def test_every_vote_rule_runs_on_the_chains_sampled(vote: str) -> None:
    chains = dict(ANSWERS, m03="1+2=4\n#### 4")
    resp = asyncio.run(_service(RecordingBackend(chains)).chat(_req(vote=vote, adaptive={"wave_size": 3})))
    ens = resp.ensemble
    assert ens.answer == "3" and ens.rule.startswith(vote) and ens.adaptive["chains"] < 8  # no table: ->majority


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("adaptive", "extra", "words"),
    [
        ({"confidence": 0}, {}, "confidence"),
        ({"confidence": 1}, {}, "confidence"),
        ({"confidence": 1.5}, {}, "confidence"),
        ({"wave_size": 0}, {}, "wave_size"),
        ({"wave_sise": 2}, {}, "unknown adaptive option 'wave_sise'"),
        ("yes", {}, "adaptive"),
        (True, {"early_stop": True}, "adaptive and early_stop cannot be combined"),
        (True, {"mode": "mixture"}, "adaptive needs mode 'vote'"),
    ],
)
def test_bad_adaptive_options_are_refused(adaptive, extra: dict, words: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=words):
        _req(adaptive=adaptive, **extra)


def test_a_wave_larger_than_the_fan_out_is_a_400() -> None:
    with pytest.raises(BadRequestError, match=r"wave_size=9 but the fan-out has 8 chains"):
        asyncio.run(_service(ScriptedBackend(ANSWERS)).chat(_req(adaptive={"wave_size": 9})))
    resp = asyncio.run(_service(ScriptedBackend(ANSWERS)).chat(_req(adaptive={"wave_size": 8})))
    assert resp.ensemble.adaptive["waves"] == 1


def test_the_document_states_the_adaptive_options_and_what_they_exclude() -> None:
    from test_api_guard import _client

    client, _, _ = _client("raise")
    with client:
        options = client.get("/openapi.json").json()["components"]["schemas"]["EnsembleOptions"]
    adaptive = options["properties"]["adaptive"]["anyOf"]
    assert {"type": "boolean"} in adaptive and {"type": "null"} in adaptive
    (obj,) = [a for a in adaptive if a.get("type") == "object"]
    assert obj["properties"]["confidence"] == {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}
    assert obj["additionalProperties"] is False
    rule = next(r for r in options["allOf"] if "adaptive" in str(r.get("if")))
    assert rule["then"]["properties"]["early_stop"] == {"not": {"const": True}}
