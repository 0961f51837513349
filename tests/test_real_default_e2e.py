"""The embedded default as a newcomer meets it: `ensemble-serve up` with no options, on the real model.

The server converts the packaged SmolLM2-135M-Instruct GGUF into the user cache on its first start
(reused afterwards), serves the shipped specialists on it, and a natural question asked with the
official openai client gets a voted answer read from natural replies. A shipped copy whose manifest
names its base by fingerprint only is refused in one line when served as a plain --population.
Slow: starts vLLM once on the real model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ensemble_serve.cli import main as serve_main
from ensemble_serve.shared.embedded import EMBEDDED_REAL_NAME, EMBEDDED_REAL_POPULATION
from ensemble_serve.shared.population import read_manifest
from ensemble_serve.shared.voting.answers import answers_equal
from ensemble_serve.testing.servers import Server, ensemble_command, free_port, launch, wait_healthy

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def two_default_servers(tmp_path_factory: pytest.TempPathFactory):
    """Two `ensemble-serve up` with no options, started at the same moment on an empty model cache."""
    root = tmp_path_factory.mktemp("real-default")
    env = {"ENSEMBLE_SERVE_CACHE": str(root / "cache")}
    servers = []
    for i in range(2):
        port = free_port()
        servers.append(launch(Server, f"ensemble-serve-{i}", ensemble_command(port), port, root / f"{i}.log", env=env))
    try:
        wait_healthy(servers, timeout=900)
    except RuntimeError:
        for s in servers:
            s.kill()
        raise
    yield root, servers
    for s in servers:
        s.kill()


@pytest.fixture(scope="module")
def default_server(two_default_servers) -> Server:
    return two_default_servers[1][0]


def test_two_servers_on_a_cold_cache_convert_once_and_both_serve(two_default_servers):
    root, servers = two_default_servers
    logs = [s.log.read_text(errors="replace") for s in servers]
    assert sum(log.count("converting SmolLM2-135M-Instruct.Q4_1.gguf") for log in logs) == 1, logs
    models = sorted(p.name for p in (root / "cache" / "models").iterdir() if not p.name.startswith("."))
    assert len(models) == 1 and (root / "cache" / "models" / models[0] / "CONVERTED").is_file()
    for s in servers:
        assert EMBEDDED_REAL_NAME in {m.id for m in s.client().models.list().data}


def test_the_default_serves_the_real_ensemble(default_server: Server):
    models = {m.id: m for m in default_server.client().models.list().data}
    manifest = read_manifest(EMBEDDED_REAL_POPULATION)
    assert EMBEDDED_REAL_NAME in models and manifest.base_model.name in models
    assert {m.name for m in manifest.members} <= set(models)


@pytest.mark.parametrize("system", [None, "You are a careful assistant."])
def test_a_natural_question_gets_a_voted_answer(default_server: Server, system: str | None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "Maya has 12 apples and buys 5 more. How many apples does Maya have now?"}
    ]
    resp = default_server.client(timeout=600).chat.completions.create(
        model=EMBEDDED_REAL_NAME, messages=messages, temperature=0.7, max_tokens=128
    )
    ens = resp.model_extra["ensemble"]
    text = resp.choices[0].message.content
    assert text and resp.usage.completion_tokens > 0
    # the members write "... The answer is N.": the vote reads an answer and the reply carries it
    assert ens["answer"] is not None and ens["votes"] and ens["agreement"] > 0
    assert len(ens["failed"]) < len(ens["members"])
    assert any(answers_equal(ens["answer"], word) for word in text.replace(".", " ").split())


def test_a_shipped_copy_without_its_base_path_is_refused_in_one_line(tmp_path: Path):
    copy = tmp_path / "real"
    shutil.copytree(EMBEDDED_REAL_POPULATION, copy)
    result = CliRunner().invoke(serve_main, ["up", "--population", str(copy)])
    assert result.exit_code == 1
    assert "by fingerprint only" in result.output and "base_model.path" in result.output
    assert "Traceback" not in result.output


def test_an_unknown_embedded_ensemble_is_a_usage_error():
    result = CliRunner().invoke(serve_main, ["up", "--embedded", "toy"])
    assert result.exit_code == 2 and "embedded" in result.output


def test_a_toy_lora_offered_to_the_real_base_is_refused_by_name_and_by_shape(two_default_servers, tmp_path: Path):
    from ensemble_serve.shared.bring_your_own import AdapterSpec, import_adapters
    from ensemble_serve.shared.embedded import EMBEDDED_POPULATION
    from ensemble_serve.shared.population import PopulationError

    root, _ = two_default_servers
    real_base = next(p for p in (root / "cache" / "models").iterdir() if not p.name.startswith("."))
    toy_member = EMBEDDED_POPULATION / "members" / "m00"  # a LoRA of the sandbox's from-scratch toy
    for kw, words in (({}, "adapter 'm00' was trained on"), ({"ignore_base_name": True}, "made for another base")):
        with pytest.raises(PopulationError, match=words):
            import_adapters(real_base, [AdapterSpec("m00", toy_member)], tmp_path / "pop", **kw)
        assert not (tmp_path / "pop").exists()
