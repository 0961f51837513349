"""Errors as HTTP responses: every exception mapped to its status and OpenAI's error shape.

Errors say whose fault they are. The client's are explicit types (see `ensemble_serve.errors`):
:class:`BadRequestError` and the other :class:`APIError` subclasses with a 4xx status,
:class:`ParameterError` (raised by request validators), request validation errors and malformed
JSON; :func:`error_response` answers them with their status and message. Anything else, a plain
``ValueError`` included, is the server's fault: a 500 whose body says only that, with the request's
id, while the log keeps the traceback under the same id. :func:`install_error_handlers` wires this
into a FastAPI app.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ensemble_serve.errors import APIError, ErrorInfo, ErrorResponse, ParameterError, is_server_model

logger = logging.getLogger(__name__)

# Messages for requests whose body cannot be read as a JSON object.
INVALID_JSON_MESSAGE = "could not parse the request body as JSON"
EMPTY_BODY_MESSAGE = "the request body is empty; expected a JSON object"
NOT_AN_OBJECT_MESSAGE = "the request body must be a JSON object"
NOT_JSON_MESSAGE = "the request body must be a JSON object sent with 'Content-Type: application/json'"
INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request."

_MAX_REPORTED_ERRORS = 5  # validation errors spelled out in one message
_MAX_MESSAGE_CHARS = 1000
_MAX_INPUT_CHARS = 40  # a rejected scalar is echoed ("(got ...)") only up to this length

_TYPE_BY_STATUS = {
    401: "authentication_error",
    504: "timeout_error",
    403: "permission_error",
    429: "rate_limit_error",
    501: "not_implemented",
    503: "service_unavailable",
}


# Validation errors -> one readable message
# ---------------------------------------------------------------------------

# Segments pydantic puts into `loc` for unions, wrappers and the like; not field names.
_INTERNAL_LOC_SEGMENTS = frozenset(
    {
        "str",
        "int",
        "float",
        "bool",
        "bytes",
        "list",
        "dict",
        "tuple",
        "set",
        "none",
        "union",
        "nullable",
        "function-before",
        "function-after",
        "function-wrap",
        "function-plain",
        "tagged-union",
        "chain",
        "lax-or-strict",
        "json-or-python",
        "default",
        "is-instance",
        "literal",
    }
)
_BODY_LOC_PREFIXES = ("body", "query", "path", "header", "cookie")


def _param_path(loc: Sequence[Any]) -> str:
    """A field path as clients spell it: ``ensemble.vote``, ``messages[0].content``."""
    out = ""
    for seg in loc:
        if isinstance(seg, int):
            out += f"[{seg}]"
            continue
        seg = str(seg)
        if seg in _INTERNAL_LOC_SEGMENTS or any(c in seg for c in "[](){}"):
            continue
        out += f".{seg}" if out else seg
    return out


def _short_input(value: Any) -> str | None:
    """A short, JSON-safe rendering of a rejected scalar; None for containers and long strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "nan", "inf": json.dumps would write tokens that are not JSON
    if value is None or isinstance(value, (bool, int, float)):
        text = json.dumps(value)
    elif isinstance(value, str):
        text = repr(value)
    else:
        return None
    return text if len(text) <= _MAX_INPUT_CHARS else None


def _describe(err: Mapping[str, Any], loc: Sequence[Any]) -> tuple[str, str]:
    """(param, message) for one pydantic error dict."""
    param = _param_path(loc)
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, ParameterError):
        param = f"{param}.{ctx_error.param}" if param else ctx_error.param
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    if kind in ("value_error", "assertion_error") and ctx_error is not None:
        msg = str(ctx_error)
    elif kind not in ("missing", "extra_forbidden") and "input" in err:
        got = _short_input(err["input"])
        if got is not None:
            msg = f"{msg} (got {got})"
    return param, msg


def _body_message(err: Mapping[str, Any]) -> str:
    """The message for an error about the body as a whole."""
    if err.get("type") == "missing":
        return EMPTY_BODY_MESSAGE
    if isinstance(err.get("input"), (bytes, bytearray)):
        return NOT_JSON_MESSAGE  # FastAPI hands over the raw bytes when the body is not declared as JSON
    return NOT_AN_OBJECT_MESSAGE


