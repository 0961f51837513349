"""The wire format: request validation, its translation to SamplingParams, the error shape, response layout.

A small FastAPI app with the project's models and error handlers stands in for the server; its
"tokenizer" counts words, and its context is MAX_MODEL_LEN tokens.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient

from ensemble_serve.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    NotImplementedAPIError,
    ParameterError,
    RequestTooLargeError,
    ServiceUnavailableError,
)
from ensemble_serve.http.errors import (
    EMPTY_BODY_MESSAGE,
    INTERNAL_ERROR_MESSAGE,
    INVALID_JSON_MESSAGE,
    NOT_AN_OBJECT_MESSAGE,
    NOT_JSON_MESSAGE,
    error_response,
    install_error_handlers,
)
from ensemble_serve.protocol import (
    MAX_PROMPTS,
    MIN_TIMEOUT_S,
    VOTE_RULES,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    EnsembleChain,
    EnsembleInfo,
    EnsembleOptions,
    FailedChain,
    ModelCard,
    ModelList,
    ResponseMessage,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
    chat_text,
    random_id,
    sampling_kwargs,
)

MAX_MODEL_LEN = 64


def _words(text: str) -> int:
    return len(text.split())


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    def chat(req: ChatCompletionRequest) -> dict[str, Any]:
        prompt_tokens = sum(_words(m["content"]) for m in chat_text(req.messages))
        return sampling_kwargs(req, max_model_len=MAX_MODEL_LEN, prompt_tokens=prompt_tokens)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> dict[str, Any]:
        prompt_tokens = max(_words(p) for p in req.prompts)
        return sampling_kwargs(req, max_model_len=MAX_MODEL_LEN, prompt_tokens=prompt_tokens)

    @app.get("/raise/{kind}")
    def raise_(kind: str) -> None:
        if kind == "crash":
            raise RuntimeError("secret detail: token=abc")
        if kind == "missing-model":
            raise NotFoundError("The model 'nope' does not exist", param="model")
        if kind == "not-implemented":
            raise NotImplementedError("beam search is not implemented")
        if kind == "value":
            raise ValueError("bad value")
        if kind == "busy":
            raise ServiceUnavailableError("the engine is starting", headers={"Retry-After": "5"})
        if kind == "bad-response":
            UsageInfo(prompt_tokens="many")  # a server bug: not the client's fault
        if kind == "http":
            raise HTTPException(status_code=404, detail="no member named 'm9'")
        if kind == "param-value":
            raise ParameterError("must name a loaded member", param="model")
        if kind == "query-int":
            raise RequestValidationError(
                [
                    {
                        "type": "int_parsing",
                        "loc": ("query", "limit"),
                        "msg": "Input should be a valid integer",
                        "input": "x",
                    }
                ]
            )

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(make_app(), raise_server_exceptions=False)


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": "ensemble", "messages": [{"role": "user", "content": "what is two plus two"}], **fields}


def completion_body(**fields: Any) -> dict[str, Any]:
    return {"model": "member-0", "prompt": "two plus two is", **fields}


def api_error(resp: Any, status: int) -> dict[str, Any]:
    """The error object of `resp`, after checking the status and OpenAI's exact layout."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert list(body) == ["error"]
    assert list(body["error"]) == ["message", "type", "param", "code"]
    return body["error"]


# ---------------------------------------------------------------------------
# Valid requests -> SamplingParams kwargs
# ---------------------------------------------------------------------------


def test_valid_chat_request_fills_the_context_and_uses_openai_defaults(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", json=chat_body())
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "n": 1,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "seed": None,
        "stop": [],
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": MAX_MODEL_LEN - 5,
        "logprobs": None,
        "ignore_eos": False,
        "skip_special_tokens": True,
    }


def test_valid_chat_request_with_every_option(client: TestClient) -> None:
    body = chat_body(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "two plus"}, {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": None},
        ],
        max_tokens=30,
        max_completion_tokens=20,
        temperature=0.7,
        top_p=0.9,
        top_k=-1,
        min_p=0.05,
        n=4,
        stop="####",
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        logprobs=True,
        top_logprobs=3,
        stream=True,
        stream_options={"include_usage": True},
        user="u1",
        ignore_eos=True,
        ensemble={
            "members": ["m0", "m1"],
            "samples_per_member": 2,
            "vote": "cross",
            "answer": {"regex": r"#### (\d+)"},
            "early_stop": True,
            "return_chains": True,
        },
        # Unknown fields and neutral values of unsupported features are ignored.
        frequency_bonus=3,
        tools=[],
        logit_bias={},
        response_format={"type": "text"},
        tool_choice="none",
    )
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    kwargs = resp.json()
    assert kwargs["max_tokens"] == 20  # max_completion_tokens wins over the deprecated max_tokens
    assert kwargs["logprobs"] == 3
    assert kwargs["stop"] == ["####"]
    assert (kwargs["n"], kwargs["top_k"], kwargs["seed"], kwargs["ignore_eos"]) == (4, -1, 7, True)


