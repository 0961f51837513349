"""`GET /openapi.json` that describes the server as it is: statuses, content types, limits.

FastAPI's generated document promises a 422 for invalid bodies (this server answers 400, in
OpenAI's error shape), a JSON `/metrics` (it is Prometheus text) and only 200s elsewhere. The
document here is FastAPI's, corrected:

* every route lists the statuses it can answer, each error with the `ErrorResponse` schema;
* the generation routes answer JSON or, with `stream: true`, `text/event-stream`;
* request bodies state the limits the server enforces (stop strings, prompt shapes, token ids,
  the member count, the vote rules and answer modes) and that `null` means "the default";
* rules that tie one field to another (`stream_options` needs `stream`, `top_logprobs` needs
  `logprobs`, `n` > 1 needs sampling, one message at least must carry text) are stated with JSON
  Schema's `if`/`then` and `contains`.

It is built on each request from the served population (member names, router, vocabulary), so
it stays true after a population refresh.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from ensemble_serve.engine.base import Engine
from ensemble_serve.errors import ErrorResponse
from ensemble_serve.http.headers import HEADERS
from ensemble_serve.protocol import (
    GREEDY_TEMPERATURE,
    INT64_MAX,
    INT64_MIN,
    MAX_SAMPLES_PER_MEMBER,
    MAX_STOP_SEQUENCES,
    MIN_TIMEOUT_S,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
from ensemble_serve.service.served import Served
from ensemble_serve.shared.voting import VOTE_RULES
from ensemble_serve.shared.voting.answers import MAX_REGEX_CHARS, MODES

_ERRORS = {
    400: "Invalid request: a parameter, the context length, a member list (OpenAI's error shape).",
    401: "Missing or wrong API key.",
    404: "Unknown model or member, or unknown route.",
    413: "Request body larger than --max-request-bytes.",
    500: "A failure on the server's side; the message carries the request id.",
    503: "The engine is not running, no member can be reached, or the server is shutting down.",
    504: (
        f"The request was still running at its deadline (its own `timeout`, at least {MIN_TIMEOUT_S:g} s, or the "
        "server's --request-timeout) and its engine work was aborted (code `request_timeout`). A `timeout` below "
        f"{MIN_TIMEOUT_S:g} s is refused with a 400 naming `timeout` instead."
    ),
}
_GENERATION = (400, 401, 404, 413, 500, 503, 504)
_STATUSES = {
    ("/v1/chat/completions", "post"): _GENERATION,
    ("/v1/completions", "post"): _GENERATION,
    ("/v1/models", "get"): (401, 413, 500, 503),
    ("/admin/reload", "post"): (400, 401, 413, 500, 503),
    ("/admin/population", "get"): (401, 413, 500, 503),
    ("/health", "get"): (413, 500, 503),
    ("/metrics", "get"): (413, 500),
}
# one server-sent event: `data:` a JSON chunk (or `[DONE]`, or a final `{"error": ...}`)
_SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"],
}
_RESPONSES = {
    ("/v1/chat/completions", "post"): "ChatCompletionResponse",
    ("/v1/completions", "post"): "CompletionResponse",
    ("/v1/models", "get"): "ModelList",
}


def describe_api(app: FastAPI, config: Any) -> None:
    """Replace `app.openapi` with the corrected document (built from what is served when it is asked for)."""

    def openapi() -> dict[str, Any]:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        service = getattr(app.state, "service", None)
        return corrected(doc, service)

    app.openapi = openapi  # type: ignore[method-assign]


def corrected(doc: dict[str, Any], service: Any = None) -> dict[str, Any]:
    """FastAPI's document with true statuses, content types and request limits (see the module docstring)."""
    doc = copy.deepcopy(doc)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _add_models(schemas)
    for path, methods in doc.get("paths", {}).items():
        for method, op in methods.items():
            _fix_operation(path, method, op)
    for name in ("ChatCompletionRequest", "CompletionRequest", "EnsembleOptions", "ChatMessage", "StreamOptions"):
        if name in schemas:
            _nullable_defaults(schemas[name])
    _limit_requests(schemas, service)
    return doc


