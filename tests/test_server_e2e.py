"""End to end: the real server (`ensemble-serve up`, real vLLM CPU engine, embedded ensemble)
driven with the real `openai` client over loopback."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from ensemble_serve.testing.servers import start_server

pytestmark = pytest.mark.engine

PROBLEM = "add 478+365"  # answer 843


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from ensemble_serve.testing.servers import copy_embedded

    root = tmp_path_factory.mktemp("served")
    population = copy_embedded(root)
    srv = start_server(
        population, root / "server.log", "--watch-interval", "0.5", "--served-model-name", "sandbox-ensemble"
    )
    yield srv
    srv.kill()


@pytest.fixture()
def client(server):
    return server.client()


def _ensemble(resp) -> dict:
    return resp.model_extra["ensemble"]


# ---------------------------------------------------------------- models


def test_models_lists_ensemble_base_and_members(client):
    models = {m.id: m for m in client.models.list().data}
    assert {"sandbox-ensemble", "sandbox-substrate"} <= set(models)
    members = [m for m in models.values() if getattr(m, "parent", None) == "sandbox-substrate"]
    assert sorted(m.id for m in members) == [f"m0{i}" for i in range(8)]
    assert models["sandbox-ensemble"].model_extra["ensemble"]["members"] == [f"m0{i}" for i in range(8)]


# ---------------------------------------------------------------- one member = a plain vLLM LoRA model


def test_member_chat_greedy(client):
    resp = client.chat.completions.create(
        model="m00", messages=[{"role": "user", "content": PROBLEM}], temperature=0, max_tokens=64
    )
    text = resp.choices[0].message.content
    assert "#### " in text
    assert resp.choices[0].finish_reason == "stop"
    # <|user|> PROBLEM \n <|assistant|>: each role marker is one token, each character one token
    assert resp.usage.prompt_tokens == 1 + len(PROBLEM) + 1 + 1
    assert 0 < resp.usage.completion_tokens <= 64
    assert resp.model_extra.get("ensemble") is None


def test_member_sampling_n_and_stop_and_max_tokens(client):
    resp = client.chat.completions.create(
        model="m03",
        messages=[{"role": "user", "content": "sort 52 17 83 4"}],
        temperature=1.0,
        n=3,
        max_tokens=64,
        seed=1,
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    short = client.chat.completions.create(
        model="m03", messages=[{"role": "user", "content": PROBLEM}], temperature=0, max_tokens=3
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    stopped = client.chat.completions.create(
        model="m03", messages=[{"role": "user", "content": PROBLEM}], temperature=0, max_tokens=64, stop=["="]
    )
    assert "=" not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"


def test_member_streaming_matches_non_streaming(client):
    kw = dict(model="m01", messages=[{"role": "user", "content": "sub 603-278"}], temperature=0, max_tokens=64)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == full and finish == "stop"
    assert usage is not None and usage.completion_tokens > 0


def test_member_logprobs(client):
    resp = client.chat.completions.create(
        model="m02",
        messages=[{"role": "user", "content": PROBLEM}],
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=2,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)


def test_member_completions_with_raw_prompt(client):
    prompt = f"<|user|>{PROBLEM}\n<|assistant|>"
    resp = client.completions.create(model="m00", prompt=prompt, temperature=0, max_tokens=64)
    chat = client.chat.completions.create(
        model="m00", messages=[{"role": "user", "content": PROBLEM}], temperature=0, max_tokens=64
    )
    assert resp.choices[0].text == chat.choices[0].message.content
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="m00", prompt=prompt, temperature=0, max_tokens=64, stream=True)
        if c.choices
    )
    assert streamed == resp.choices[0].text


def test_base_model_is_served_without_adapter(client):
    resp = client.chat.completions.create(
        model="sandbox-substrate", messages=[{"role": "user", "content": PROBLEM}], temperature=0, max_tokens=64
    )
    assert resp.choices[0].message.content


# ---------------------------------------------------------------- the ensemble


@pytest.mark.parametrize("vote", ["majority", "weighted", "cross"])
def test_ensemble_votes_and_returns_consensus_chain(client, vote):
    resp = client.chat.completions.create(
        model="sandbox-ensemble",
        messages=[{"role": "user", "content": "calc (3+4)*5-6"}],
        temperature=0.8,
        max_tokens=64,
        seed=3,
        extra_body={"ensemble": {"vote": vote, "return_chains": True}},
    )
    ens = _ensemble(resp)
    assert ens["rule"].startswith(vote)
    assert ens["members"] == [f"m0{i}" for i in range(8)]
    chains = ens["chains"]
    assert len(chains) == 8 and {c["member"] for c in chains} == set(ens["members"])
    # usage counts every generated token of every chain
    assert resp.usage.completion_tokens == sum(c["tokens"] for c in chains)
    valid = [c for c in chains if c["status"] == "ok"]
    if ens["answer"] is not None:
        # the returned text is a chain that carries the consensus answer
        assert resp.choices[0].message.content in [c["text"] for c in valid if c["answer"] == ens["answer"]]
        assert 0 < ens["agreement"] <= 1
        assert ens["answer"] in ens["votes"]
    if vote == "cross" and len(ens["votes"]) > 1:
        assert sum(ens["votes"].values()) == pytest.approx(1.0, abs=1e-6)
    if vote == "majority":
        assert sum(ens["votes"].values()) == len(valid)


def test_ensemble_subset_and_samples_per_member(client):
    resp = client.chat.completions.create(
        model="sandbox-ensemble",
        messages=[{"role": "user", "content": PROBLEM}],
        temperature=1.0,
        max_tokens=64,
        extra_body={"ensemble": {"members": ["m01", "m05"], "samples_per_member": 3, "return_chains": True}},
    )
    ens = _ensemble(resp)
    assert ens["members"] == ["m01", "m05"]
    assert sorted((c["member"], c["sample"]) for c in ens["chains"]) == [
        (m, s) for m in ("m01", "m05") for s in range(3)
    ]
    top = client.chat.completions.create(
        model="sandbox-ensemble",
        messages=[{"role": "user", "content": PROBLEM}],
        temperature=0,
        max_tokens=64,
        extra_body={"ensemble": {"members": 3}},
    )
    assert len(_ensemble(top)["members"]) == 3


def test_ensemble_streaming_carries_the_same_answer(client):
    kw = dict(
        model="sandbox-ensemble",
        messages=[{"role": "user", "content": "sort 52 17 83 4"}],
        temperature=0,
        max_tokens=64,
    )
    full = client.chat.completions.create(**kw)
    pieces, ens, usage = [], None, None
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        extra = (chunk.model_extra or {}).get("ensemble")
        ens = extra or ens
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
    assert "".join(pieces) == full.choices[0].message.content
    assert ens["answer"] == _ensemble(full)["answer"]
    assert usage.completion_tokens == full.usage.completion_tokens


def test_ensemble_text_completions(client):
    resp = client.completions.create(
        model="sandbox-ensemble",
        prompt=f"<|user|>{PROBLEM}\n<|assistant|>",
        temperature=0,
        max_tokens=64,
        extra_body={"ensemble": {"answer": "number"}},
    )
    ens = _ensemble(resp)
    assert ens["answer"] is None or ens["answer"].isdigit()
    assert resp.choices[0].text


def test_ensemble_early_stop_never_costs_more(client):
    kw = dict(
        model="sandbox-ensemble", messages=[{"role": "user", "content": "add 12+34"}], temperature=0, max_tokens=64
    )
    # greedy chains are the same in both runs, so stopping early must not change the answer
    full = client.chat.completions.create(**kw, extra_body={"ensemble": {"return_chains": True}})
    early = client.chat.completions.create(**kw, extra_body={"ensemble": {"early_stop": True, "return_chains": True}})
    e = _ensemble(early)
    assert e["answer"] == _ensemble(full)["answer"]
    assert early.usage.completion_tokens <= full.usage.completion_tokens
    if e["early_stopped"]:
        assert e["tokens_saved"] >= 0 and all(f["reason"] == "stopped early" for f in e["failed"])


# ---------------------------------------------------------------- bad input: OpenAI error shape, server keeps serving


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def test_bad_requests_get_openai_errors(server):
    url, h = server.url, server.headers
    chat = url + "/v1/chat/completions"
    msg = [{"role": "user", "content": PROBLEM}]
    assert (
        _error(httpx.post(chat, headers=h, json={"model": "nope", "messages": msg}), 404)["code"] == "model_not_found"
    )
    assert (
        _error(
            httpx.post(
                chat,
                headers=h,
                json={"model": "sandbox-ensemble", "messages": msg, "ensemble": {"members": ["m00", "ghost"]}},
            ),
            404,
        )["param"]
        == "ensemble.members"
    )
    _error(httpx.post(chat, headers={**h, "content-type": "application/json"}, content=b'{"model": '), 400)
    assert _error(httpx.post(chat, headers=h, json={"model": "m00", "messages": "hi"}), 400)["param"] == "messages"
    for field, value in [
        ("max_tokens", -5),
        ("max_tokens", 10**9),
        ("n", 0),
        ("n", 10**6),
        ("temperature", -1),
        ("temperature", "hot"),
    ]:
        _error(httpx.post(chat, headers=h, json={"model": "m00", "messages": msg, field: value}), 400)
    for ens in [
        {"samples_per_member": 0},
        {"samples_per_member": 10**4},
        {"vote": "loudest"},
        {"answer": "poem"},
        {"members": []},
        {"answer": {"regex": "("}},
        {"members": 99},
    ]:
        err = _error(
            httpx.post(chat, headers=h, json={"model": "sandbox-ensemble", "messages": msg, "ensemble": ens}), 400
        )
        assert err["param"].startswith("ensemble")
    long_prompt = [{"role": "user", "content": "add " + "1" * 400}]
    assert (
        _error(httpx.post(chat, headers=h, json={"model": "m00", "messages": long_prompt}), 400)["code"]
        == "context_length_exceeded"
    )
    _error(httpx.post(chat, headers=h, json={"model": "sandbox-ensemble", "messages": msg, "n": 2}), 400)
    greedy_samples = {
        "model": "sandbox-ensemble",
        "messages": msg,
        "temperature": 0,
        "ensemble": {"samples_per_member": 2},
    }
    assert _error(httpx.post(chat, headers=h, json=greedy_samples), 400)["param"] == "ensemble.samples_per_member"
    _error(httpx.get(url + "/v1/nothing-here", headers=h), 404)
    # and the server still answers
    assert server.alive()
    ok = httpx.post(chat, headers=h, json={"model": "m00", "messages": msg, "max_tokens": 8, "temperature": 0})
    assert ok.status_code == 200


def test_a_seeded_request_with_a_split_prefill_cannot_kill_the_engine(server, client):
    """vLLM's CPU sampler dies on a seeded request whose prefill is split over engine steps
    ("CPU Generator does not use offset"); n=40 copies of a long prompt used to do that."""
    prompt = "sort " + " ".join(str(i) for i in range(20, 60))
    resp = client.chat.completions.create(
        model="m00", messages=[{"role": "user", "content": prompt}], max_tokens=16, n=40, seed=1
    )
    assert len(resp.choices) == 40
    assert server.alive()


def test_api_key_is_required_on_every_working_route(server):
    msg = {"model": "m00", "messages": [{"role": "user", "content": PROBLEM}], "max_tokens": 4}
    routes = [
        ("get", "/v1/models", None),
        ("post", "/v1/chat/completions", msg),
        ("post", "/v1/completions", {"model": "m00", "prompt": "x", "max_tokens": 2}),
        ("post", "/admin/reload", None),
        ("get", "/admin/population", None),
    ]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + server.api_key}):
            err = _error(httpx.request(method, server.url + path, headers=headers, json=body), 401)
            assert err["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # health stays open, like vLLM's


def test_metrics_count_requests_votes_and_tokens(server, client):
    client.chat.completions.create(
        model="sandbox-ensemble", messages=[{"role": "user", "content": PROBLEM}], temperature=0, max_tokens=64
    )
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "ensemble_requests_total",
        "ensemble_request_latency_seconds_bucket",
        "ensemble_tokens_total",
        "ensemble_member_votes_total",
        "ensemble_agreement_bucket",
        "ensemble_engine_requests_inflight",
    ):
        assert name in text, name
    assert 'ensemble_requests_total{kind="ensemble",status="ok"}' in text
    assert 'ensemble_requests_total{kind="unknown",status="404"}' in text


def _metric(server, prefix: str) -> float:
    """The value of the first /metrics line that starts with `prefix` (0 when there is none yet)."""
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    return next((float(line.split()[-1]) for line in lines if line.startswith(prefix)), 0.0)


def test_client_disconnect_aborts_every_generation(server):
    """A client that leaves (a read timeout, a stream closed after its first chunk) aborts every chain in the
    engine: nothing is left in flight, and the request is never answered (no `ok` in the request counter).

    256 chains of 200 tokens: far more than the tiny sandbox model finishes before the client leaves, even on
    a fast machine (32 chains once finished inside a 1 s timeout)."""
    body = {
        "model": "sandbox-ensemble",
        "messages": [{"role": "user", "content": "calc (3+4)*5-6"}],
        "max_tokens": 200,
        "temperature": 1.0,
        "ignore_eos": True,
        "ensemble": {"samples_per_member": 32},
    }
    answered = 'ensemble_requests_total{kind="ensemble",status="ok"}'
    for stream in (False, True):
        ok_before = _metric(server, answered)
        if stream:
            # a read timeout fires only on a gap between chunks, and a stream sends chunks all along: leave after
            # the first chunk (the role chunk, sent at once; the answer comes only after the vote)
            with httpx.stream(
                "POST", server.url + "/v1/chat/completions", headers=server.headers, json={**body, "stream": True}
            ) as r:
                assert r.status_code == 200
                first = next(r.iter_lines())
                assert first.startswith("data: ")
            # leaving the block closed the connection while the chains were still generating
        else:
            try:
                r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers, json=body, timeout=0.5)
            except httpx.ReadTimeout:
                pass  # the client went away while the chains were still generating
            else:
                pytest.fail(f"answered within the client's 0.5 s timeout: {r.status_code} {r.text[:300]}")
        deadline = time.monotonic() + 15
        inflight = None
        while time.monotonic() < deadline:
            inflight = _metric(server, "ensemble_engine_requests_inflight")
            if inflight == 0:
                break
            time.sleep(0.2)
        assert inflight == 0, "generations kept running after the client went away"
        assert _metric(server, answered) == ok_before, "the request was answered after its client left: not aborted"
    assert server.alive()


def test_cross_vote_under_concurrent_mixed_traffic_keeps_the_engine_alive(server):
    """The vLLM CPU bug: a prompt-logprobs request under a LoRA adapter that shares an engine step with
    any other request kills the engine.

    Cross votes score with prompt logprobs; fire them together with plain member requests of every
    adapter, streaming and not, and the engine must survive and answer everything.
    """

    async def hammer() -> list:
        client = server.async_client()
        jobs = []
        for i in range(6):
            jobs.append(
                client.chat.completions.create(
                    model="sandbox-ensemble",
                    messages=[{"role": "user", "content": f"add {100 + i}+{27 * i}"}],
                    temperature=1.0,
                    max_tokens=48,
                    extra_body={"ensemble": {"vote": "cross", "samples_per_member": 2}},
                )
            )
            for m in range(8):
                jobs.append(
                    client.chat.completions.create(
                        model=f"m0{m}",
                        messages=[{"role": "user", "content": f"sub {900 - i}-{m}"}],
                        temperature=1.0,
                        max_tokens=32,
                    )
                )
            jobs.append(
                client.completions.create(model=f"m0{i}", prompt="<|user|>mod 347%7\n<|assistant|>", max_tokens=24)
            )
        return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(hammer())
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    cross = [r for r in results if (r.model_extra or {}).get("ensemble")]
    assert len(cross) == 6 and all(_ensemble(r)["rule"].startswith("cross") for r in cross)
    assert server.alive()


def test_adapter_files_changing_on_disk_cannot_kill_the_engine(server, client):
    """vLLM loads adapter files lazily and dies on a corrupt one; the server serves private, checked copies."""
    weights = server.population / "members" / "m05" / "adapter_model.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[: len(original) // 2])  # the trainer (or a disk) breaks the file
        resp = client.chat.completions.create(
            model="m05", messages=[{"role": "user", "content": PROBLEM}], max_tokens=32
        )
        assert resp.choices[0].message.content
        ens = client.chat.completions.create(
            model="sandbox-ensemble",
            messages=[{"role": "user", "content": PROBLEM}],
            max_tokens=32,
            extra_body={"ensemble": {"members": ["m04", "m05"]}},
        )
        assert _ensemble(ens)["failed"] == []
        assert server.alive()
    finally:
        weights.write_bytes(original)


def test_chains_without_an_answer_are_excluded_and_the_request_still_answered(client):
    resp = client.chat.completions.create(
        model="sandbox-ensemble",
        messages=[{"role": "user", "content": PROBLEM}],
        temperature=0,
        max_tokens=3,
        extra_body={"ensemble": {"return_chains": True}},
    )
    ens = _ensemble(resp)
    assert ens["answer"] is None and ens["votes"] == {} and ens["agreement"] == 0.0
    assert {c["status"] for c in ens["chains"]} == {"missing"}
    assert resp.choices[0].message.content and resp.choices[0].finish_reason == "length"


# ---------------------------------------------------------------- population refresh


def test_population_refresh_without_restart(server, client, tmp_path: Path):
    from ensemble_serve.shared.population import commit_generation, load_population

    pop = load_population(server.population)
    manifest = pop.manifest
    # generation 1: drop m07, keep the rest (member folders are immutable, so nothing is rewritten)
    members = [m for m in manifest.members if m.name != "m07"]
    new = manifest.model_copy(update={"generation": 1, "members": members})
    commit_generation(server.population, new, {}, keep_unreferenced=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ids = {m.id for m in client.models.list().data}
        if "m07" not in ids:
            break
        time.sleep(0.3)
    assert "m07" not in ids and "m06" in ids
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="m07", messages=[{"role": "user", "content": PROBLEM}], max_tokens=4)
    resp = client.chat.completions.create(
        model="sandbox-ensemble", messages=[{"role": "user", "content": PROBLEM}], temperature=0, max_tokens=64
    )
    assert len(_ensemble(resp)["members"]) == 7

    # a broken generation (a member folder that is missing) is refused; generation 1 keeps serving
    manifest_file = server.population / "population.json"
    broken = json.loads(manifest_file.read_text())
    broken["generation"] = 2
    broken["members"][0]["path"] = "members/does-not-exist"
    manifest_file.write_text(json.dumps(broken))
    reload = httpx.post(server.url + "/admin/reload", headers=server.headers)
    err = _error(reload, 400)
    assert "does-not-exist" in err["message"]
    assert (
        len(
            _ensemble(
                client.chat.completions.create(
                    model="sandbox-ensemble",
                    messages=[{"role": "user", "content": PROBLEM}],
                    temperature=0,
                    max_tokens=64,
                )
            )["members"]
        )
        == 7
    )
    text = httpx.get(server.url + "/metrics").text
    assert "ensemble_population_generation 1.0" in text

    # repaired: explicit reload picks it up
    commit_generation(server.population, new.model_copy(update={"generation": 2}), {}, keep_unreferenced=True)
    reload = httpx.post(server.url + "/admin/reload", headers=server.headers)
    assert reload.status_code == 200 and reload.json()["generation"] == 2


# ---------------------------------------------------------------- the client examples, against the real server


def test_client_examples_work(server, monkeypatch):
    from clients import langchain_example, openai_client, rag_example

    monkeypatch.setenv("ENSEMBLE_SERVE_API_KEY", server.api_key)
    client = server.client()
    text, ens = openai_client.ask(client, "sandbox-ensemble", PROBLEM, vote="weighted")
    assert ens["rule"] == "weighted" and len(ens["chains"]) == len(ens["members"]) >= 7 and text
    streamed, ens = openai_client.stream(client, "sandbox-ensemble", PROBLEM)
    assert streamed and ens is not None and "answer" in ens

    assert rag_example.retrieve("what is ta plus mi?", rag_example.CORPUS) == ["facts: ko=17 ta=52 mi=8 re=33"]
    assert rag_example.to_sandbox_question("what is ta plus mi?") == "ask: ta+mi"
    chain, ens = rag_example.answer(client, "sandbox-ensemble", "what is ta plus mi?")
    assert chain and len(ens["chains"]) == len(ens["members"])

    llm = langchain_example.build_llm(server.url + "/v1", vote="majority")
    message = llm.invoke("sort 52 17 83 4")
    assert message.content
    vote = langchain_example.vote_of(message)  # the x-ensemble-* headers, through LangChain's response_metadata
    assert vote is not None and vote["rule"] == "majority" and len(vote["members"]) >= 2
    if vote["answer"] is not None:
        assert 0 < vote["agreement"] <= 1 and vote["answer"] in message.content
    member = langchain_example.build_llm(server.url + "/v1", model="m00", vote=None).invoke("sort 52 17 83 4")
    assert member.content and langchain_example.vote_of(member) is None
    streamed = "".join(chunk.content for chunk in llm.stream("sort 52 17 83 4"))
    assert streamed


def test_adaptive_fan_out_end_to_end(server, client):
    """Waves on the real engine: the report, streaming, a 400 for a wave larger than the fan-out, /metrics."""
    body = {"ensemble": {"members": 4, "samples_per_member": 2, "adaptive": {"confidence": 0.9, "wave_size": 2}}}
    resp = client.chat.completions.create(
        model="sandbox-ensemble",
        messages=[{"role": "user", "content": PROBLEM}],
        temperature=0.7,
        max_tokens=64,
        extra_body=body,
    )
    ens = _ensemble(resp)
    report = ens["adaptive"]
    assert 1 <= report["waves"] <= 4 and report["chains"] == 2 * report["waves"] and report["full_chains"] == 8
    assert report["stopped"] in ("confident", "decided", "exhausted") and resp.choices[0].message.content
    assert sum(ens["votes"].values()) <= report["chains"]
    stream = client.chat.completions.create(
        model="sandbox-ensemble",
        messages=[{"role": "user", "content": PROBLEM}],
        temperature=0.7,
        max_tokens=64,
        stream=True,
        extra_body=body,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    bad = httpx.post(
        server.url + "/v1/chat/completions",
        headers=server.headers,
        json={
            "model": "sandbox-ensemble",
            "messages": [{"role": "user", "content": PROBLEM}],
            "temperature": 0.7,
            "ensemble": {"members": 2, "adaptive": {"wave_size": 3}},
        },
        timeout=60,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "ensemble.adaptive.wave_size"
    text = httpx.get(server.url + "/metrics").text
    assert "ensemble_adaptive_waves_total" in text and 'ensemble_adaptive_chains_total{kind="spent"}' in text