def test_chat_request_model_parses_text_parts_roles_and_ensemble() -> None:
    req = ChatCompletionRequest.model_validate(
        chat_body(
            messages=[
                {"role": "developer", "content": "sys"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None, "tool_calls": []},
            ],
            ensemble={"members": 3, "vote": "weighted", "answer": "number"},
        )
    )
    assert chat_text(req.messages) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]
    assert req.ensemble == EnsembleOptions(members=3, vote="weighted", answer="number")
    assert not hasattr(req, "tool_calls") and "frequency_bonus" not in req.model_dump()


def test_null_means_default_and_unknown_fields_are_dropped() -> None:
    req = ChatCompletionRequest.model_validate(chat_body(n=None, stream=None, logprobs=None, stop=None, foo="bar"))
    assert (req.n, req.stream, req.logprobs, req.stop) == (1, False, False, None)
    assert "foo" not in req.model_dump()
    assert EnsembleOptions.model_validate({"vote": None, "members": None}) == EnsembleOptions()


def test_completion_defaults_to_16_tokens_clamped_to_the_context(client: TestClient) -> None:
    assert client.post("/v1/completions", json=completion_body()).json()["max_tokens"] == 16
    long_prompt = " ".join(["w"] * 60)
    kwargs = client.post("/v1/completions", json=completion_body(prompt=long_prompt)).json()
    assert kwargs["max_tokens"] == 4  # the default does not fit: clamped, not an error
    kwargs = client.post("/v1/completions", json=completion_body(prompt=["a b", "c"], logprobs=2, echo=False)).json()
    assert (kwargs["max_tokens"], kwargs["logprobs"]) == (16, 2)


def test_sampling_kwargs_defaults_fill_what_the_request_leaves_unset() -> None:
    req = ChatCompletionRequest.model_validate(chat_body(temperature=0.0))
    defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 8}
    kwargs = sampling_kwargs(req, max_model_len=100, prompt_tokens=10, defaults=defaults)
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (0.0, 0.95, 20)
    assert (kwargs["repetition_penalty"], kwargs["max_tokens"]) == (1.05, 8)
    assert sampling_kwargs(req, max_model_len=100, prompt_tokens=95, defaults=defaults)["max_tokens"] == 5


def test_sampling_kwargs_build_real_sampling_params() -> None:
    from vllm import SamplingParams

    requests = [
        ChatCompletionRequest.model_validate(chat_body()),
        ChatCompletionRequest.model_validate(
            chat_body(
                temperature=0.5,
                top_k=-1,
                n=3,
                stop=["\n\n", "####"],
                seed=1,
                logprobs=True,
                top_logprobs=5,
                max_tokens=10,
                presence_penalty=2,
                frequency_penalty=-2,
                repetition_penalty=1.3,
                ignore_eos=True,
            )
        ),
        ChatCompletionRequest.model_validate(chat_body(temperature=2, top_p=0.01, top_k=50, min_p=1, logprobs=True)),
        CompletionRequest.model_validate(completion_body()),
        CompletionRequest.model_validate(completion_body(prompt=["a", "b"], logprobs=0, max_tokens=1, stop="x")),
        CompletionRequest.model_validate(completion_body(temperature=0, top_k=5, seed=-1)),  # greedy
    ]
    for req in requests:
        kwargs = sampling_kwargs(req, max_model_len=2048, prompt_tokens=100)
        params = SamplingParams(**kwargs)
        greedy = kwargs["temperature"] == 0  # vLLM then resets top_p/top_k/min_p
        for name, value in kwargs.items():
            if not (greedy and name in ("top_p", "top_k", "min_p")) and not (name == "seed" and value == -1):
                assert getattr(params, name) == value, name
    assert SamplingParams(**sampling_kwargs(requests[1], max_model_len=2048, prompt_tokens=100)).logprobs == 5
    assert SamplingParams(**sampling_kwargs(requests[0], max_model_len=2048, prompt_tokens=100)).max_tokens == 1948


