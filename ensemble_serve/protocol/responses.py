"""The OpenAI-compatible responses: completions, chunks, logprobs, the `ensemble` object, model lists.

Responses dump to OpenAI's layout with ``model_dump(exclude_none=True)``. They are built by the
server, never sent by clients: a validation error from one of them is the server's bug (a 500).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from ensemble_serve.errors import register_server_model

OWNED_BY = "ensemble-serve"
_LOGPROB_FLOOR = -9999.0  # stands in for -inf, which JSON cannot carry


def random_id(prefix: str) -> str:
    """A fresh id such as ``chatcmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


def _logprob(v: Any) -> Any:
    return _LOGPROB_FLOOR if isinstance(v, float) and not math.isfinite(v) else v


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


Logprob = Annotated[float, BeforeValidator(_logprob)]
"""A log-probability; -inf (and NaN) become -9999.0 as in vLLM."""
Score = Annotated[float | None, BeforeValidator(_finite_or_none)]
"""A float that JSON can carry: NaN and infinities become None."""


class _Response(BaseModel):
    """A model the server builds; its validation errors are server errors (500), not the client's."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        register_server_model(cls)


class UsageInfo(_Response):
    """Token counts; total_tokens defaults to prompt + completion."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @model_validator(mode="after")
    def _fill_total(self) -> UsageInfo:
        if "total_tokens" not in self.model_fields_set:
            self.total_tokens = self.prompt_tokens + self.completion_tokens
        return self


class TopLogprob(_Response):
    """One alternative token and its log-probability."""

    token: str
    logprob: Logprob
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """A generated token, its log-probability and the top alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    """A chat choice's ``logprobs``."""

    content: list[TokenLogprob] | None = None


class ResponseMessage(_Response):
    """The generated message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(_Response):
    """A chat completion choice; finish_reason is "stop" or "length" (OpenAI's values)."""

    index: int
    message: ResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = "stop"


class DeltaMessage(_Response):
    """What a stream chunk adds to a message; role only on the first chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(_Response):
    """A choice of a stream chunk; finish_reason only on its last chunk."""

    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class CompletionLogprobs(_Response):
    """A text completion choice's ``logprobs`` (OpenAI's legacy layout)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Logprob | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, Logprob] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    """A text completion choice (also the choice of a stream chunk, with finish_reason None until its end).

    `ensemble` is set only on an ensemble request with several prompts: each prompt is voted on
    separately, and its choice carries its own vote (one prompt: the response's top-level `ensemble`).
    """

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = "stop"
    ensemble: EnsembleInfo | None = None


class EnsembleChain(_Response):
    """One member's sample: its extracted answer, extraction status, text, score and length."""

    member: str
    sample: int
    answer: str | None = None
    status: str
    """"ok", "missing" or "malformed" (see ``ensemble_serve.shared.voting.answers``)."""
    text: str | None = None
    score: Score = None
    tokens: int = 0


class FailedChain(_Response):
    """A sample that produced no output (the engine failed or the request was aborted)."""

    member: str
    sample: int
    reason: str


class PopulationVersion(_Response):
    """Which population answered: every member, weight, rule and default of one answer comes from it."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    generation: int
    """The manifest's generation."""
    version: str
    """`<generation>-<12 hex digits of the manifest's sha256>`: changes whenever `population.json` changes
    (new members, weights or defaults), also within one generation."""


class EnsembleInfo(_Response):
    """How the ensemble reached its answer."""

    # `answer` and `agreement` are always written (see the serializer below), so the document says so
    model_config = ConfigDict(use_attribute_docstrings=True, json_schema_extra={"required": ["answer", "agreement"]})

    answer: str | None = None
    agreement: Score = None
    """Share of the vote the winning answer got, 0..1."""
    votes: dict[str, Score] = Field(default_factory=dict)
    """Answer -> vote weight."""
    members: list[str] = Field(default_factory=list)
    rule: str = "majority"
    chains: list[EnsembleChain] | None = None
    """Only when the request asked for return_chains."""
    failed: list[FailedChain] = Field(default_factory=list)
    unavailable: list[str] = Field(default_factory=list)
    """Members that would have been asked but cannot be reached now (their remote server is down)."""
    tokens_saved: int | None = None
    early_stopped: bool = False
    calibration: dict[str, Any] | None = None
    """With the `calibrated` vote: {"used": true, "domain", "method", "weights": {member: weight}, "neutral"?},
    or {"used": false, "reason"} when the population has no usable reliability table."""
    routing: dict[str, Any] | None = None
    """When the population has a router: {"used": true, "top_k", "gates": {member: gate}}, or
    {"used": false, "reason"} when the router was refused or its output was unusable."""
    adaptive: dict[str, Any] | None = None
    """With `ensemble.adaptive`: {"waves", "chains", "full_chains", "stopped" (confident | decided |
    exhausted), "leader_probability", "confidence", "wave_size", "tokens_saved" (estimated: the
    sampled chains' mean length times the chains not sampled)}."""
    population: PopulationVersion | None = None
    """The population that answered: the request's members, their weights, the vote rule and the defaults
    all come from this one version, even when the population is refreshed while the request runs."""

    @model_serializer(mode="wrap")
    def _always_answer(self, handler: SerializerFunctionWrapHandler):
        """`answer` and `agreement` are always present (null when no chain had an answer), even with exclude_none.

        No return annotation: with one, pydantic would document the serialized object as that type (an
        opaque object) instead of the fields above, and /openapi.json would not show them.
        """
        data = handler(self)
        data.setdefault("answer", None)
        data.setdefault("agreement", None)
        return data


class ChatCompletionResponse(_Response):
    """The body of a non-streamed chat completion."""

    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    ensemble: EnsembleInfo | None = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat completion."""

    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None
    ensemble: EnsembleInfo | None = None


class CompletionResponse(_Response):
    """The body of a non-streamed text completion."""

    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    ensemble: EnsembleInfo | None = None


class CompletionChunk(_Response):
    """One server-sent event of a streamed text completion (same object type as the full response)."""

    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    ensemble: EnsembleInfo | None = None


class ModelCard(_Response):
    """An entry of ``GET /v1/models``: the ensemble (with its metadata) or a member (parent: the base model)."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = OWNED_BY
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    ensemble: dict[str, Any] | None = None


class ModelList(_Response):
    """The body of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
