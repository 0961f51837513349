"""The vote in response headers (ensemble_serve/http/headers.py), read back as the LangChain example does.

The real path (the real server, LangChain's `ChatOpenAI(include_response_headers=True)`) is in
test_server_e2e.py::test_client_examples_work.
"""

from __future__ import annotations

from types import SimpleNamespace
from urllib.parse import unquote

from test_api_guard import _client

from clients.langchain_example import vote_of
from ensemble_serve.http.headers import HEADERS, MAX_ANSWER_CHARS, ensemble_headers
from ensemble_serve.protocol.responses import (
    ChatCompletionChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    EnsembleInfo,
    ResponseMessage,
    UsageInfo,
)


def _chat(info: EnsembleInfo | None) -> ChatCompletionResponse:
    choice = ChatCompletionChoice(index=0, message=ResponseMessage(content="x"))
    return ChatCompletionResponse(model="ensemble", choices=[choice], usage=UsageInfo(), ensemble=info)


def test_an_ensemble_answer_carries_its_vote_in_ascii_headers() -> None:
    info = EnsembleInfo(
        answer="843", agreement=2 / 3, votes={"843": 2, "842": 1}, members=["a", "b", "c"], rule="cross"
    )
    headers = ensemble_headers(_chat(info))
    assert headers == {
        "x-ensemble-answer": "843",
        "x-ensemble-agreement": "0.6667",
        "x-ensemble-members": "a,b,c",
        "x-ensemble-rule": "cross",
    }
    assert set(headers) <= set(HEADERS)


def test_any_answer_and_member_name_survives_the_encoding() -> None:
    answer = "Paris, France: 52 °C — «ça va»\r\nX-Injected: 1"
    members = ["qwen,lora", "ünï", "a b"]
    headers = ensemble_headers(_chat(EnsembleInfo(answer=answer, agreement=1.0, members=members)))
    for value in headers.values():
        value.encode("ascii")  # header values must be latin-1; these are plain ASCII
        assert "\r" not in value and "\n" not in value
    message = SimpleNamespace(response_metadata={"headers": headers})
    vote = vote_of(message)
    assert vote == {
        "answer": answer,
        "answer_truncated": False,
        "agreement": 1.0,
        "members": members,
        "rule": "majority",
    }


def test_a_long_answer_is_cut_and_says_so() -> None:
    long = "é" * (MAX_ANSWER_CHARS + 10)
    headers = ensemble_headers(_chat(EnsembleInfo(answer=long, agreement=0.5, members=["a"])))
    assert unquote(headers["x-ensemble-answer"]) == long[:MAX_ANSWER_CHARS]
    assert headers["x-ensemble-answer-truncated"] == "true"


def test_no_answer_no_answer_headers_and_no_vote_no_headers() -> None:
    headers = ensemble_headers(_chat(EnsembleInfo(answer=None, agreement=None, members=["a", "b"])))
    assert headers == {"x-ensemble-members": "a,b", "x-ensemble-rule": "majority"}
    assert vote_of(SimpleNamespace(response_metadata={"headers": headers}))["answer"] is None
    assert ensemble_headers(_chat(None)) == {}  # a member's answer
    several = CompletionResponse(
        model="ensemble",
        choices=[CompletionChoice(index=i, text="x", ensemble=EnsembleInfo(answer="1")) for i in range(2)],
        usage=UsageInfo(),
        ensemble=None,
    )
    assert ensemble_headers(several) == {}  # one vote per prompt: in the body only
    assert vote_of(SimpleNamespace(response_metadata={})) is None


def test_the_document_declares_the_headers_on_both_generation_routes() -> None:
    client, _, _ = _client("raise")
    with client:
        doc = client.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        declared = doc["paths"][path]["post"]["responses"]["200"]["headers"]
        assert set(declared) == set(HEADERS)
        assert all(h["required"] is False and h["schema"] == {"type": "string"} for h in declared.values())