# ---------------------------------------------------------------------------
# Invalid requests -> 400 in OpenAI's shape
# ---------------------------------------------------------------------------

ENSEMBLE_OPTIONS = "members, samples_per_member, vote, answer, early_stop, return_chains, mode, route, adaptive"

CHAT_CASES = [
    # (request fields, param, message)
    ({"n": "two"}, "n", "n: Input should be a valid integer (got 'two')"),
    ({"n": True}, "n", "n: Input should be a valid integer (got true)"),
    ({"messages": "hi"}, "messages", "messages: Input should be a valid list (got 'hi')"),
    ({"messages": []}, "messages", "messages: List should have at least 1 item after validation, not 0"),
    ({"max_tokens": -5}, "max_tokens", "max_tokens: Input should be greater than or equal to 1 (got -5)"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens: Input should be greater than or equal to 1 (got 0)"),
    (
        {"max_completion_tokens": 1.5},
        "max_completion_tokens",
        "max_completion_tokens: Input should be a valid integer (got 1.5)",
    ),
    ({"n": 0}, "n", "n: Input should be greater than or equal to 1 (got 0)"),
    ({"n": 1000}, "n", "n: Input should be less than or equal to 128 (got 1000)"),
    ({"temperature": -1}, "temperature", "temperature: Input should be greater than or equal to 0 (got -1)"),
    ({"temperature": 5}, "temperature", "temperature: Input should be less than or equal to 2 (got 5)"),
    ({"top_p": 0}, "top_p", "top_p: Input should be greater than 0 (got 0)"),
    ({"top_k": -2}, "top_k", "top_k: Input should be greater than or equal to -1 (got -2)"),
    (
        {"presence_penalty": 2.5},
        "presence_penalty",
        "presence_penalty: Input should be less than or equal to 2 (got 2.5)",
    ),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty: Input should be greater than 0 (got 0)"),
    (
        {"top_logprobs": 21, "logprobs": True},
        "top_logprobs",
        "top_logprobs: Input should be less than or equal to 20 (got 21)",
    ),
    ({"top_logprobs": 2}, "top_logprobs", "top_logprobs: requires logprobs to be true"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream_options: only allowed when stream is true"),
    ({"stop": [str(i) for i in range(9)]}, "stop", "stop: at most 8 stop sequences are allowed, got 9"),
    ({"stop": ["ok", ""]}, "stop", "stop: stop sequences must be non-empty strings"),
    ({"stop": 3}, "stop", "stop: must be a string or a list of strings"),
    (
        {"seed": 2**64},
        "seed",
        "seed: Input should be less than or equal to 9223372036854775807 (got 18446744073709551616)",
    ),
    ({"model": ""}, "model", "model: must be a non-empty model name"),
    ({"model": None}, "model", "model: Input should be a valid string (got null)"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools: not supported by this server"),
    ({"response_format": {"type": "json_object"}}, "response_format", "response_format: not supported by this server"),
    (
        {"messages": [{"role": "robot", "content": "hi"}]},
        "messages[0].role",
        "messages[0].role: Input should be 'system', 'user', 'assistant', 'tool' or 'developer' (got 'robot')",
    ),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "messages[0].content: required for a user message"),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            ]
        },
        "messages[0].content",
        "messages[0].content: only text content is supported; got a part of type 'image_url'",
    ),
    (
        {"messages": [{"role": "user", "content": 5}]},
        "messages[0].content",
        "messages[0].content: must be a string or a list of text parts",
    ),
    # The ensemble object.
    (
        {"ensemble": {"samples_per_member": 0}},
        "ensemble.samples_per_member",
        "ensemble.samples_per_member: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        {"ensemble": {"samples_per_member": 1000}},
        "ensemble.samples_per_member",
        "ensemble.samples_per_member: Input should be less than or equal to 32 (got 1000)",
    ),
    (
        {"ensemble": {"vote": "plurality"}},
        "ensemble.vote",
        "ensemble.vote: unknown vote rule 'plurality'; valid rules: majority, weighted, cross, calibrated",
    ),
    (
        {"ensemble": {"answer": "fuzzy"}},
        "ensemble.answer",
        (
            "ensemble.answer: unknown answer mode 'fuzzy'; valid modes: auto, marked, boxed, number, choice, text, natural, "
            "or {'regex': PATTERN}"
        ),
    ),
    (
        {"ensemble": {"answer": {"regex": "(\\d+"}}},
        "ensemble.answer",
        "ensemble.answer: invalid answer regex '(\\\\d+': missing ), unterminated subpattern at position 0",
    ),
    (
        {"ensemble": {"answer": {"pattern": "x"}}},
        "ensemble.answer",
        "ensemble.answer: an answer spec dict must have exactly the key 'regex', got keys ['pattern']",
    ),
    ({"ensemble": {"members": []}}, "ensemble.members", "ensemble.members: must not be an empty list"),
    (
        {"ensemble": {"members": ["m0", "m1", "m0"]}},
        "ensemble.members",
        "ensemble.members: must be unique; repeated: 'm0'",
    ),
    ({"ensemble": {"members": 0}}, "ensemble.members", "ensemble.members: must be at least 1, got 0"),
    (
        {"ensemble": {"members": True}},
        "ensemble.members",
        "ensemble.members: must be a member count (an integer >= 1) or a list of member names",
    ),
    (
        {"ensemble": {"members": ["m0", ""]}},
        "ensemble.members",
        "ensemble.members: member names must be non-empty strings",
    ),
    (
        {"ensemble": {"votes": "majority"}},
        "ensemble.votes",
        f"ensemble.votes: unknown ensemble option 'votes'; did you mean 'vote'? valid options: {ENSEMBLE_OPTIONS}",
    ),
    (
        {"ensemble": {"early_stop": "yes"}},
        "ensemble.early_stop",
        "ensemble.early_stop: Input should be a valid boolean (got 'yes')",
    ),
    (
        {"ensemble": "all"},
        "ensemble",
        "ensemble: Input should be a valid dictionary or object to extract fields from (got 'all')",
    ),
]


