"""The embedded default as shipped, in the real server: 12 specialists, their router, their reliability
table and the request defaults the specialists benchmark chose (`bench/specialists.py`).

A request with no `ensemble` options must get those defaults: routed top-k members, a calibrated
vote, several samples per member when sampling (one when greedy), and a system message must not
break it. Slow: starts vLLM once.
"""

from __future__ import annotations

import openai
import pytest

from ensemble_serve.shared.population import read_manifest
from ensemble_serve.testing.servers import copy_embedded, start_server
from trainer.tasks.sandbox import generate_problems, verify

pytestmark = pytest.mark.engine

ENSEMBLE = "sandbox-ensemble"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("shipped")
    population = copy_embedded(root, as_shipped=True)
    srv = start_server(population, root / "server.log", "--no-watch", "--served-model-name", ENSEMBLE)
    yield srv, read_manifest(population)
    srv.kill()


def _ask(client: openai.OpenAI, prompt: str, system: str | None = None, **kw):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return client.chat.completions.create(model=ENSEMBLE, messages=messages, max_tokens=96, **kw)


def test_the_shipped_population_has_specialists_a_router_a_table_and_defaults(shipped):
    _, manifest = shipped
    assert len(manifest.members) >= 12 and manifest.router and manifest.reliability and manifest.ensemble_defaults
    focus = [m.info.get("focus_domain") for m in manifest.members]
    assert all(focus.count(d) >= 2 for d in ("add", "sub", "expr", "sort", "mod", "lookup"))


def test_a_request_with_no_options_gets_the_population_s_defaults(shipped):
    srv, manifest = shipped
    defaults = manifest.ensemble_defaults
    client = srv.client()
    resp = _ask(client, "add 4785+3652", temperature=0.7, extra_body={"ensemble": {"return_chains": True}})
    ens = resp.model_extra["ensemble"]
    assert ens["rule"] == defaults["vote"]
    if defaults.get("route", True) is not False:
        assert ens["routing"]["used"] is True and len(ens["members"]) == defaults["members"]
    assert len(ens["chains"]) == len(ens["members"]) * defaults.get("samples_per_member", 1)
    if defaults["vote"] == "calibrated":
        assert ens["calibration"]["used"] is True and ens["calibration"]["domain"] == "add"
    # greedy: a default of several samples per member becomes one (greedy samples are identical), not a 400
    greedy = _ask(client, "add 4785+3652", temperature=0.0, extra_body={"ensemble": {"return_chains": True}})
    g = greedy.model_extra["ensemble"]
    assert len(g["chains"]) == len(g["members"])


def test_a_system_message_keeps_the_default_answering(shipped):
    """The substrate and the specialists saw system messages in training (an unseen one here); the
    accuracy effect is measured by bench/specialists.py, this checks the path and that answers stay right."""
    srv, _ = shipped
    client = srv.client()
    problems = generate_problems(12, seed=11, split="heldout", difficulties=[1, 2])
    right = {None: 0, "sys": 0}
    for p in problems:
        for key, system in ((None, None), ("sys", "You are a concise assistant. Think step by step.")):
            text = _ask(client, p.prompt, system, temperature=0.0).choices[0].message.content or ""
            right[key] += verify(p, text).correct
    assert right[None] >= 6 and right["sys"] >= right[None] - 3, right
