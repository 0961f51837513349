"""The trainer's remote engine (`ensemble_serve/shared/offline_remote.py`) against scripted vLLM servers.

Pure logic: which server a member goes to, what is loaded and unloaded, the request bodies, what a
server that dies costs, and every refusal's message. The same paths against real vLLM servers:
tests/remote/test_remote_self_play_e2e.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from ensemble_serve.shared.embedded import EMBEDDED_POPULATION
from ensemble_serve.shared.offline_remote import (
    RUNTIME_LORA_FLAG,
    RemoteOfflineEngine,
    RemoteRequestError,
    RemoteSetupError,
    RemoteUnavailable,
    request_body,
    run_prefix,
)
from ensemble_serve.shared.population import Population, load_population
from ensemble_serve.shared.vllm_api import TOKENIZER_PROBE


@dataclass
class FakeVLLM:
    """One scripted vLLM OpenAI server: its model list, tokenizer probe, runtime LoRA routes and completions."""

    url: str
    probe: list[int]
    base_id: str = "sandbox-substrate"
    root: str = "/models/substrate"
    runtime_lora: bool = True
    readable: bool = True  # whether the adapter folder it is asked to read exists for it
    down: bool = False
    loaded: dict[str, str] = field(default_factory=dict)
    completions: list[dict[str, Any]] = field(default_factory=list)
    die_after: int | None = None  # completions answered before it goes down

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        if path == "/v1/models":
            cards = [{"id": self.base_id, "root": self.root, "max_model_len": 256, "parent": None}]
            cards += [{"id": n, "root": p, "parent": self.base_id} for n, p in self.loaded.items()]
            return httpx.Response(200, json={"object": "list", "data": cards})
        if path == "/tokenize":
            return httpx.Response(200, json={"tokens": self.probe, "count": len(self.probe)})
        if path == "/health":
            return httpx.Response(200)
        if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter") and not self.runtime_lora:
            return httpx.Response(404, json={"detail": "Not Found"})
        if path == "/v1/load_lora_adapter":
            if not self.readable:
                msg = f"Loading lora {body['lora_name']} failed: No adapter found for {body['lora_path']}"
                return httpx.Response(404, json={"error": {"message": msg, "type": "NotFoundError", "code": 404}})
            if body["lora_name"] in self.loaded:
                msg = f"The lora adapter '{body['lora_name']}' has already been loaded."
                return httpx.Response(400, json={"error": {"message": msg, "code": 400}})
            self.loaded[body["lora_name"]] = body["lora_path"]
            return httpx.Response(200, text="Success")
        if path == "/v1/unload_lora_adapter":
            if self.loaded.pop(body["lora_name"], None) is None:
                msg = f"The lora adapter '{body['lora_name']}' cannot be found."
                return httpx.Response(404, json={"error": {"message": msg, "code": 404}})
            return httpx.Response(200, text="Success")
        if path == "/v1/completions":
            if self.die_after is not None and len(self.completions) >= self.die_after:
                self.down = True
                raise httpx.RemoteProtocolError("server disconnected", request=request)
            if body["model"] != self.base_id and body["model"] not in self.loaded:
                msg = f"The model `{body['model']}` does not exist."
                return httpx.Response(404, json={"error": {"message": msg, "code": 404}})
            if body.get("max_tokens", 1) < 0:
                return httpx.Response(400, json={"error": {"message": "max_tokens must be at least 1", "code": 400}})
            self.completions.append(body)
            choices = [
                {
                    "index": k,
                    "text": f"{body['model']}:{body['seed']}:{k}",
                    "token_ids": [1] * (k + 2),
                    "finish_reason": "stop",
                }
                for k in reversed(range(body["n"]))  # out of order: the engine sorts by index
            ]
            return httpx.Response(200, json={"choices": choices})
        return httpx.Response(404, json={"detail": "Not Found"})


class Cluster:
    """Scripted servers behind one mock transport (for both the engine's sync and async clients)."""

    def __init__(self, population: Population, n: int = 2, **kw: Any):
        from transformers import AutoTokenizer

        probe = list(
            AutoTokenizer.from_pretrained(population.base_model_path).encode(TOKENIZER_PROBE, add_special_tokens=False)
        )
        self.servers = [FakeVLLM(f"http://s{i}:8000", probe, **kw) for i in range(n)]
        self.transport = httpx.MockTransport(self._route)

    def _route(self, request: httpx.Request) -> httpx.Response:
        host = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        return next(s for s in self.servers if s.url == host).handle(request)

    @property
    def urls(self) -> list[str]:
        return [s.url + "/v1" for s in self.servers]  # with /v1, as users write them

    def engine(self, population: Population, tmp_path: Path, **kw: Any) -> RemoteOfflineEngine:
        return RemoteOfflineEngine(
            population,
            self.urls,
            adapter_dir=tmp_path / "adapters",
            transport=self.transport,
            async_transport=self.transport,
            **kw,
        )


@pytest.fixture(scope="module")
def population() -> Population:
    pop = load_population(EMBEDDED_POPULATION)
    return pop


@dataclass
class Params:  # the SamplingParams fields the engine reads
    n: int = 2
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = 7
    stop: list[str] = field(default_factory=list)


def test_members_are_dealt_to_the_servers_by_content_and_loaded_from_the_snapshot_folder(population, tmp_path):
    cluster = Cluster(population)
    engine = cluster.engine(population, tmp_path)
    names = population.names
    assert set(engine.names) == set(names)
    for i, m in enumerate(names):
        name = engine.names[m]
        assert name.startswith(f"{run_prefix(tmp_path / 'adapters')}-{m}-")
        holder = cluster.servers[i % 2]
        assert holder.loaded[name] == str((tmp_path / "adapters").resolve() / name)
        assert (tmp_path / "adapters" / name / "adapter_model.safetensors").is_file()
    assert sum(len(s.loaded) for s in cluster.servers) == len(names)


def test_stale_adapters_of_this_run_are_unloaded_and_other_runs_are_left_alone(population, tmp_path):
    cluster = Cluster(population)
    prefix = run_prefix(tmp_path / "adapters")
    for s in cluster.servers:  # a killed run of this folder left one behind; another run holds its own
        s.loaded[f"{prefix}-m00-deadbeefdeadbeef"] = "/old/path"
        s.loaded["es00000000-m00-0123456789abcdef"] = "/other/run"
    stale = tmp_path / "adapters" / f"{prefix}-m00-deadbeefdeadbeef"
    stale.mkdir(parents=True)
    engine = cluster.engine(population, tmp_path)
    for s in cluster.servers:
        assert f"{prefix}-m00-deadbeefdeadbeef" not in s.loaded
        assert "es00000000-m00-0123456789abcdef" in s.loaded
    assert not stale.exists()
    # a member's new weights get a new name; the old one leaves the server
    old = engine.names["m00"]
    changed = tmp_path / "pop"
    import shutil

    shutil.copytree(EMBEDDED_POPULATION, changed)
    shutil.copytree(EMBEDDED_POPULATION.parent / "substrate", tmp_path / "substrate")
    weights = changed / "members" / "m00" / "adapter_model.safetensors"
    shutil.copyfile(changed / "members" / "m01" / "adapter_model.safetensors", weights)
    engine.sync(load_population(changed))
    assert engine.names["m00"] != old
    assert all(old not in s.loaded for s in cluster.servers)
    engine.close()
    assert all(not any(n.startswith(prefix) for n in s.loaded) for s in cluster.servers)


def test_requests_carry_every_sampling_field_and_come_back_in_order(population, tmp_path):
    cluster = Cluster(population)
    engine = cluster.engine(population, tmp_path)
    members = ["m00", "m01", None]
    out = engine.generate(["p0", "p1", "p2"], members, Params())
    assert [[g.text.rsplit(":", 1)[1] for g in gens] for gens in out] == [["0", "1"]] * 3
    assert [g.tokens for g in out[0]] == [2, 3] and out[0][0].member == "m00" and out[2][0].member is None
    sent = {b["prompt"]: b for s in cluster.servers for b in s.completions}
    assert sent["p0"]["model"] == engine.names["m00"] and sent["p2"]["model"] == "sandbox-substrate"
    for key, value in {"n": 2, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "seed": 7, "stop": []}.items():
        assert sent["p0"][key] == value, key
    assert sent["p0"]["return_token_ids"] is True
    assert request_body("x", "m", Params(seed=None)).get("seed") is None


def test_a_server_that_dies_mid_sampling_hands_its_members_to_the_other(population, tmp_path):
    cluster = Cluster(population)
    engine = cluster.engine(population, tmp_path)
    engine.take_events()
    cluster.servers[1].die_after = 1
    members = [m for m in population.names for _ in range(3)]
    out = engine.generate([f"p{i}" for i in range(len(members))], members, Params(n=1))
    assert all(len(g) == 1 and g[0].member == m for g, m in zip(out, members))
    (event,) = engine.take_events()
    assert event["server"] == cluster.servers[1].url and event["event"] == "down" and event["retried"] >= 1
    moved = event["moved"]
    assert set(moved) == set(population.names[1::2]) and set(moved.values()) == {cluster.servers[0].url}
    # the seeds did not change with the server: the same request, the same seed
    sent = [b for s in cluster.servers for b in s.completions]
    assert sorted(b["prompt"] for b in sent) == sorted(f"p{i}" for i in range(len(members)))  # each answered once
    assert {b["seed"] for b in sent} == {7}

    cluster.servers[0].down = True
    with pytest.raises(RemoteUnavailable, match="every remote vLLM server is down"):
        engine.generate(["p"], ["m00"], Params())
    # a server back up is taken back by the next sync
    cluster.servers[1].down, cluster.servers[1].die_after = False, None
    engine.sync(population)
    assert [(e["server"], e["event"]) for e in engine.take_events()] == [
        (cluster.servers[0].url, "down"),
        (cluster.servers[1].url, "up"),
    ]
    assert engine.generate(["q"], ["m00"], Params(n=1))[0][0].member == "m00"


def test_a_request_the_server_refuses_is_not_retried(population, tmp_path):
    cluster = Cluster(population)
    engine = cluster.engine(population, tmp_path)
    with pytest.raises(RemoteRequestError, match="max_tokens must be at least 1"):
        engine.generate(["p"], ["m00"], Params(max_tokens=-1))
    with pytest.raises(KeyError, match="unknown member"):
        engine.generate(["p"], ["nobody"], Params())
    with pytest.raises(ValueError, match="2 prompts but 1 members"):
        engine.generate(["p", "q"], ["m00"], Params())


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ({"runtime_lora": False}, [RUNTIME_LORA_FLAG, "http://s0:8000"]),
        ({"base_id": "other-model", "root": "/models/other"}, ["'other-model'", "/models/other", "sandbox-substrate"]),
        ({"readable": False}, ["could not load", "remote_adapter_dir", "No adapter found"]),
    ],
)
def test_servers_that_cannot_serve_the_population_are_refused_by_name(population, tmp_path, setup, words):
    cluster = Cluster(population, **setup)
    with pytest.raises(RemoteSetupError) as e:
        cluster.engine(population, tmp_path)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_a_server_with_another_tokenizer_or_key_or_none_at_all_is_refused(population, tmp_path):
    cluster = Cluster(population)
    cluster.servers[1].probe = [1, 2, 3]
    with pytest.raises(RemoteSetupError, match="tokenizer is not the one"):
        cluster.engine(population, tmp_path)

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": "Unauthorized"})

    with pytest.raises(RemoteSetupError, match="set remote_api_key"):
        RemoteOfflineEngine(population, ["http://s0:8000"], adapter_dir=tmp_path, transport=httpx.MockTransport(refuse))
    with pytest.raises(RemoteSetupError, match="cannot reach remote vLLM server http://127.0.0.1:9"):
        RemoteOfflineEngine(population, ["http://127.0.0.1:9"], adapter_dir=tmp_path)
    with pytest.raises(RemoteSetupError, match="no remote servers"):
        RemoteOfflineEngine(population, [], adapter_dir=tmp_path)