@pytest.mark.parametrize(("fields", "param", "message"), CHAT_CASES, ids=[c[1] + ":" + c[2][-30:] for c in CHAT_CASES])
def test_invalid_chat_requests_are_400s_naming_the_parameter(
    client: TestClient, fields: dict[str, Any], param: str, message: str
) -> None:
    error = api_error(client.post("/v1/chat/completions", json=chat_body(**fields)), 400)
    assert error == {"message": message, "type": "invalid_request_error", "param": param, "code": None}


PROMPT_SHAPES = "must be a string, a list of strings, a list of token ids or a list of token-id lists"
COMPLETION_CASES = [
    ({"prompt": []}, "prompt", "prompt: must not be an empty list"),
    ({"prompt": ""}, "prompt", "prompt: must not be empty or only whitespace"),
    ({"prompt": " \n\t"}, "prompt", "prompt: must not be empty or only whitespace"),
    ({"prompt": ["a", " "]}, "prompt", "prompt: prompt 1 must not be empty or only whitespace"),
    ({"prompt": [[1], []]}, "prompt", "prompt: prompt 1 is an empty list of token ids"),
    ({"prompt": [1, -2]}, "prompt", "prompt: token ids must be integers >= 0"),
    ({"prompt": [[1], [True]]}, "prompt", "prompt: prompt 1: token ids must be integers >= 0"),
    ({"prompt": ["a", 1]}, "prompt", f"prompt: {PROMPT_SHAPES}"),
    ({"prompt": [[1], "a"]}, "prompt", f"prompt: {PROMPT_SHAPES}"),
    ({"prompt": None}, "prompt", f"prompt: {PROMPT_SHAPES}"),
    ({"echo": True}, "echo", "echo: echo is not supported"),
    ({"logprobs": 21}, "logprobs", "logprobs: Input should be less than or equal to 20 (got 21)"),
    ({"logprobs": True}, "logprobs", "logprobs: Input should be a valid integer (got true)"),
    ({"suffix": "!"}, "suffix", "suffix: not supported by this server"),
    ({"max_tokens": -1}, "max_tokens", "max_tokens: Input should be greater than or equal to 1 (got -1)"),
]


@pytest.mark.parametrize(("fields", "param", "message"), COMPLETION_CASES, ids=[c[2] for c in COMPLETION_CASES])
def test_invalid_completion_requests_are_400s(
    client: TestClient, fields: dict[str, Any], param: str, message: str
) -> None:
    error = api_error(client.post("/v1/completions", json=completion_body(**fields)), 400)
    assert error == {"message": message, "type": "invalid_request_error", "param": param, "code": None}


