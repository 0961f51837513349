"""The API's error kinds, by whose fault they are, and the one error shape.

Raise an :class:`APIError` subclass where the status is known; each carries its HTTP status,
OpenAI's error `type` and a machine `code`. The client's faults are the 4xx kinds and
:class:`ParameterError` (raised by request validators); anything else that escapes a request
is the server's fault, a 500. `ensemble_serve.http.errors` turns all of them into responses::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

This module is a leaf: the service, the engines and the protocol raise these without importing HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel


class ErrorInfo(BaseModel):
    """The body of an error: what went wrong, its kind, the offending parameter, a machine code."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: ``{"error": {...}}``."""

    error: ErrorInfo


# ---------------------------------------------------------------------------
# Exceptions with a status
# ---------------------------------------------------------------------------


class APIError(Exception):
    """An error with an HTTP status; the base is a 500."""

    status_code: int = 500
    error_type: str = "internal_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = dict(headers) if headers else None

    def info(self) -> ErrorInfo:
        """This error in the response shape."""
        return ErrorInfo(message=self.message, type=self.error_type, param=self.param, code=self.code)


class BadRequestError(APIError):
    """400: the request is invalid (a parameter, the context length, ...)."""

    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(APIError):
    """401: a missing or wrong API key."""

    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class NotFoundError(APIError):
    """404: an unknown model (member or ensemble) by default."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class RequestTooLargeError(APIError):
    """413: the request body is larger than the server accepts."""

    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class InternalServerError(APIError):
    """500: a failure on the server's side (the message is sent as given: keep it generic)."""


class NotImplementedAPIError(APIError):
    """501: a feature this server does not provide."""

    status_code = 501
    error_type = "not_implemented"


class ServiceUnavailableError(APIError):
    """503: the engine is not ready, overloaded or shutting down."""

    status_code = 503
    error_type = "service_unavailable"


class RequestTimeoutError(APIError):
    """504: the request ran past its deadline (its own `timeout`, or the server's --request-timeout)."""

    status_code = 504
    error_type = "timeout_error"
    default_code = "request_timeout"


class MemberUnavailableError(ServiceUnavailableError):
    """503: the member(s) asked for cannot be reached now (their remote server is down); retried with backoff."""

    default_code = "member_unavailable"


class ParameterError(ValueError):
    """A ``ValueError`` that names the offending parameter.

    Raise it from a model-level pydantic validator, whose errors otherwise carry no field
    path; the parameter is appended to the path of the model that raised it.
    """

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


# Response models (built by the server, never sent by clients): a ValidationError from
# one of them is the server's bug, a 500, not the client's 400. protocol.py registers them.
_server_models: set[str] = set()


def register_server_model(cls: type[BaseModel]) -> None:
    """Mark a model whose validation errors are server errors (keyed by the model's title)."""
    _server_models.add(cls.model_config.get("title") or cls.__name__)


# ---------------------------------------------------------------------------


def is_server_model(title: str | None) -> bool:
    """Whether a pydantic model of this title is one the server builds (its validation errors are 500s)."""
    return title in _server_models