# --------------------------------------------------------------------------- the commands' settings


def test_router_and_calibrate_hand_their_remote_settings_to_the_sampling(population, monkeypatch):
    import trainer.calibration.command as calibrate
    import trainer.router.command as router
    from trainer.calibration.command import CalibrateConfig
    from trainer.router.config import RouterCommandConfig

    seen: list = []

    def capture(*args, **kwargs):
        seen.append(kwargs["remote"])
        raise RuntimeError("captured")

    monkeypatch.setattr(router, "greedy_answers", capture)
    monkeypatch.setattr(calibrate, "greedy_answers", capture)
    urls = ("http://a:1", "http://b:2/v1")
    with pytest.raises(RuntimeError, match="captured"):
        router.generate_answers(population, [], RouterCommandConfig(population=EMBEDDED_POPULATION, remote=urls))
    with pytest.raises(RuntimeError, match="captured"):
        calibrate.run_calibrate(CalibrateConfig(population=EMBEDDED_POPULATION, remote=urls, per_domain=1))
    assert [s.remote for s in seen] == [urls, urls]


def test_where_a_run_samples_is_not_part_of_its_config_and_a_resume_may_move_it(tmp_path):
    from trainer.evolve.config import EvolveConfig
    from trainer.evolve.run import config_hash

    here = EvolveConfig(population=EMBEDDED_POPULATION)
    there = EvolveConfig(
        population=EMBEDDED_POPULATION,
        remote=("http://a:1",),
        remote_api_key="k",
        remote_adapter_dir=tmp_path,
        remote_concurrency=4,
    )
    assert config_hash(here) == config_hash(there)
    with pytest.raises(ValueError, match="http:// or https://"):
        EvolveConfig(remote=("a:1",))
    with pytest.raises(ValueError, match="remote_concurrency"):
        EvolveConfig(remote_concurrency=0)


def test_a_resume_keeps_the_runs_servers_unless_it_names_others(tmp_path):
    from trainer.evolve.config import EvolveConfig
    from trainer.evolve.run import prepare_run

    out = tmp_path / "run"
    prepare_run(EvolveConfig(population=EMBEDDED_POPULATION, out=out, remote=("http://a:1",)), resume=False)
    stored, _, _ = prepare_run(EvolveConfig(population=EMBEDDED_POPULATION, out=out), resume=True)
    assert stored.remote == ("http://a:1",)
    moved, _, _ = prepare_run(
        EvolveConfig(population=EMBEDDED_POPULATION, out=out, remote=("http://c:3",), remote_api_key="k"), resume=True
    )
    assert moved.remote == ("http://c:3",) and moved.remote_api_key == "k"