@pytest.mark.parametrize("timeout", [5e-324, 0.0, 0.000999, -1.0])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_a_timeout_below_the_minimum_is_a_400_naming_it(client: TestClient, route: str, timeout: float) -> None:
    # found by fuzzing: 5e-324 s was schema-valid and answered 504, a deadline no request can meet
    body = chat_body if route == "/v1/chat/completions" else completion_body
    error = api_error(client.post(route, json=body(timeout=timeout)), 400)
    got = json.dumps(timeout)
    assert error == {
        "message": f"timeout: Input should be greater than or equal to {MIN_TIMEOUT_S:g} (got {got})",
        "type": "invalid_request_error",
        "param": "timeout",
        "code": None,
    }
    assert client.post(route, json=body(timeout=MIN_TIMEOUT_S)).status_code == 200  # the minimum itself is valid
    for model in (ChatCompletionRequest, CompletionRequest):
        (number,) = [
            s for s in model.model_json_schema()["properties"]["timeout"]["anyOf"] if s.get("type") == "number"
        ]
        assert number["minimum"] == MIN_TIMEOUT_S == 0.001


def test_missing_fields_are_named(client: TestClient) -> None:
    error = api_error(client.post("/v1/chat/completions", json={"messages": []}), 400)
    assert error["param"] == "model"
    assert (
        error["message"] == "model: Field required; messages: List should have at least 1 item after validation, not 0"
    )
    error = api_error(client.post("/v1/completions", json={"model": "m"}), 400)
    assert (error["param"], error["message"]) == ("prompt", "prompt: Field required")


def test_many_errors_are_reported_bounded(client: TestClient) -> None:
    messages = [{"role": "robot", "content": "x"}] * 50
    error = api_error(client.post("/v1/chat/completions", json=chat_body(messages=messages)), 400)
    assert error["param"] == "messages[0].role"
    assert error["message"].count("messages[") == 5
    assert error["message"].endswith("; and 45 more")


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_floats_are_rejected(client: TestClient, token: bytes) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": ' + token + b"}"
    resp = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    error = api_error(resp, 400)
    assert error["param"] == "temperature"
    assert error["message"].startswith("temperature: Input should be a finite number (got ")


@pytest.mark.parametrize("body", [b'{"model": ', b"{'model': 'm'}", b'{"model": "m",}', b"\xff\xfe"])
def test_malformed_json_is_a_400(client: TestClient, body: bytes) -> None:
    resp = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert api_error(resp, 400) == {
        "message": INVALID_JSON_MESSAGE,
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"", {"content-type": "application/json"}, EMPTY_BODY_MESSAGE),
        (b"[1, 2]", {"content-type": "application/json"}, NOT_AN_OBJECT_MESSAGE),
        (b'"hello"', {"content-type": "application/json"}, NOT_AN_OBJECT_MESSAGE),
        (b'{"model": "m", "prompt": "hi"}', {"content-type": "text/plain"}, NOT_JSON_MESSAGE),
        (b'{"model": "m", "prompt": "hi"}', {}, NOT_JSON_MESSAGE),
    ],
)
def test_bodies_that_are_not_json_objects(client: TestClient, body: bytes, headers: dict, message: str) -> None:
    error = api_error(client.post("/v1/completions", content=body, headers=headers), 400)
    assert (error["message"], error["param"]) == (message, None)


