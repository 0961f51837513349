"""Every path on a real-shaped model: a Qwen2 with a byte-level BPE tokenizer (numbers split across
several tokens), ChatML template with a system role, a 2048-token context, and adapters made with
plain PEFT outside this project (trainer/testing/realshape.py builds them, cached).

The adapters come in the way a user's would: `ensemble-train import`, then `eval`, `router` and
`calibrate` on a JSONL file; the population is served with the real server and driven with the real
`openai` client; `ensemble-serve up --model --lora-modules` serves them without a population
directory; one generation of `evolve` runs on them; a real vLLM server holds part of them for the
remote mode.

Slow: builds the model once (a few minutes, then cached) and starts vLLM several times.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_evolve_e2e import SMALL

from ensemble_serve.shared.cliutil import load_config
from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.population import load_population, read_manifest, write_manifest
from ensemble_serve.testing.servers import (
    VLLM_KEY,
    Server,
    VLLMServer,
    ensemble_command,
    free_port,
    launch,
    start_server,
    vllm_command,
    wait_healthy,
)
from trainer.calibration.command import CalibrateConfig, run_calibrate
from trainer.evaluate import EvalConfig, run_eval
from trainer.router.command import run_router
from trainer.router.config import RouterCommandConfig
from trainer.tasks.sandbox import generate_problems

# the first test also builds the model when .cache/ has none (a few minutes), inside its setup
pytestmark = [pytest.mark.realshape, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
ENSEMBLE = "ensemble"
SPECIAL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
SYSTEM = "You are a careful assistant. Think step by step."
PROBLEM = "add 478+365"


def _cli(*args: str, timeout: float = 600) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert run.returncode == 0, (
        f"ensemble-train {' '.join(args)} exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    )
    return run.stdout


def _modules(realshape) -> list[str]:
    return [f"{name}={path}" for name, path in realshape.adapters.items()]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's own labelled JSONL (prompt, answer, domain), here made from sandbox problems."""
    path = tmp_path_factory.mktemp("data") / "mine.jsonl"
    problems = generate_problems(36, seed=11, split="heldout", domains=["add", "sub", "sort"], difficulties=[1])
    path.write_text(
        "".join(json.dumps({"prompt": p.prompt, "answer": p.answer, "domain": p.domain}) + "\n" for p in problems)
    )
    return path