def _validation_info(errors: Sequence[Mapping[str, Any]], *, from_request: bool) -> ErrorInfo:
    """One ErrorInfo for a list of pydantic errors: the first error's param, every message (bounded)."""
    if any(isinstance(e, Mapping) and e.get("type") == "json_invalid" for e in errors):
        return ErrorInfo(message=INVALID_JSON_MESSAGE, type="invalid_request_error")
    parts: list[str] = []
    seen: set[str] = set()
    first_param: str | None = None
    for err in errors:
        if not isinstance(err, Mapping):  # RequestValidationError also takes plain strings
            err = {"type": "value_error", "loc": (), "msg": str(err)}
        loc = tuple(err.get("loc") or ())
        if from_request and loc and loc[0] in _BODY_LOC_PREFIXES:
            loc = loc[1:]
        param, msg = _describe(err, loc)
        if not param and err.get("type") in ("missing", "model_type", "model_attributes_type", "dict_type"):
            msg = _body_message(err)
        if param in seen:  # the branches of a union all fail at the same place: report it once
            continue
        seen.add(param)
        if first_param is None:
            first_param = param or None
        parts.append(f"{param}: {msg}" if param else msg)
    shown = parts[:_MAX_REPORTED_ERRORS]
    message = "; ".join(shown)
    if len(parts) > len(shown):
        message += f"; and {len(parts) - len(shown)} more"
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[: _MAX_MESSAGE_CHARS - 3] + "..."
    return ErrorInfo(message=message or "invalid request", type="invalid_request_error", param=first_param)


# ---------------------------------------------------------------------------
# The mapping
# ---------------------------------------------------------------------------


def _render(status: int, info: ErrorInfo, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=dict(headers or {}))


def _type_for_status(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "internal_error")


def error_response(exc: Exception, request_id: str | None = None) -> JSONResponse:
    """The JSON error response for any exception: its status and OpenAI's error shape.

    APIError -> its own status; request validation errors, unreadable JSON and ParameterError -> 400;
    HTTPException -> its status; NotImplementedError -> 501; anything else (a plain ValueError too:
    the client's errors are raised as their own types) -> 500, logged with its traceback and
    `request_id`, and answered with a generic message that carries the id.
    """
    if isinstance(exc, APIError):
        return _render(exc.status_code, exc.info(), exc.headers)
    if isinstance(exc, RequestValidationError):
        return _render(400, _validation_info(exc.errors(), from_request=True))
    if isinstance(exc, ValidationError) and not is_server_model(exc.title):
        return _render(400, _validation_info(exc.errors(), from_request=False))
    if isinstance(exc, json.JSONDecodeError):
        return _render(400, ErrorInfo(message=INVALID_JSON_MESSAGE, type="invalid_request_error"))
    if isinstance(exc, StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
        info = ErrorInfo(message=detail, type=_type_for_status(exc.status_code))
        return _render(exc.status_code, info, exc.headers)
    if isinstance(exc, ParameterError):
        message = str(exc)[:_MAX_MESSAGE_CHARS] or "invalid request"
        return _render(400, ErrorInfo(message=message, type="invalid_request_error", param=exc.param))
    if isinstance(exc, NotImplementedError):
        message = str(exc)[:_MAX_MESSAGE_CHARS] or "not implemented"
        return _render(501, ErrorInfo(message=message, type="not_implemented"))
    where = f" (request {request_id})" if request_id else ""
    logger.error("unhandled %s while serving a request%s", type(exc).__name__, where, exc_info=exc)
    message = f"{INTERNAL_ERROR_MESSAGE} Request id: {request_id}." if request_id else INTERNAL_ERROR_MESSAGE
    return _render(500, ErrorInfo(message=message, type="internal_error"))


def request_id_of(request: Request) -> str | None:
    """The id the request-id middleware gave this request (None outside the app)."""
    return getattr(request.state, "request_id", None)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc, request_id_of(request))


async def _handle_http(request: Request, exc: Exception) -> JSONResponse:
    """Routing errors (no such route, wrong method) get OpenAI's wording; others go to error_response."""
    if not isinstance(exc, StarletteHTTPException):
        return error_response(exc, request_id_of(request))
    route = f"{request.method} {request.url.path}"
    if exc.status_code == 404 and exc.detail == HTTPStatus.NOT_FOUND.phrase:
        return _render(404, ErrorInfo(message=f"Invalid URL ({route})", type="invalid_request_error"), exc.headers)
    if exc.status_code == 405 and exc.detail == HTTPStatus.METHOD_NOT_ALLOWED.phrase:
        info = ErrorInfo(
            message=f"Method not allowed ({route})", type="invalid_request_error", code="method_not_allowed"
        )
        return _render(405, info, exc.headers)
    return error_response(exc, request_id_of(request))


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of `app` (bad JSON, bad fields, unknown routes, wrong methods, crashes) in one shape."""
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    for kind in (RequestValidationError, ValidationError, APIError, NotImplementedError, Exception):
        app.add_exception_handler(kind, _handle)