def test_prompt_too_long_for_the_context(client: TestClient) -> None:
    words = " ".join(["w"] * MAX_MODEL_LEN)
    error = api_error(
        client.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": words}])), 400
    )
    assert error == {
        "message": "This model's maximum context length is 64 tokens. However, your request has 64 input tokens. "
        "Please reduce the length of the messages.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
    error = api_error(client.post("/v1/completions", json=completion_body(prompt=["a", words + " w"])), 400)
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
    assert "your request has 65 input tokens. Please reduce the length of the prompt." in error["message"]


@pytest.mark.parametrize(
    ("route", "fields", "param", "requested"),
    [
        ("/v1/chat/completions", {"max_tokens": 60}, "max_tokens", "65 tokens (5 in the messages, 60 in"),
        (
            "/v1/chat/completions",
            {"max_completion_tokens": 10**12},
            "max_completion_tokens",
            "1000000000005 tokens (5 in the messages, 1000000000000 in",
        ),
        ("/v1/completions", {"max_tokens": 62}, "max_tokens", "66 tokens (4 in the prompt, 62 in"),
    ],
)
def test_max_tokens_past_the_context(client: TestClient, route: str, fields: dict, param: str, requested: str) -> None:
    body = chat_body(**fields) if "chat" in route else completion_body(**fields)
    error = api_error(client.post(route, json=body), 400)
    what = "messages" if "chat" in route else "prompt"
    assert error == {
        "message": f"This model's maximum context length is 64 tokens. However, you requested {requested} the "
        f"completion). Please reduce the length of the {what} or completion.",
        "type": "invalid_request_error",
        "param": param,
        "code": "context_length_exceeded",
    }


def test_greedy_sampling_allows_only_one_choice(client: TestClient) -> None:
    error = api_error(client.post("/v1/chat/completions", json=chat_body(temperature=0, n=2)), 400)
    assert error == {
        "message": "n must be 1 when temperature is 0 (greedy sampling), got n=2",
        "type": "invalid_request_error",
        "param": "n",
        "code": "invalid_value",
    }
    assert client.post("/v1/chat/completions", json=chat_body(temperature=0)).status_code == 200


def test_prompt_lists_are_bounded(client: TestClient) -> None:
    ok = client.post("/v1/completions", json=completion_body(prompt=["a"] * MAX_PROMPTS))
    assert ok.status_code == 200, ok.text
    error = api_error(client.post("/v1/completions", json=completion_body(prompt=["a"] * (MAX_PROMPTS + 1))), 400)
    assert (
        error["message"] == f"prompt: at most {MAX_PROMPTS} prompts are allowed in one request, got {MAX_PROMPTS + 1}"
    )


def test_max_tokens_exactly_filling_the_context_is_fine(client: TestClient) -> None:
    assert client.post("/v1/chat/completions", json=chat_body(max_tokens=59)).json()["max_tokens"] == 59


# ---------------------------------------------------------------------------
# Routing errors, raised errors and the status mapping
# ---------------------------------------------------------------------------


def test_unknown_route_is_a_404_in_the_same_shape(client: TestClient) -> None:
    assert api_error(client.post("/v1/nope", json={}), 404) == {
        "message": "Invalid URL (POST /v1/nope)",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_wrong_method_is_a_405_in_the_same_shape(client: TestClient) -> None:
    resp = client.get("/v1/chat/completions")
    assert api_error(resp, 405) == {
        "message": "Method not allowed (GET /v1/chat/completions)",
        "type": "invalid_request_error",
        "param": None,
        "code": "method_not_allowed",
    }
    assert resp.headers["allow"] == "POST"


def test_raised_errors_get_their_status(client: TestClient) -> None:
    assert api_error(client.get("/raise/missing-model"), 404) == {
        "message": "The model 'nope' does not exist",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert api_error(client.get("/raise/not-implemented"), 501) == {
        "message": "beam search is not implemented",
        "type": "not_implemented",
        "param": None,
        "code": None,
    }
    # a plain ValueError inside the server is the server's fault: client errors have their own types
    assert api_error(client.get("/raise/value"), 500)["message"] == INTERNAL_ERROR_MESSAGE
    resp = client.get("/raise/busy")
    assert api_error(resp, 503)["type"] == "service_unavailable"
    assert resp.headers["retry-after"] == "5"
    assert api_error(client.get("/raise/http"), 404) == {  # an endpoint's own 404 keeps its message
        "message": "no member named 'm9'",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert api_error(client.get("/raise/param-value"), 400) == {
        "message": "must name a loaded member",
        "type": "invalid_request_error",
        "param": "model",
        "code": None,
    }
    assert api_error(client.get("/raise/query-int"), 400) == {
        "message": "limit: Input should be a valid integer (got 'x')",
        "type": "invalid_request_error",
        "param": "limit",
        "code": None,
    }


def test_plain_string_validation_errors_are_400s() -> None:
    resp = error_response(RequestValidationError(["Unsupported Media Type: only application/json is allowed"]))
    assert resp.status_code == 400
    assert json.loads(resp.body)["error"] == {
        "message": "Unsupported Media Type: only application/json is allowed",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_crashes_are_500s_that_leak_nothing(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="ensemble_serve.errors"):
        resp = client.get("/raise/crash")
    assert api_error(resp, 500) == {
        "message": INTERNAL_ERROR_MESSAGE,
        "type": "internal_error",
        "param": None,
        "code": None,
    }
    assert "secret" not in resp.text
    assert any("RuntimeError" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_response_model_that_fails_validation_is_a_500_not_a_400(client: TestClient) -> None:
    assert api_error(client.get("/raise/bad-response"), 500)["message"] == INTERNAL_ERROR_MESSAGE


@pytest.mark.parametrize(
    ("exc", "status", "type_", "code"),
    [
        (BadRequestError("x", param="n"), 400, "invalid_request_error", None),
        (AuthenticationError("x"), 401, "authentication_error", "invalid_api_key"),
        (NotFoundError("x"), 404, "invalid_request_error", "model_not_found"),
        (NotFoundError("x", code="adapter_not_found"), 404, "invalid_request_error", "adapter_not_found"),
        (RequestTooLargeError("x"), 413, "invalid_request_error", "request_too_large"),
        (InternalServerError("x"), 500, "internal_error", None),
        (APIError("x"), 500, "internal_error", None),
        (NotImplementedAPIError("x"), 501, "not_implemented", None),
        (ServiceUnavailableError("x"), 503, "service_unavailable", None),
        (json.JSONDecodeError("Expecting value", "{", 1), 400, "invalid_request_error", None),
        (ValueError("x"), 500, "internal_error", None),
        (ParameterError("x", param="n"), 400, "invalid_request_error", None),
        (NotImplementedError("x"), 501, "not_implemented", None),
        (KeyError("x"), 500, "internal_error", None),
    ],
)
def test_error_response_maps_exception_kinds(exc: Exception, status: int, type_: str, code: str | None) -> None:
    resp = error_response(exc)
    assert resp.status_code == status
    error = json.loads(resp.body)["error"]
    assert (error["type"], error["code"]) == (type_, code)


def test_error_response_for_a_pydantic_validation_error() -> None:
    with pytest.raises(Exception) as info:
        ChatCompletionRequest.model_validate(chat_body(ensemble={"vote": "x"}))
    resp = error_response(info.value)
    assert resp.status_code == 400
    assert json.loads(resp.body)["error"]["param"] == "ensemble.vote"
    with pytest.raises(Exception) as info:
        CompletionRequest.model_validate([1])
    assert json.loads(error_response(info.value).body)["error"]["message"] == NOT_AN_OBJECT_MESSAGE


# ---------------------------------------------------------------------------
# Responses in OpenAI's layout
# ---------------------------------------------------------------------------


def _ensemble_info() -> EnsembleInfo:
    return EnsembleInfo(
        answer="4",
        agreement=2 / 3,
        votes={"4": 2.0, "5": 1.0},
        members=["m0", "m1", "m2"],
        rule="majority",
        chains=[EnsembleChain(member="m0", sample=0, answer="4", status="ok", text="#### 4", score=0.9, tokens=3)],
        failed=[FailedChain(member="m2", sample=0, reason="aborted")],
        tokens_saved=12,
        early_stopped=True,
    )


def test_chat_completion_matches_the_openai_types() -> None:
    from openai.types.chat import ChatCompletion

    logprobs = ChatLogprobs(
        content=[
            TokenLogprob(
                token="4", logprob=float("-inf"), bytes=[52], top_logprobs=[TopLogprob(token="4", logprob=-0.1)]
            )
        ]
    )
    resp = ChatCompletionResponse(
        model="ensemble",
        choices=[
            ChatCompletionChoice(
                index=0, message=ResponseMessage(content="#### 4"), logprobs=logprobs, finish_reason="stop"
            )
        ],
        usage=UsageInfo(prompt_tokens=5, completion_tokens=3),
        ensemble=_ensemble_info(),
    )
    data = resp.model_dump(exclude_none=True)
    parsed = ChatCompletion.model_validate(data)
    assert parsed.id.startswith("chatcmpl-") and parsed.object == "chat.completion"
    assert parsed.choices[0].message.content == "#### 4" and parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].logprobs.content[0].logprob == -9999.0  # -inf is not JSON
    assert parsed.usage.total_tokens == 8
    assert data["ensemble"]["votes"] == {"4": 2.0, "5": 1.0}
    assert data["ensemble"]["failed"] == [{"member": "m2", "sample": 0, "reason": "aborted"}]
    json.dumps(data, allow_nan=False)  # what JSONResponse does


def test_chat_chunks_match_the_openai_types() -> None:
    from openai.types.chat import ChatCompletionChunk as OpenAIChunk

    first = ChatCompletionChunk(
        model="m0", choices=[ChatCompletionChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))]
    )
    last = ChatCompletionChunk(
        id=first.id,
        model="m0",
        choices=[ChatCompletionChunkChoice(index=0, delta=DeltaMessage(content="4"), finish_reason="length")],
        usage=UsageInfo(prompt_tokens=1, completion_tokens=1),
    )
    usage_only = ChatCompletionChunk(
        model="m0", choices=[], usage=UsageInfo(prompt_tokens=1, completion_tokens=2), ensemble=_ensemble_info()
    )
    for chunk in (first, last, usage_only):
        data = chunk.model_dump(exclude_none=True)
        parsed = OpenAIChunk.model_validate(data)
        assert parsed.object == "chat.completion.chunk"
    assert first.model_dump(exclude_none=True)["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}}
    ]
    assert OpenAIChunk.model_validate(last.model_dump(exclude_none=True)).choices[0].finish_reason == "length"


def test_completions_match_the_openai_types() -> None:
    from openai.types import Completion

    logprobs = CompletionLogprobs(
        tokens=["4"], token_logprobs=[float("nan")], top_logprobs=[{"4": -0.2}], text_offset=[0]
    )
    resp = CompletionResponse(
        model="member-0",
        choices=[CompletionChoice(index=0, text=" 4", logprobs=logprobs, finish_reason="length")],
        usage=UsageInfo(prompt_tokens=4, completion_tokens=1, total_tokens=5),
    )
    parsed = Completion.model_validate(resp.model_dump(exclude_none=True))
    assert parsed.id.startswith("cmpl-") and parsed.object == "text_completion"
    assert parsed.choices[0].text == " 4" and parsed.choices[0].logprobs.token_logprobs == [-9999.0]
    chunk = CompletionChunk(model="member-0", choices=[CompletionChoice(index=0, text=" 4", finish_reason=None)])
    data = chunk.model_dump(exclude_none=True)
    assert data["object"] == "text_completion" and data["choices"] == [{"index": 0, "text": " 4"}]
    final = CompletionChunk(model="member-0", choices=[CompletionChoice(index=0, text="", finish_reason="stop")])
    assert Completion.model_validate(final.model_dump(exclude_none=True)).choices[0].finish_reason == "stop"


def test_model_list_matches_the_openai_types() -> None:
    from openai.types import Model

    models = ModelList(
        data=[
            ModelCard(
                id="ensemble",
                root="sandbox-substrate",
                max_model_len=512,
                ensemble={"members": ["m0", "m1"], "vote": "majority"},
            ),
            ModelCard(id="m0", root="m0", parent="sandbox-substrate", max_model_len=512),
        ]
    )
    data = models.model_dump(exclude_none=True)
    assert data["object"] == "list"
    for card in data["data"]:
        parsed = Model.model_validate(card)
        assert (parsed.object, parsed.owned_by) == ("model", "ensemble-serve")
    assert data["data"][1]["parent"] == "sandbox-substrate" and "ensemble" not in data["data"][1]


def test_non_finite_scores_serialize_as_null() -> None:
    info = EnsembleInfo(answer=None, agreement=float("nan"), votes={"4": float("inf")}, rule="weighted")
    data = info.model_dump()
    assert (data["agreement"], data["votes"]) == (None, {"4": None})
    json.dumps(data, allow_nan=False)


def test_helpers() -> None:
    a, b = random_id("chatcmpl"), random_id("chatcmpl")
    assert a != b and a.startswith("chatcmpl-") and len(a) == len("chatcmpl-") + 32
    assert VOTE_RULES == ("majority", "weighted", "cross", "calibrated")
    assert ChatMessage(role="tool", content="42").content == "42"
    assert UsageInfo(prompt_tokens=2, completion_tokens=3).total_tokens == 5


@pytest.mark.parametrize(
    ("top_k", "sent"), [(50, 50), (2**31 - 1, 2**31 - 1), (2**31, 0), (89559138734020178739200, 0)]
)
def test_a_top_k_beyond_any_vocabulary_is_sent_as_no_top_k(client: TestClient, top_k: int, sent: int) -> None:
    """vLLM reads top_k >= vocabulary size as no top-k; above 64 bits it could not reach its engine (found by fuzzing)."""
    resp = client.post("/v1/chat/completions", json=chat_body(top_k=top_k, temperature=0.7))
    assert resp.status_code == 200, resp.text
    assert resp.json()["top_k"] == sent