def _add_models(schemas: dict[str, Any]) -> None:
    """The response bodies' schemas (FastAPI documents none: the routes return `Response`s)."""
    _, top = models_json_schema(
        [(m, "serialization") for m in (ErrorResponse, ChatCompletionResponse, CompletionResponse, ModelList)],
        ref_template="#/components/schemas/{model}",
    )
    for name, schema in top.get("$defs", {}).items():
        schemas.setdefault(name, schema)


def _fix_operation(path: str, method: str, op: dict[str, Any]) -> None:
    responses = op.setdefault("responses", {})
    responses.pop("422", None)
    ok = responses.setdefault("200", {"description": "Successful Response"})
    model = _RESPONSES.get((path, method))
    if model is not None:
        ok["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}
    if path in ("/v1/chat/completions", "/v1/completions"):
        ok["description"] = "The completion; with `stream: true`, server-sent events ending with `data: [DONE]`."
        ok["content"]["text/event-stream"] = {"schema": _SSE_EVENT}
        ok["headers"] = {  # on a non-streamed ensemble answer to one prompt (ensemble_serve/http/headers.py)
            name: {"description": text, "required": False, "schema": {"type": "string"}}
            for name, text in HEADERS.items()
        }
    if path == "/metrics":
        ok["description"] = "Prometheus metrics (text exposition format)."
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
    if path == "/health":
        ok["description"] = "`ok`, or `degraded` with the members that cannot be reached now."
        ok["content"] = {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "status": {"type": "string", "enum": ["ok", "degraded"]},
                        "unavailable_members": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["status", "unavailable_members"],
                }
            }
        }
    for status in _STATUSES.get((path, method), (500,)):
        responses[str(status)] = {
            "description": _ERRORS[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
        }


def _nullable_defaults(schema: dict[str, Any]) -> None:
    """`null` for a field with a default means that default (see protocol._Strict): say so."""
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop.get("default") is not None and not _nullable(prop):
            inner = {k: v for k, v in prop.items() if k not in ("title", "default", "description")}
            for k in list(inner):
                prop.pop(k)
            prop["anyOf"] = [inner, {"type": "null"}]


def _nullable(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "null" or any(alt.get("type") == "null" for alt in prop.get("anyOf", ()))


_TEXT = {"type": "string", "pattern": r"\S"}  # not empty, not only whitespace
_STOP = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_SEQUENCES},
        {"type": "null"},
    ]
}
_N_NEEDS_SAMPLING = {
    "if": {"properties": {"n": {"type": "integer", "minimum": 2}}, "required": ["n"]},
    "then": {
        "properties": {"temperature": {"anyOf": [{"type": "null"}, {"type": "number", "minimum": GREEDY_TEMPERATURE}]}}
    },
}


def _limit_requests(schemas: dict[str, Any], service: Any) -> None:
    """The limits the server enforces that pydantic's types do not carry.

    The served population is read once (`service.served`, one snapshot), so a refresh while the document
    is built cannot mix two populations' names in it.
    """
    served = service.served if service is not None else None
    engine = service.backend if service is not None else None
    if "ChatMessage" in schemas:
        _message_rules(schemas["ChatMessage"])
    for name, model in (("ChatCompletionRequest", ChatCompletionRequest), ("CompletionRequest", CompletionRequest)):
        if name in schemas:
            _generation_rules(schemas[name], served, engine)
            _unsupported_rules(schemas[name], model.unsupported)
    if service is not None:
        _ensemble_rules(schemas, served, service.mixtures.can_mix(served))
    if "ChatCompletionRequest" in schemas:
        _chat_rules(schemas["ChatCompletionRequest"])
    if "CompletionRequest" in schemas:
        _completion_rules(schemas["CompletionRequest"], engine)
    if "EnsembleOptions" in schemas:
        _options_rules(schemas["EnsembleOptions"], served)


