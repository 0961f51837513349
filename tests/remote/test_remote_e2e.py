"""End to end, remote mode: two real vLLM OpenAI servers (CPU build) each serve half of the
embedded ensemble's members; `ensemble-serve up --remote A,B` fans out to both, driven with
the real `openai` client over loopback.

The cluster is the package's (tests/remote/conftest.py), shared with test_remote_health_e2e.py.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from ensemble_serve.testing.servers import VLLM_KEY, free_port

from .cluster import MEMBERS, Cluster

pytestmark = pytest.mark.engine

PROBLEM = "add 478+365"  # answer 843


@pytest.fixture()
def client(cluster: Cluster) -> openai.OpenAI:
    return cluster.ensemble.client()


def _ensemble(resp) -> dict:
    return resp.model_extra["ensemble"]


def _chat(**kw):
    return dict(messages=[{"role": "user", "content": PROBLEM}], **kw)


# ---------------------------------------------------------------- discovery


def test_models_list_the_members_of_both_servers(client):
    models = {m.id: m for m in client.models.list().data}
    members = sorted(m.id for m in models.values() if getattr(m, "parent", None) == "sandbox-substrate")
    assert members == MEMBERS
    ens = models["sandbox-ensemble"]
    assert ens.model_extra["ensemble"]["members"] == MEMBERS
    assert ens.model_extra["max_model_len"] == 256  # the servers' context, from their /v1/models


def test_backend_refuses_servers_that_cannot_serve_the_population(cluster: Cluster):
    from ensemble_serve.engine.remote import RemoteBackend, RemoteDiscoveryError
    from ensemble_serve.shared.population import load_population

    pop = load_population(cluster.ensemble.population)
    with pytest.raises(RemoteDiscoveryError) as e:  # server A alone lacks m04..m07
        RemoteBackend(pop, [cluster.a.url], api_key=VLLM_KEY)
    assert "['m04', 'm05', 'm06', 'm07']" in str(e.value)
    with pytest.raises(RemoteDiscoveryError, match="401"):
        RemoteBackend(pop, [cluster.a.url, cluster.b.url], api_key="wrong")
    with pytest.raises(RemoteDiscoveryError, match="cannot reach"):
        RemoteBackend(pop, [cluster.a.url, cluster.b.url, f"http://127.0.0.1:{free_port()}"], api_key=VLLM_KEY)


# ---------------------------------------------------------------- a member: answered by the server that serves it


def test_member_request_is_answered_by_its_server(cluster: Cluster, client):
    a0 = cluster.a.metric("vllm:request_success_total")
    b0 = cluster.b.metric("vllm:request_success_total")
    kw = _chat(model="m05", temperature=0, max_tokens=64, logprobs=True, top_logprobs=2)
    resp = client.chat.completions.create(**kw)
    deadline = time.monotonic() + 10
    while cluster.b.metric("vllm:request_success_total") < b0 + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.b.metric("vllm:request_success_total") == b0 + 1
    assert cluster.a.metric("vllm:request_success_total") == a0

    # the same request straight to server B gives the same tokens and log-probabilities
    direct = cluster.b.client().chat.completions.create(**kw)
    text = resp.choices[0].message.content
    assert "#### " in text and text == direct.choices[0].message.content
    assert resp.usage.completion_tokens == direct.usage.completion_tokens
    ours, theirs = resp.choices[0].logprobs.content, direct.choices[0].logprobs.content
    assert [t.token for t in ours] == [t.token for t in theirs]  # the last one is the EOS token, as in vLLM
    assert "".join(t.token for t in ours).startswith(text)
    assert [t.logprob for t in ours] == pytest.approx([t.logprob for t in theirs], abs=1e-4)
    assert all(len(t.top_logprobs) == 2 for t in ours)

    # streaming through ensemble-serve carries the same text
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**_chat(model="m05", temperature=0, max_tokens=64), stream=True)
        if c.choices
    ]
    assert "".join(pieces) == text


def test_base_model_and_completions(client):
    base = client.chat.completions.create(**_chat(model="sandbox-substrate", temperature=0, max_tokens=32))
    assert base.choices[0].message.content
    prompt = f"<|user|>{PROBLEM}\n<|assistant|>"
    resp = client.completions.create(model="m02", prompt=prompt, temperature=0, max_tokens=64)
    chat = client.chat.completions.create(**_chat(model="m02", temperature=0, max_tokens=64))
    assert resp.choices[0].text == chat.choices[0].message.content
    sampled = client.completions.create(
        model="m06",
        prompt="<|user|>sort 52 17 83 4\n<|assistant|>",
        temperature=1.0,
        n=3,
        max_tokens=48,
        seed=1,
        stop=["="],
    )
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    assert all("=" not in c.text for c in sampled.choices)


# ---------------------------------------------------------------- the ensemble across both servers


def test_ensemble_over_all_members(client):
    resp = client.chat.completions.create(
        **_chat(model="sandbox-ensemble", temperature=0.8, max_tokens=64, seed=3),
        extra_body={"ensemble": {"return_chains": True}},
    )
    ens = _ensemble(resp)
    assert ens["members"] == MEMBERS and not ens["failed"]
    chains = ens["chains"]
    assert len(chains) == 8 and {c["member"] for c in chains} == set(MEMBERS)
    assert all(c["tokens"] > 0 for c in chains)
    assert resp.usage.completion_tokens == sum(c["tokens"] for c in chains)
    if ens["answer"] is not None:
        assert resp.choices[0].message.content in [c["text"] for c in chains if c["answer"] == ens["answer"]]

    mixed = client.completions.create(
        model="sandbox-ensemble",
        prompt=f"<|user|>{PROBLEM}\n<|assistant|>",
        temperature=1.0,
        max_tokens=64,
        extra_body={"ensemble": {"members": ["m01", "m06"], "samples_per_member": 2, "return_chains": True}},
    )
    e = _ensemble(mixed)
    assert sorted((c["member"], c["sample"]) for c in e["chains"]) == [(m, s) for m in ("m01", "m06") for s in range(2)]
    assert mixed.usage.completion_tokens == sum(c["tokens"] for c in e["chains"])


def test_adaptive_waves_are_dispatched_to_both_servers(client):
    """Adaptive fan-out in remote mode: each wave's chains go to the servers of their members."""
    resp = client.chat.completions.create(
        **_chat(model="sandbox-ensemble", temperature=0.8, max_tokens=64),
        extra_body={
            "ensemble": {
                "members": ["m01", "m06"],
                "samples_per_member": 3,
                "vote": "cross",
                "return_chains": True,
                "adaptive": {"wave_size": 2, "confidence": 0.9},
            }
        },
    )
    ens = _ensemble(resp)
    report = ens["adaptive"]
    assert report["full_chains"] == 6 and report["chains"] == len(ens["chains"]) <= 6 and not ens["failed"]
    assert {c["member"] for c in ens["chains"][:2]} == {"m01", "m06"}  # the first wave: one chain of each
    assert resp.usage.completion_tokens == sum(c["tokens"] for c in ens["chains"])