@pytest.fixture(scope="module")
def population(realshape, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ensemble-train import` (the CLI), then eval, router and calibrate on the JSONL file with the settings the
    README's commands give, run in-process on one engine (`engine=`: the commands' own CLIs are tested elsewhere)."""
    pop = tmp_path_factory.mktemp("realshape") / "pop"
    out = _cli("import", "--model", str(realshape.base), "--lora-modules", *_modules(realshape), "--out", str(pop))
    assert "3 members" in out
    common = {"population": pop, "data": data, "max_tokens": 48}
    engine = OfflineEngine(load_population(pop), snapshot_root=tmp_path_factory.mktemp("snapshots"))
    try:
        run_eval(load_config(EvalConfig, None, common), update_manifest=True, engine=engine)
        router_cfg = {**common, "steps": 40, "heldout_per_domain": 4, "top_k": 2}
        run_router(load_config(RouterCommandConfig, None, router_cfg), progress=False, engine=engine)
        run_calibrate(load_config(CalibrateConfig, None, common), engine=engine)
    finally:
        del engine
        gc.collect()
    return pop


@pytest.fixture(scope="module")
def server(population: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = start_server(
        population, log, "--served-model-name", ENSEMBLE, "--watch-interval", "0.5", "--max-model-len", "2048"
    )
    yield srv
    srv.kill()


@pytest.fixture()
def client(server: Server) -> openai.OpenAI:
    return server.client(timeout=300)


def _clean(text: str | None) -> str:
    assert text is not None
    for tok in SPECIAL:
        assert tok not in text, f"special token {tok!r} leaked into {text!r}"
    return text


# ---------------------------------------------------------------- offline commands


def test_the_imported_population_was_evaluated_routed_and_calibrated(population: Path) -> None:
    pop = load_population(population)
    assert pop.names == ["qv8", "all16", "attn4"]
    assert [m.rank for m in pop.manifest.members] == [8, 16, 4]
    assert all(m.fitness is not None and m.domain_scores for m in pop.manifest.members)
    assert pop.manifest.router is not None and pop.manifest.reliability is not None


# ---------------------------------------------------------------- serving


def test_models_and_the_chat_template_with_a_system_message(client: openai.OpenAI, realshape) -> None:
    """The system message is rendered by the model's own template (ChatML here), exactly as transformers does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(realshape.base)
    ids = {m.id for m in client.models.list().data}
    assert {ENSEMBLE, "qv8", "all16", "attn4"} <= ids
    for messages in (
        [{"role": "user", "content": PROBLEM}],
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROBLEM}],
    ):
        expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        member = client.chat.completions.create(model="qv8", messages=messages, temperature=0, max_tokens=8)
        assert member.usage.prompt_tokens == len(expected["input_ids"])
        resp = client.chat.completions.create(model=ENSEMBLE, messages=messages, temperature=0, max_tokens=64)
        _clean(resp.choices[0].message.content)
        ens = resp.model_extra["ensemble"]
        assert ens["votes"] and ens["answer"] is not None, ens  # the model answers with or without a system message


@pytest.mark.parametrize("vote", ["majority", "weighted", "cross", "calibrated"])
def test_every_vote_rule(client: openai.OpenAI, vote: str) -> None:
    resp = client.chat.completions.create(
        model=ENSEMBLE,
        messages=[{"role": "user", "content": "sub 91-37"}],
        temperature=0.7,
        seed=5,
        max_tokens=64,
        extra_body={"ensemble": {"vote": vote, "members": ["qv8", "all16", "attn4"], "samples_per_member": 2}},
    )
    text = _clean(resp.choices[0].message.content)
    ens = resp.model_extra["ensemble"]
    assert ens["rule"] == vote and ens["members"]
    if ens["answer"] is not None:  # the answer is read from the text, across the tokens it was split into
        assert ens["answer"] in text.replace(" ", "") or ens["answer"] in text


def test_answers_split_across_tokens_are_read_whole(client: openai.OpenAI, realshape) -> None:
    """A number is several BPE tokens here: the member's answer must be extracted from the decoded text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(realshape.base)
    assert len(tok.encode("843", add_special_tokens=False)) >= 1
    resp = client.chat.completions.create(
        model=ENSEMBLE,
        messages=[{"role": "user", "content": PROBLEM}],
        temperature=0,
        max_tokens=64,
        extra_body={"ensemble": {"return_chains": True, "members": ["qv8", "all16", "attn4"]}},
    )
    chains = resp.model_extra["ensemble"]["chains"]
    assert len(chains) == 3
    for chain in chains:
        _clean(chain["text"])
        if chain["answer"] is not None:
            assert chain["answer"] in chain["text"]


def test_completions_text_and_token_ids(client: openai.OpenAI, realshape) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(realshape.base)
    text = client.completions.create(model=ENSEMBLE, prompt=PROBLEM + "\n", max_tokens=32, temperature=0)
    _clean(text.choices[0].text)
    ids = tok.encode(PROBLEM + "\n", add_special_tokens=False)
    by_ids = client.completions.create(model="qv8", prompt=ids, max_tokens=32, temperature=0)
    same = client.completions.create(model="qv8", prompt=PROBLEM + "\n", max_tokens=32, temperature=0)
    assert by_ids.choices[0].text == same.choices[0].text


def test_stop_strings_spanning_tokens(client: openai.OpenAI) -> None:
    free = (
        client.chat.completions.create(
            model="all16", messages=[{"role": "user", "content": PROBLEM}], temperature=0, max_tokens=64
        )
        .choices[0]
        .message.content
    )
    assert free
    # a stop string made of the end of one token and the start of the next: the text before it, no more
    cut = len(free) // 2
    stop = free[cut - 1 : cut + 2]
    if not stop.strip():
        pytest.skip("the greedy chain has no printable middle")
    stopped = client.chat.completions.create(
        model="all16", messages=[{"role": "user", "content": PROBLEM}], temperature=0, max_tokens=64, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == free[: free.index(stop)]


def test_streaming_chat_from_the_ensemble_and_a_member(client: openai.OpenAI) -> None:
    for model in (ENSEMBLE, "attn4"):
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROBLEM}],
            temperature=0,
            max_tokens=48,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        _clean(text)
        assert text


def test_answer_text_on_a_long_rag_prompt(client: openai.OpenAI) -> None:
    """A retrieval prompt of more than 1,500 tokens with several passages, `answer: text`."""
    passages = []
    for i in range(19):  # about 1,700 tokens with this tokenizer, under the 2048-token context
        passages.append(
            f"Passage {i}: the warehouse in district {i} stores {100 + 7 * i} crates of item {i % 9}; "
            f"its manager counts them every {i % 5 + 1} days and reports to office {i * 3 % 17}."
        )
    question = "Question: how many crates does the warehouse in district 12 store?"
    prompt = "Use the passages to answer.\n\n" + "\n".join(passages) + "\n\n" + question
    resp = client.chat.completions.create(
        model=ENSEMBLE,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
        temperature=0.7,
        max_tokens=32,
        extra_body={"ensemble": {"answer": "text", "members": ["qv8", "all16", "attn4"]}},
    )
    assert resp.usage.prompt_tokens >= 1500
    text = _clean(resp.choices[0].message.content)
    ens = resp.model_extra["ensemble"]
    assert len(ens["members"]) == 3 and text


def test_mixture_with_the_router(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=ENSEMBLE,
        messages=[{"role": "user", "content": PROBLEM}],
        temperature=0,
        max_tokens=48,
        extra_body={"ensemble": {"mode": "mixture"}},
    )
    _clean(resp.choices[0].message.content)
    mixture = resp.model_extra["ensemble"]["routing"]["mixture"]
    assert mixture["adapter"] and set(mixture["members"]) <= {"qv8", "all16", "attn4"}


def test_refresh_picks_up_a_changed_population(server: Server, client: openai.OpenAI, population: Path) -> None:
    manifest = read_manifest(population)
    kept = [m for m in manifest.members if m.name != "attn4"]
    write_manifest(
        population,
        manifest.model_copy(update={"members": kept, "router": None, "reliability": None, "generation": 1}),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ids = {m.id for m in client.models.list().data}
        if "attn4" not in ids:
            break
        time.sleep(0.5)
    assert "attn4" not in ids and {"qv8", "all16"} <= ids
    resp = client.chat.completions.create(
        model=ENSEMBLE, messages=[{"role": "user", "content": PROBLEM}], temperature=0, max_tokens=32
    )
    assert sorted(resp.model_extra["ensemble"]["members"]) == ["all16", "qv8"]
    write_manifest(population, manifest)  # as it was, for the other tests


# ---------------------------------------------------------------- bring your own, without a population directory


def test_up_with_model_and_lora_modules(realshape, tmp_path: Path) -> None:
    port = free_port()
    modules = [f"{name}={path}" for name, path in realshape.adapters.items()]
    json_form = json.dumps({"name": "qv8json", "path": str(realshape.adapters["qv8"])})
    args = ensemble_command(
        port, "--model", str(realshape.base), "--lora-modules", *modules, json_form, "--max-model-len", "2048"
    )
    srv = launch(Server, "ensemble-serve", args, port, tmp_path / "byo.log")
    try:
        wait_healthy([srv], 300)
        client = srv.client(timeout=300)
        ids = {m.id for m in client.models.list().data}
        assert {ENSEMBLE, "qv8", "all16", "attn4", "qv8json"} <= ids
        resp = client.chat.completions.create(
            model=ENSEMBLE,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROBLEM}],
            temperature=0,
            max_tokens=48,
        )
        _clean(resp.choices[0].message.content)
        assert len(resp.model_extra["ensemble"]["members"]) == 4
    finally:
        srv.kill()


# ---------------------------------------------------------------- remote mode and evolve


def test_remote_mode_with_vllm_servers_holding_part_of_the_members_each(
    realshape, population: Path, tmp_path: Path
) -> None:
    """Two vLLM servers of the user's base, each holding part of the members; then one goes away."""
    parts = {"a": ["qv8", "attn4"], "b": ["all16"]}
    servers: dict[str, VLLMServer] = {}
    ens = None
    try:
        for key, held in parts.items():
            port = free_port()
            args = vllm_command(
                realshape.base,
                port,
                [f"{m}={population / 'members' / m}" for m in held],
                "--api-key",
                VLLM_KEY,
                "--max-model-len",
                "2048",
                "--no-enable-chunked-prefill",
                "--gpu-memory-utilization",
                "0.1",
                max_loras=2,
            )
            servers[key] = launch(VLLMServer, "vllm", args, port, tmp_path / f"vllm-{key}.log", api_key=VLLM_KEY)
        wait_healthy(list(servers.values()), 300)
        remote = [arg for srv in servers.values() for arg in ("--remote", srv.url)]
        ens = start_server(
            population,
            tmp_path / "ensemble.log",
            *remote,
            "--remote-api-key",
            VLLM_KEY,
            "--no-watch",
            "--served-model-name",
            ENSEMBLE,
        )
        client = ens.client(timeout=300)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROBLEM}]
        resp = client.chat.completions.create(
            model=ENSEMBLE,
            messages=messages,
            temperature=0.7,
            max_tokens=48,
            extra_body={"ensemble": {"vote": "cross", "samples_per_member": 2, "members": ["qv8", "all16", "attn4"]}},
        )
        _clean(resp.choices[0].message.content)
        assert sorted(resp.model_extra["ensemble"]["members"]) == ["all16", "attn4", "qv8"]  # from both servers

        servers["b"].stop()  # all16's server goes away: the others still answer
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # a failed request (or the liveness probe) marks it down
            resp = client.chat.completions.create(model=ENSEMBLE, messages=messages, temperature=0, max_tokens=48)
            _clean(resp.choices[0].message.content)
            health = httpx.get(ens.url + "/health", timeout=10).json()
            if health["status"] == "degraded":
                break
            time.sleep(1)
        assert health["status"] == "degraded" and health["unavailable_members"] == ["all16"], health
        resp = client.chat.completions.create(model=ENSEMBLE, messages=messages, temperature=0, max_tokens=48)
        _clean(resp.choices[0].message.content)
        ens_info = resp.model_extra["ensemble"]  # routed: the router's top 2 of the members that can answer
        assert ens_info["members"] and "all16" not in ens_info["members"], ens_info
    finally:
        if ens is not None:
            ens.kill()
        for srv in servers.values():
            srv.kill()


def test_one_generation_of_evolve(population: Path, data: Path, tmp_path: Path) -> None:
    config = tmp_path / "evolve.yaml"
    config.write_text(json.dumps(SMALL))  # the embedded default's small run, every fitness term included
    out = tmp_path / "evolved"
    _cli(
        "evolve",
        "--quiet",
        "--config",
        str(config),
        "--population",
        str(population),
        "--out",
        str(out),
        "--generations",
        "1",
        "--data",
        str(data),
    )
    pop = load_population(out)
    assert pop.manifest.generation == 1 and len(pop.names) == 3