def _message_rules(message: dict[str, Any]) -> None:
    """Content may be null only in an assistant message."""
    message.setdefault("allOf", []).append(
        {
            "if": {"properties": {"role": {"not": {"const": "assistant"}}}},
            "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        }
    )


def _generation_rules(req: dict[str, Any], served: Served | None, engine: Engine | None) -> None:
    """What chat and text completions share: the served model names, the seed's range, stop strings, n."""
    props = req["properties"]
    # int64, written exactly (pydantic writes the bounds as floats, and 2**63 - 1 rounds up to 2**63)
    props["seed"] = {"anyOf": [{"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}, {"type": "null"}]}
    props["model"] = {"type": "string", "pattern": r"\S", "description": "The ensemble, a member or the base."}
    if served is not None:  # the served names, as /v1/models lists them (other names: 404)
        props["model"]["enum"] = [served.settings.ensemble_name, *served.population.names, served.base_name]
        props["max_tokens"] = {
            "anyOf": [{"type": "integer", "minimum": 1, "maximum": engine.max_model_len}, {"type": "null"}],
            "description": "At most the context length, less the prompt's tokens (else a 400, context_length_exceeded).",
        }
    props["stop"] = _STOP
    req.setdefault("allOf", []).extend([_needs("stream_options", {"stream": {"const": True}}), _N_NEEDS_SAMPLING])


_NOT_SUPPORTED = "Not supported by this server: accepted only when absent, null or empty (else a 400)."
_EMPTY = {"enum": [None, False, 0, "", [], {}], "description": _NOT_SUPPORTED}
_TEXT_FORMAT = {  # response_format: text only
    "anyOf": [
        {"type": "null"},
        {"type": "object", "properties": {"type": {"enum": ["text", None]}}},
    ],
    "description": "Only the text format; others are not supported by this server (a 400).",
}


def _unsupported_rules(req: dict[str, Any], unsupported: Any) -> None:
    """The endpoint's known fields that are refused when in use (tools, logit_bias, ...): say which values pass."""
    for name in unsupported:
        req["properties"][name] = _TEXT_FORMAT if name == "response_format" else _EMPTY


def _chat_rules(chat: dict[str, Any]) -> None:
    """One message at least carries text; top_logprobs needs logprobs."""
    chat["properties"]["messages"]["contains"] = {
        "type": "object",
        "properties": {"content": {"anyOf": [_TEXT, {"type": "array", "minItems": 1}]}},
        "required": ["content"],
    }
    chat["allOf"].append(_needs("top_logprobs", {"logprobs": {"const": True}}, when={"minimum": 1}))


def _completion_rules(completion: dict[str, Any], engine: Engine | None) -> None:
    """Prompts: text with something in it, or token ids inside the vocabulary; echo only false."""
    vocab = len(engine.tokenizer) if engine is not None else None
    token = {"type": "integer", "minimum": 0, **({"maximum": vocab - 1} if vocab else {})}
    token_ids = {"type": "array", "items": token, "minItems": 1}
    completion["properties"]["prompt"] = {
        "anyOf": [
            _TEXT,
            {"type": "array", "items": _TEXT, "minItems": 1},
            token_ids,
            {"type": "array", "items": token_ids, "minItems": 1},
        ]
    }
    completion["properties"]["echo"] = {"anyOf": [{"const": False}, {"type": "null"}], "description": "Only false."}


def _options_rules(options: dict[str, Any], served: Served | None) -> None:
    """The registered vote rules and answer modes, and at most as many members as there are."""
    props = options["properties"]
    props["vote"] = {"anyOf": [{"enum": list(VOTE_RULES)}, {"type": "null"}]}
    regex = {"type": "string", "format": "regex", "minLength": 1, "maxLength": MAX_REGEX_CHARS}
    props["answer"] = {
        "anyOf": [
            {"enum": list(MODES)},
            {"type": "object", "properties": {"regex": regex}, "required": ["regex"], "additionalProperties": False},
            {"type": "null"},
        ]
    }
    count = len(served.population.names) if served is not None else None
    props["members"] = {
        "anyOf": [
            {"type": "integer", "minimum": 1, **({"maximum": count} if count else {})},
            {"type": "array", "items": {"type": "string", "pattern": r"\S"}, "minItems": 1, "uniqueItems": True},
            {"type": "null"},
        ]
    }
    # adaptive: true (the defaults), an object, or false/null (off). Its wave may not exceed the fan-out
    # (members x samples_per_member), a rule across fields JSON Schema cannot state (a 400 by design).
    wave = {"type": "integer", "minimum": 1, **({"maximum": count * MAX_SAMPLES_PER_MEMBER} if count else {})}
    props["adaptive"] = {
        "anyOf": [
            {"type": "boolean"},
            {
                "type": "object",
                "properties": {
                    "confidence": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                    "wave_size": {"anyOf": [wave, {"type": "null"}]},
                },
                "additionalProperties": False,
            },
            {"type": "null"},
        ],
        "description": props.get("adaptive", {}).get("description", "Adaptive fan-out: sample in waves."),
    }
    on = {"properties": {"adaptive": {"anyOf": [{"const": True}, {"type": "object"}]}}, "required": ["adaptive"]}
    options.setdefault("allOf", []).append(
        {
            "if": on,
            "then": {"properties": {"early_stop": {"not": {"const": True}}, "mode": {"not": {"const": "mixture"}}}},
        }
    )


def _ensemble_rules(schemas: dict[str, Any], served: Served, can_mix: bool) -> None:
    """What only the ensemble takes (`ensemble` options), what it refuses (n > 1, logprobs), and what needs a router."""
    ensemble = served.settings.ensemble_name
    has_router = served.routing.router is not None
    for name, no_logprobs in (
        ("ChatCompletionRequest", {"anyOf": [{"const": False}, {"type": "null"}]}),
        ("CompletionRequest", {"type": "null"}),
    ):
        req = schemas.get(name)
        if req is None:
            continue
        req.setdefault("allOf", []).extend(
            [
                {
                    "if": {"properties": {"model": {"const": ensemble}}, "required": ["model"]},
                    "then": {"properties": {"n": {"anyOf": [{"const": 1}, {"type": "null"}]}, "logprobs": no_logprobs}},
                    "else": {"properties": {"ensemble": {"type": "null"}}},
                },
                {
                    "if": {
                        "properties": {
                            "ensemble": {
                                "type": "object",
                                "properties": {"samples_per_member": {"type": "integer", "minimum": 2}},
                                "required": ["samples_per_member"],
                            }
                        },
                        "required": ["ensemble"],
                    },
                    "then": {
                        "properties": {
                            "temperature": {
                                "anyOf": [{"type": "null"}, {"type": "number", "minimum": GREEDY_TEMPERATURE}]
                            }
                        }
                    },
                },
            ]
        )
    options = schemas.get("EnsembleOptions")
    if options is None:
        return
    props = options["properties"]
    if not has_router:  # `route: true` and `mode: mixture` need the population's router
        props["route"] = {"anyOf": [{"const": False}, {"type": "null"}]}
        props["mode"] = {"anyOf": [{"const": "vote"}, {"type": "null"}]}
    else:  # a mixture is of the routed members: not of a list of names
        options.setdefault("allOf", []).append(
            {
                "if": {"properties": {"mode": {"const": "mixture"}}, "required": ["mode"]},
                "then": {"properties": {"members": {"not": {"type": "array"}}, "route": {"not": {"const": False}}}},
            }
        )
    if not can_mix:
        props["mode"] = {"anyOf": [{"const": "vote"}, {"type": "null"}]}


def _needs(field: str, then: dict[str, Any], when: dict[str, Any] | None = None) -> dict[str, Any]:
    """`field` (when set, and matching `when`) requires the properties in `then`."""
    cond: dict[str, Any] = {"not": {"type": "null"}, **(when or {})}
    return {
        "if": {"properties": {field: cond}, "required": [field]},
        "then": {"properties": then, "required": list(then)},
    }