def test_cross_vote_with_concurrent_traffic_on_both_servers(cluster: Cluster):
    async def hammer() -> list:
        client = cluster.ensemble.async_client()
        jobs = []
        for i in range(3):
            jobs.append(
                client.chat.completions.create(
                    model="sandbox-ensemble",
                    messages=[{"role": "user", "content": f"add {100 + i}+{27 * i}"}],
                    temperature=1.0,
                    max_tokens=48,
                    extra_body={"ensemble": {"vote": "cross", "samples_per_member": 2}},
                )
            )
            for m in MEMBERS:
                jobs.append(
                    client.chat.completions.create(
                        model=m,
                        messages=[{"role": "user", "content": f"sub {900 - i}-{m[-1]}"}],
                        temperature=1.0,
                        max_tokens=32,
                    )
                )
        return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(hammer())
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    cross = [r for r in results if (r.model_extra or {}).get("ensemble")]
    assert len(cross) == 3
    for r in cross:
        ens = _ensemble(r)
        assert ens["rule"].startswith("cross") and not ens["failed"]
        if len(ens["votes"]) > 1:
            assert sum(ens["votes"].values()) == pytest.approx(1.0, abs=1e-6)
    assert cluster.a.healthy() and cluster.b.healthy() and cluster.ensemble.alive()


