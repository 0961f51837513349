"""End to end, hostile input and shutdown: the real server (real vLLM CPU engine, embedded ensemble),
the real `openai` client and raw HTTP over loopback.

- a catastrophic answer pattern neither stalls the server nor keeps `/health` waiting;
- empty prompts, token-id prompts and lists of prompts for members, the base and the ensemble;
- a deadline aborts the request's generations (the engine's in-flight count returns to 0);
- SIGTERM drains within --shutdown-grace and exits 0; a second SIGTERM exits at once.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import openai
import pytest

from ensemble_serve.testing.servers import metric

pytestmark = pytest.mark.engine

ENSEMBLE = "sandbox-ensemble"
PROBLEM = "add 478+365"  # answer 843


def _chat(content: str = PROBLEM, **fields) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 64, "temperature": 0, **fields}


# ---------------------------------------------------------------- hostile patterns


def test_a_catastrophic_answer_pattern_neither_stalls_the_server_nor_health(server):
    """`(.*.*)*ZZZ` backtracks exponentially in Python's engine on any text without ZZZ (16 characters take
    about 30 s there, and the process ignores SIGTERM meanwhile); RE2 runs it in linear time.

    While 64 chains of 200 tokens are extracted with it, `/health` keeps answering: typically within
    100 ms, and never stalled for 10 s (a single backtracking extraction of one 200-token chain would take
    ages). The bound is loose on purpose: on a busy 2-core machine one poll can wait seconds for the
    scheduler; the point is that the loop is never held."""
    body = _chat(
        "sort 52 17 83 4",
        model=ENSEMBLE,
        temperature=1.0,
        max_tokens=200,
        ignore_eos=True,
        ensemble={"samples_per_member": 8, "answer": {"regex": r"(.*.*)*ZZZ"}, "return_chains": True},
    )

    async def run() -> tuple[httpx.Response, list[float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            warm = await c.post("/v1/chat/completions", json=_chat(model=ENSEMBLE))  # first-request costs aside
            assert warm.status_code == 200
            task = asyncio.create_task(c.post("/v1/chat/completions", json=body))
            latencies = []
            while not task.done():
                t = time.perf_counter()
                assert (await c.get("/health")).status_code == 200
                latencies.append(time.perf_counter() - t)
                await asyncio.sleep(0.02)
            return task.result(), latencies

    resp, latencies = asyncio.run(run())
    assert resp.status_code == 200, resp.text
    ens = resp.json()["ensemble"]
    assert resp.json()["usage"]["completion_tokens"] == 64 * 200
    assert ens["answer"] is None and {c["status"] for c in ens["chains"]} == {"missing"}
    slow = sorted(t for t in latencies if t >= 0.1)
    assert len(latencies) >= 10, latencies
    assert statistics.median(latencies) < 0.1 and max(latencies) < 10.0, (slow, statistics.median(latencies))


@pytest.mark.parametrize(
    ("pattern", "named"),
    [(r"(\d)\1", r"\1"), (r"(?<=#### )\d+", "(?<="), (r"\d++", "++"), ("(unclosed", "missing )")],
)
def test_a_pattern_the_linear_engine_cannot_run_is_a_400_naming_it(server, pattern: str, named: str):
    resp = httpx.post(
        server.url + "/v1/chat/completions",
        json=_chat(model=ENSEMBLE, ensemble={"answer": {"regex": pattern}}),
        timeout=60,
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "ensemble.answer" and named in error["message"]


# ---------------------------------------------------------------- prompts


@pytest.mark.parametrize("model", [ENSEMBLE, "m00", "sandbox-substrate"])
@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/completions", {"prompt": ""}),
        ("/v1/completions", {"prompt": "  \n\t "}),
        ("/v1/completions", {"prompt": ["add 1+2", ""]}),
        ("/v1/completions", {"prompt": []}),
        ("/v1/completions", {"prompt": [[]]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": " "}, {"role": "user", "content": "\n"}]}),
    ],
    ids=["empty", "whitespace", "one-of-two-empty", "no-prompts", "empty-token-ids", "empty-message", "blank-messages"],
)
def test_empty_prompts_are_400s_for_every_kind_of_model(server, model: str, route: str, body: dict):
    resp = httpx.post(server.url + route, json={"model": model, "max_tokens": 8, **body}, timeout=60)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] in ("prompt", "messages")


def test_token_id_prompts_and_lists_of_prompts_work_as_in_vllm(server):
    client = server.client()
    tok_ids = httpx.post(
        server.url + "/v1/completions", json={"model": "m00", "prompt": "add 1+2", "max_tokens": 1}, timeout=60
    ).json()["usage"]["prompt_tokens"]
    assert tok_ids > 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(server.population.parent / "substrate"))
    ids = tokenizer.encode(PROBLEM, add_special_tokens=True)
    for model in ("m00", "sandbox-substrate"):
        as_text = client.completions.create(model=model, prompt=PROBLEM, max_tokens=24, temperature=0)
        as_ids = client.completions.create(model=model, prompt=ids, max_tokens=24, temperature=0)
        assert as_ids.choices[0].text == as_text.choices[0].text
        assert as_ids.usage.prompt_tokens == as_text.usage.prompt_tokens == len(ids)
        both = client.completions.create(
            model=model, prompt=[PROBLEM, "sub 603-278"], max_tokens=24, temperature=0.7, n=2, seed=3
        )
        assert [c.index for c in sorted(both.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
        lists = client.completions.create(model=model, prompt=[ids, ids], max_tokens=24, temperature=0)
        assert [c.text for c in lists.choices] == [as_text.choices[0].text] * 2
    too_big = httpx.post(server.url + "/v1/completions", json={"model": "m00", "prompt": [1, 10**6]}, timeout=60)
    assert too_big.status_code == 400 and "out of range" in too_big.json()["error"]["message"]


def test_the_ensemble_votes_each_prompt_of_a_list_separately(server):
    client = server.client()
    prompts = [PROBLEM, "sub 603-278", "mod 347%7"]
    resp = client.completions.create(model=ENSEMBLE, prompt=prompts, max_tokens=64, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert resp.model_extra.get("ensemble") is None  # several prompts: each choice carries its own vote
    singles = [client.completions.create(model=ENSEMBLE, prompt=p, max_tokens=64, temperature=0) for p in prompts]
    for choice, single in zip(resp.choices, singles):
        vote = choice.model_extra["ensemble"]
        assert vote["answer"] == single.model_extra["ensemble"]["answer"]
        assert vote["votes"] == single.model_extra["ensemble"]["votes"]
        assert choice.text == single.choices[0].text
    assert resp.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    # streamed: every prompt's choice ends with its own `ensemble` object
    stream = client.completions.create(model=ENSEMBLE, prompt=prompts, max_tokens=64, temperature=0, stream=True)
    texts: dict[int, str] = {}
    votes: dict[int, dict] = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                votes[c.index] = chunk.model_extra["ensemble"]
    assert [texts[i] for i in range(3)] == [s.choices[0].text for s in singles]
    assert [votes[i]["answer"] for i in range(3)] == [s.model_extra["ensemble"]["answer"] for s in singles]
    ids_prompt = client.completions.create(model=ENSEMBLE, prompt=[[5, 6, 7]], max_tokens=16, temperature=0)
    assert ids_prompt.model_extra["ensemble"]["members"]


# ---------------------------------------------------------------- bodies and deadlines


def test_an_oversized_body_is_a_413(server):
    body = b'{"model": "m00", "prompt": "' + b"1" * (5 * 2**20) + b'"}'
    resp = httpx.post(
        server.url + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    assert server.alive()


def test_a_deadline_aborts_the_request_and_its_engine_work(server):
    client = server.client(timeout=120)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model=ENSEMBLE,
            messages=[{"role": "user", "content": PROBLEM}],
            temperature=1.0,
            max_tokens=200,
            extra_body={"ignore_eos": True, "timeout": 1.0, "ensemble": {"samples_per_member": 32}},
        )
    assert info.value.status_code == 504
    assert time.monotonic() - started < 10  # the whole fan-out takes about 25 s on 2 cores
    deadline = time.monotonic() + 10
    while metric(server.url, "ensemble_engine_requests_inflight") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server.url, "ensemble_engine_requests_inflight") == 0
    ok = client.chat.completions.create(model="m00", messages=[{"role": "user", "content": PROBLEM}], max_tokens=32)
    assert ok.choices[0].finish_reason in ("stop", "length")
