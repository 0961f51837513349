"""The HTTP layer's guard, with the real app and a backend that fails on purpose.

`build_app` runs with its real middleware, routes and error mapping on the embedded population;
only the engine is replaced, by one whose generations raise or hang, so an internal failure,
a deadline and the drain can be triggered exactly. The real engine's paths are in
hostile/test_robustness_e2e.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from ensemble_serve.config import ServeConfig
from ensemble_serve.engine.base import Engine
from ensemble_serve.engine.gate import ScoringGate
from ensemble_serve.http.app import build_app
from ensemble_serve.http.errors import INTERNAL_ERROR_MESSAGE
from ensemble_serve.http.shutdown import Drain
from ensemble_serve.shared.embedded import EMBEDDED_SUBSTRATE
from ensemble_serve.testing.servers import plain_embedded


class BrokenBackend:
    """An `Engine` whose generations raise (`mode="raise"`) or never finish (`"hang"`); the rest is a working engine's."""

    max_model_len = 256
    errored = False

    def __init__(self, mode: str):
        self.mode = mode
        self.tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_SUBSTRATE))
        self.gate = ScoringGate()
        self.cancelled = 0
        self._n = 0

    def next_id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-{self._n}"

    async def generate(self, prompt_ids, params, member, request_id):
        if self.mode == "raise":
            raise RuntimeError("secret internal detail: index 7 out of range")
        await self.gate.acquire_shared()  # as the real engine: the in-flight gauge counts it
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            await self.gate.release_shared()
        yield  # pragma: no cover

    async def score(self, prompt_ids, continuations, member):  # pragma: no cover
        raise AssertionError("not used")

    def set_population(self, population) -> None:  # pragma: no cover
        pass

    def unavailable_members(self) -> list[str]:
        return []

    def inflight(self) -> int:
        return self.gate.state[0]

    def health(self) -> dict[str, Any]:
        return {}

    async def warm(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def _client(mode: str, **config: Any) -> tuple[TestClient, BrokenBackend, Drain]:
    backend = BrokenBackend(mode)
    assert isinstance(backend, Engine)  # the whole interface the service uses
    cfg = ServeConfig(population=plain_embedded(), served_model_name="sandbox-ensemble", watch=False, **config)
    drain = Drain(cfg.shutdown_grace)
    app = build_app(cfg, backend_factory=lambda _cfg, _pop: backend, drain=drain)
    return TestClient(app, raise_server_exceptions=False), backend, drain


CHAT = {"model": "m00", "messages": [{"role": "user", "content": "add 1+2"}], "max_tokens": 8}


def test_an_internal_failure_is_a_500_with_the_request_id_and_nothing_else(caplog: pytest.LogCaptureFixture):
    client, _, _ = _client("raise")
    with client, caplog.at_level(logging.ERROR):
        resp = client.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 500
    rid = resp.headers["x-request-id"]
    error = resp.json()["error"]
    assert error == {
        "message": f"{INTERNAL_ERROR_MESSAGE} Request id: {rid}.",
        "type": "internal_error",
        "param": None,
        "code": None,
    }
    assert "secret" not in resp.text
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert logged and logged[0].exc_info and "index 7 out of range" in str(logged[0].exc_info[1])


def test_a_client_request_id_is_echoed_and_a_strange_one_replaced():
    client, _, _ = _client("raise")
    with client:
        assert client.get("/health", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
        replaced = client.get("/health", headers={"X-Request-Id": "no spaces <allowed>"}).headers["x-request-id"]
    assert replaced.startswith("req-")


def test_a_request_past_its_deadline_is_a_504_and_its_generations_are_aborted():
    client, backend, _ = _client("hang", request_timeout=30)
    with client:
        resp = client.post("/v1/chat/completions", json={**CHAT, "timeout": 0.3})
        assert resp.status_code == 504
        assert resp.json()["error"]["code"] == "request_timeout"
        assert "0.3 s" in resp.json()["error"]["message"]
        assert backend.cancelled == 1 and backend.gate.state == (0, False)
        ens = client.post("/v1/chat/completions", json={**CHAT, "model": "sandbox-ensemble", "timeout": 0.3})
        assert ens.status_code == 504
        assert backend.cancelled == 1 + 8  # every member's generation
        assert backend.gate.state == (0, False)
    client2, backend2, _ = _client("hang", request_timeout=0.3)  # the server's own bound
    with client2:
        assert client2.post("/v1/chat/completions", json={**CHAT, "timeout": 60}).status_code == 504


def test_a_stream_past_its_deadline_ends_with_an_error_event():
    client, backend, _ = _client("hang")
    with client:
        resp = client.post(
            "/v1/chat/completions", json={**CHAT, "model": "sandbox-ensemble", "stream": True, "timeout": 0.3}
        )
        assert resp.status_code == 200
        lines = [line for line in resp.text.splitlines() if line.startswith("data:")]
    assert '"role":"assistant"' in lines[0]
    assert '"code":"request_timeout"' in lines[-2] and lines[-1] == "data: [DONE]"
    assert backend.cancelled == 8


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_a_413_before_it_is_parsed(chunked: bool):
    client, _, _ = _client("raise", max_request_bytes=4096)
    body = b'{"model": "m00", "prompt": "' + b"x" * 5000 + b'"}'
    with client:
        if chunked:
            resp = client.post("/v1/completions", content=iter([body[:3000], body[3000:]]))
        else:
            resp = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "request_too_large"
        assert "4096 bytes" in resp.json()["error"]["message"]
        small = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        assert small.status_code == 404  # under the limit the body is parsed as usual


def test_while_draining_new_requests_get_a_503_and_health_says_so():
    client, backend, drain = _client("hang")
    with client:
        assert client.get("/health").json()["status"] == "ok"
        drain.draining = True
        resp = client.post("/v1/chat/completions", json=CHAT)
        assert resp.status_code == 503 and resp.headers["connection"] == "close"
        assert "shutting down" in resp.json()["error"]["message"]
        assert client.get("/health").status_code == 503
        assert client.get("/metrics").status_code == 200
        assert backend.cancelled == 0  # refused before reaching the engine


def test_the_end_of_the_grace_aborts_requests_in_flight_with_a_503():
    client, backend, drain = _client("hang", shutdown_grace=0.3)
    with client:

        async def begin_soon() -> None:
            await asyncio.sleep(0.2)
            drain.begin()

        client.portal.start_task_soon(begin_soon)
        resp = client.post("/v1/chat/completions", json=CHAT)
        assert resp.status_code == 503
        assert "shutting down" in resp.json()["error"]["message"]
        assert backend.cancelled == 1


def test_the_document_states_the_real_statuses_and_content_types():
    client, _, _ = _client("raise")
    with client:
        doc = client.get("/openapi.json").json()
    text = str(doc)
    assert "422" not in doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "HTTPValidationError" not in text
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "500", "503", "504"} <= set(chat)
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    schemas = doc["components"]["schemas"]
    stop = schemas["CompletionRequest"]["properties"]["stop"]["anyOf"]
    assert {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 8} in stop
    assert schemas["CompletionRequest"]["properties"]["model"]["pattern"] == r"\S"
    members = schemas["EnsembleOptions"]["properties"]["members"]["anyOf"][0]
    assert members == {"type": "integer", "minimum": 1, "maximum": 8}


def test_the_document_says_which_known_fields_are_refused_and_the_server_agrees():
    """Each endpoint's unsupported fields are declared with the values that pass (a fuzzer found a
    chat `suffix` refused although the schema allowed any extra field; `suffix` is not a chat field)."""
    client, _, _ = _client("raise")
    with client:
        schemas = client.get("/openapi.json").json()["components"]["schemas"]
        chat, completion = schemas["ChatCompletionRequest"], schemas["CompletionRequest"]
        assert {"tools", "functions", "logit_bias", "use_beam_search", "response_format"} <= set(chat["properties"])
        assert "suffix" not in chat["properties"]
        assert {"suffix", "logit_bias", "use_beam_search"} <= set(completion["properties"])
        assert "tools" not in completion["properties"]
        assert "Not supported" in chat["properties"]["tools"]["description"]
        # a field of the other endpoint is unknown here, so ignored, not refused
        chat_suffix = client.post("/v1/chat/completions", json={**CHAT, "suffix": ["x"]})
        assert chat_suffix.status_code != 400, chat_suffix.text
        refused = client.post("/v1/chat/completions", json={**CHAT, "tools": [{"type": "function"}]})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"