def test_backend_scores_chains_alongside_generation(cluster: Cluster):
    """`RemoteBackend.score` directly: a member's own greedy chain outscores the same chain with a wrong
    answer, and scoring on both servers while both generate for several adapters leaves them alive."""
    from vllm import SamplingParams

    from ensemble_serve.engine.remote import RemoteBackend
    from ensemble_serve.errors import BadRequestError
    from ensemble_serve.shared.population import load_population

    async def run() -> tuple[list[list[float]], int]:
        backend = RemoteBackend(
            load_population(cluster.ensemble.population), [cluster.a.url, cluster.b.url], api_key=VLLM_KEY
        )
        try:
            tok = backend.tokenizer
            prompt = tok.encode(
                tok.apply_chat_template(
                    [{"role": "user", "content": PROBLEM}], tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )
            chains = {}
            for m in ("m01", "m06"):
                greedy = SamplingParams(temperature=0, max_tokens=64)
                async for out in backend.generate(prompt, greedy, m, backend.next_id("t")):
                    chains[m] = list(out.outputs[0].token_ids)
            own = chains["m01"]
            text = tok.decode(own, skip_special_tokens=True)
            assert text.rstrip().endswith("#### 843"), text
            wrong = tok.encode(text.rstrip()[:-3] + "842", add_special_tokens=False)

            async def generate(m: str) -> int:
                params = SamplingParams(n=2, temperature=1.0, max_tokens=48, seed=7)
                async for out in backend.generate(prompt, params, m, backend.next_id("g")):
                    last = out
                return sum(len(o.token_ids) for o in last.outputs)

            # an error of the remote server comes back as an exception with its message
            with pytest.raises(BadRequestError, match="max_model_len"):
                async for _ in backend.generate(prompt, SamplingParams(max_tokens=1000), "m01", backend.next_id("t")):
                    pass
            assert backend.gate.state == (0, False)

            results = await asyncio.gather(
                backend.score(prompt, [own, wrong], "m01"),
                backend.score(prompt, [own, wrong], "m06"),
                *(generate(m) for m in MEMBERS),
                backend.score(prompt, [chains["m06"], own], "m02"),
            )
            return [results[0], results[1], results[-1]], sum(results[2:-1])
        finally:
            await backend.aclose()

    scores, generated = asyncio.run(run())
    assert generated > 0
    for own, wrong in scores[:2]:
        assert -20 < wrong < own <= 0
    assert all(-20 < s <= 0 for s in scores[2])
    assert cluster.a.healthy() and cluster.b.healthy()


def _generated(cluster: Cluster) -> float:
    return cluster.a.metric("vllm:generation_tokens_total") + cluster.b.metric("vllm:generation_tokens_total")


def test_client_disconnect_aborts_the_remote_generations(cluster: Cluster):
    srv = cluster.ensemble
    body = {
        "model": "sandbox-ensemble",
        "messages": [{"role": "user", "content": "calc (3+4)*5-6"}],
        "max_tokens": 200,
        "temperature": 1.0,
        "ignore_eos": True,
        "ensemble": {"samples_per_member": 4},
    }
    asked = 8 * 4 * 200
    for stream in (False, True):
        before = _generated(cluster)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                srv.url + "/v1/chat/completions", headers=srv.headers, json={**body, "stream": stream}, timeout=1.0
            )
        deadline = time.monotonic() + 15
        running = None
        while time.monotonic() < deadline:
            running = cluster.a.metric("vllm:num_requests_running") + cluster.b.metric("vllm:num_requests_running")
            metrics = httpx.get(srv.url + "/metrics").text
            inflight = float(
                next(
                    line.split()[-1]
                    for line in metrics.splitlines()
                    if line.startswith("ensemble_engine_requests_inflight")
                )
            )
            if running == 0 and inflight == 0:
                break
            time.sleep(0.2)
        assert running == 0 and inflight == 0, "generations kept running after the client went away"
        generated = _generated(cluster) - before
        assert generated < asked
    assert srv.alive()


# ---------------------------------------------------------------- population refresh (last: it changes the population, then restores it)


def test_refresh_refuses_a_member_no_server_serves(cluster: Cluster, client):
    from ensemble_serve.shared.population import commit_generation, load_population

    srv = cluster.ensemble
    manifest = load_population(srv.population).manifest
    m08 = manifest.members[0].model_copy(update={"name": "m08", "path": "members/m08", "born_generation": 1})
    gen1 = manifest.model_copy(update={"generation": 1, "members": [*manifest.members, m08]})
    commit_generation(srv.population, gen1, {"m08": srv.population / "members" / "m00"}, keep_unreferenced=True)
    reload = httpx.post(srv.url + "/admin/reload", headers=srv.headers)
    assert reload.status_code == 400, reload.text
    assert "m08" in reload.json()["error"]["message"]
    ids = {m.id for m in client.models.list().data}
    assert "m08" not in ids and set(MEMBERS) <= ids
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**_chat(model="m08", max_tokens=4))
    resp = client.chat.completions.create(**_chat(model="sandbox-ensemble", temperature=0, max_tokens=64))
    assert _ensemble(resp)["members"] == MEMBERS
    assert srv.alive()  # a refused refresh is not an unhealthy backend

    # a generation the servers can serve (m07 dropped) is taken
    gen2 = manifest.model_copy(update={"generation": 2, "members": manifest.members[:7]})
    commit_generation(srv.population, gen2, {}, keep_unreferenced=True)
    reload = httpx.post(srv.url + "/admin/reload", headers=srv.headers)
    assert reload.status_code == 200 and reload.json()["members"] == MEMBERS[:7]
    resp = client.chat.completions.create(**_chat(model="sandbox-ensemble", temperature=0, max_tokens=64))
    assert _ensemble(resp)["members"] == MEMBERS[:7]

    # and back to all eight, for the health tests that share the cluster
    gen3 = manifest.model_copy(update={"generation": 3})
    commit_generation(srv.population, gen3, {}, keep_unreferenced=True)
    reload = httpx.post(srv.url + "/admin/reload", headers=srv.headers)
    assert reload.status_code == 200 and reload.json()["members"] == MEMBERS
