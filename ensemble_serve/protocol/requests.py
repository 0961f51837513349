"""The OpenAI-compatible requests: chat and text completions, and the `ensemble` options.

Requests follow what vLLM's OpenAI server accepts for text models, with two policies:

* Types are strict (``strict=True``): numbers must be JSON numbers, flags JSON booleans
  (``"n": "2"`` or ``"stream": 1`` is a 400, as at OpenAI). Non-finite floats are rejected.
  An explicit ``null`` means "the default".
* Unknown top-level fields are ignored and dropped (``extra="ignore"``), since OpenAI clients send
  extras; known OpenAI features this server cannot honour and that would silently change the
  output (``tools``, ``functions``, a non-text ``response_format``, ``logit_bias``,
  ``use_beam_search``, ``suffix``) are rejected instead. The ``ensemble`` object is
  ``extra="forbid"``: a misspelled option is an error.

Responses dump to OpenAI's layout with ``model_dump(exclude_none=True)``.
"""

from __future__ import annotations

import difflib
import functools
import math
import typing
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ensemble_serve.errors import ParameterError
from ensemble_serve.shared.voting import VOTE_RULES as _VOTE_RULE_REGISTRY
from ensemble_serve.shared.voting.answers import get_extractor

VOTE_RULES = tuple(_VOTE_RULE_REGISTRY)  # the registered rules' names (the registry is the one source)
ROLES = ("system", "user", "assistant", "tool", "developer")

MAX_N = 128
MAX_SAMPLES_PER_MEMBER = 32
MAX_STOP_SEQUENCES = 8
MAX_LOGPROBS = 20
MAX_PROMPTS = 1024  # prompts in one text completion request (each fans out to n choices)
MAX_TIMEOUT_S = 86_400.0  # the largest per-request `timeout` accepted (the server's own cap is lower)
MIN_TIMEOUT_S = 0.001  # the smallest per-request `timeout` accepted: a deadline below 1 ms is no deadline to meet
GREEDY_TEMPERATURE = 1e-5  # below this vLLM samples greedily, which allows only n == 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Known OpenAI/vLLM fields of each endpoint that would change the output but are not implemented:
# field -> "is it in use?" (an absent, null or empty value is not). Fields of the other endpoint are
# unknown there, so ignored (a chat request's `suffix` means nothing, as at OpenAI and in vLLM).
_SHARED_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "logit_bias": bool,
    "use_beam_search": bool,
    "response_format": lambda v: not (isinstance(v, Mapping) and v.get("type") in (None, "text")),
}
CHAT_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {"tools": bool, "functions": bool, **_SHARED_UNSUPPORTED}
COMPLETION_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {"suffix": bool, **_SHARED_UNSUPPORTED}


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


class _Strict(BaseModel):
    """Strict types, finite floats, and ``null`` for a field with a default means that default."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        fields = cls.model_fields
        defaulted = [
            k
            for k, v in data.items()
            if v is None and k in fields and fields[k].default is not None and not fields[k].is_required()
        ]
        ints = _int_fields(cls)
        integral = [k for k, v in data.items() if k in ints and _is_integral_float(v)]
        if not defaulted and not integral:
            return data
        out = {k: v for k, v in data.items() if k not in defaulted}
        for k in integral:  # JSON has one number type: 2.0 is the integer 2 (as JSON Schema says)
            out[k] = int(out[k])
        return out


def _is_integral_float(v: Any) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v.is_integer()


@functools.cache
def _int_fields(cls: type[BaseModel]) -> frozenset[str]:
    """The fields whose only number type is int (`int` or `int | None`)."""
    out = set()
    for name, f in cls.model_fields.items():
        args = set(typing.get_args(f.annotation)) or {f.annotation}
        if int in args and not args - {int, type(None)}:
            out.add(name)
    return frozenset(out)


class AdaptiveOptions(_Strict):
    """``ensemble.adaptive``: sample the fan-out in waves and stop once the vote is settled.

    The chains of the full fan-out (members x samples_per_member) are ordered by trust (router
    gates, else reliability, else fitness; one chain of each member before a second of any) and
    sampled `wave_size` at a time. After each wave the leading answer's chain count v1 and the
    runner-up's v2 give P(leader's share > runner-up's) under a Beta(v1 + 1, v2 + 1) posterior
    (Adaptive-Consistency's Beta criterion); the next wave is sampled unless that probability
    reaches `confidence`, or the remaining chains could not overturn the lead.
    """

    model_config = ConfigDict(extra="forbid")

    confidence: float = Field(0.95, gt=0, lt=1)
    """The probability the leading answer must reach to stop, in (0, 1)."""
    wave_size: int | None = Field(None, ge=1)
    """Chains per wave; None: half the full fan-out, rounded up (at least 2). At most members x samples."""

    @model_validator(mode="before")
    @classmethod
    def _known_options(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                raise ParameterError(
                    f"unknown adaptive option {unknown[0]!r}; valid options: {', '.join(cls.model_fields)}",
                    param=f"ensemble.adaptive.{unknown[0]}",
                )
        return data


class EnsembleOptions(_Strict):
    """The optional ``ensemble`` object of a request (the openai client sends it via ``extra_body``)."""

    model_config = ConfigDict(extra="forbid")

    members: int | list[str] | None = None
    """How many members (>= 1), or which ones by name; None: all (the server's default)."""
    samples_per_member: int = Field(1, ge=1, le=MAX_SAMPLES_PER_MEMBER)
    vote: str = "majority"
    """One of :data:`VOTE_RULES`."""
    answer: str | dict[str, Any] = "natural"
    """An answer mode or ``{"regex": PATTERN}`` (see ``ensemble_serve.shared.voting.answers``); `natural` reads
    marked answers as `auto` does, and what a natural reply states otherwise."""
    early_stop: bool = False
    return_chains: bool = False
    mode: Literal["vote", "mixture"] = "vote"
    """vote: fan out to members and vote; mixture: answer with one adapter whose update is the
    router-weighted mix of the routed members' updates (needs a router and the in-process engine)."""
    route: bool | None = None
    """Use the population's router to pick the members (top-k) and weight a weighted vote.
    None: yes when the population has a router and `members` is not a list of names."""
    adaptive: AdaptiveOptions | None = None
    """Sample in waves and stop when the vote is settled (`true`: the default settings; `false`/null: off)."""

    @field_validator("adaptive", mode="before")
    @classmethod
    def _adaptive_flag(cls, v: Any) -> Any:
        if v is True:
            return {}
        if v is False:
            return None
        return v

    @model_validator(mode="after")
    def _adaptive_combines(self) -> EnsembleOptions:
        if self.adaptive is not None:
            if self.early_stop:
                raise ParameterError(
                    "adaptive and early_stop cannot be combined: adaptive fan-out stops between waves",
                    param="ensemble.adaptive",
                )
            if self.mode == "mixture":
                raise ParameterError(
                    "adaptive needs mode 'vote': a mixture answers with one adapter, there is nothing to stop",
                    param="ensemble.adaptive",
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _known_options(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key in data:
                if key not in cls.model_fields:
                    valid = list(cls.model_fields)
                    close = difflib.get_close_matches(str(key), valid, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ParameterError(
                        f"unknown ensemble option {key!r}{hint} valid options: {', '.join(valid)}", param=str(key)
                    )
        return data

    @field_validator("members", mode="before")
    @classmethod
    def _check_members(cls, v: Any) -> Any:
        if v is None:
            return v
        if _is_integral_float(v):
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 1:
                raise ValueError(f"must be at least 1, got {v}")
            return v
        if not isinstance(v, list):
            raise ValueError("must be a member count (an integer >= 1) or a list of member names")  # noqa: TRY004 (pydantic reports ValueError)
        if not v:
            raise ValueError("must not be an empty list")
        if not all(isinstance(name, str) and name.strip() for name in v):
            raise ValueError("member names must be non-empty strings")
        repeated = [name for name, count in Counter(v).items() if count > 1]
        if repeated:
            raise ValueError(f"must be unique; repeated: {', '.join(map(repr, repeated))}")
        return v

    @field_validator("vote")
    @classmethod
    def _check_vote(cls, v: str) -> str:
        if v not in VOTE_RULES:
            raise ValueError(f"unknown vote rule {v!r}; valid rules: {', '.join(VOTE_RULES)}")
        return v

    @field_validator("answer", mode="before")
    @classmethod
    def _check_answer(cls, v: Any) -> Any:
        try:
            get_extractor(v)
        except (ValueError, TypeError) as e:
            raise ValueError(str(e)) from None
        return dict(v) if isinstance(v, Mapping) else v


class StreamOptions(_Strict):
    """``stream_options``: only ``include_usage`` is honoured."""

    include_usage: bool = False


class ChatMessage(_Strict):
    """One input message; its content is plain text after validation (text parts are joined by newlines)."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None
    """Required except for assistant messages (which may carry only tool calls, ignored here)."""

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("must be a string or a list of text parts")  # noqa: TRY004 (pydantic reports ValueError)
        if not v:
            raise ValueError("must not be an empty list")
        texts = []
        for part in v:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text":
                got = f"a part of type {kind!r}" if isinstance(kind, str) else "a part that is not a text part"
                raise ValueError(f"only text content is supported; got {got}")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text part needs a string 'text'")  # noqa: TRY004 (pydantic reports ValueError)
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ParameterError(f"required for a {self.role} message", param="content")
        return self


class _GenerationRequest(_Strict):
    """The fields chat and text completions share."""

    model: str
    """The ensemble's name or one member's name."""
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    """vLLM extension; -1 or 0 disables it."""
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: list[str] | None = None
    """A string or up to :data:`MAX_STOP_SEQUENCES` non-empty strings (a string becomes a list of one)."""
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    """vLLM extension; 1.0 is neutral."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    """vLLM extension."""
    timeout: float | None = Field(
        None,
        ge=MIN_TIMEOUT_S,
        le=MAX_TIMEOUT_S,
        description=(
            f"Seconds this request may take at most (an extension), from {MIN_TIMEOUT_S:g} (1 ms; less is a 400 "
            f"naming `timeout`) to {MAX_TIMEOUT_S:g}; the server's --request-timeout caps it. A request still "
            "running at its deadline has its engine work aborted and is answered 504 (`request_timeout`)."
        ),
    )  # the description is the document's (/openapi.json)
    ensemble: EnsembleOptions | None = None

    unsupported: ClassVar[Mapping[str, Callable[[Any], bool]]] = {}
    """This endpoint's known fields that are refused when in use (see CHAT_UNSUPPORTED)."""

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for name, in_use in cls.unsupported.items():
                value = data.get(name)
                if value is not None and in_use(value):
                    raise ParameterError("not supported by this server", param=name)
        return data

    @property
    def asks_greedy(self) -> bool:
        """Whether the client asked for greedy sampling (temperature 0); unset is not greedy."""
        return self.temperature is not None and self.temperature < GREEDY_TEMPERATURE

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty model name")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            if len(v) > MAX_STOP_SEQUENCES:
                raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(v)}")
            if not all(isinstance(s, str) and s for s in v):
                raise ValueError("stop sequences must be non-empty strings")
        elif v is not None:
            raise ValueError("must be a string or a list of strings")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ParameterError("only allowed when stream is true", param="stream_options")
        return self


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    unsupported: ClassVar[Mapping[str, Callable[[Any], bool]]] = CHAT_UNSUPPORTED
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    """Deprecated by OpenAI in favour of max_completion_tokens, which wins when both are set."""
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """How many alternatives per token; needs logprobs."""

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ParameterError("requires logprobs to be true", param="top_logprobs")
        return self

    @model_validator(mode="after")
    def _some_text(self) -> ChatCompletionRequest:
        if not any(m.content and m.content.strip() for m in self.messages):
            raise ParameterError("the messages have no text: at least one needs non-empty content", param="messages")
        return self


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``."""

    unsupported: ClassVar[Mapping[str, Callable[[Any], bool]]] = COMPLETION_UNSUPPORTED
    prompt: str | list[str] | list[int] | list[list[int]]
    """One prompt or several, as text or as token ids (as vLLM's server takes them); each gets its own choices."""
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    """Accepted only as false."""

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            _check_text_prompt(v, "")
            return v
        if not isinstance(v, list):
            raise ValueError(_PROMPT_SHAPES)  # noqa: TRY004 (pydantic reports ValueError)
        if not v:
            raise ValueError("must not be an empty list")
        v = [_token_or_as_is(t) for t in v]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            if not all(_is_token_id(t) for t in v):
                raise ValueError("token ids must be integers >= 0")
            return v  # one prompt as token ids
        if len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts are allowed in one request, got {len(v)}")
        if all(isinstance(p, str) for p in v):
            for i, p in enumerate(v):
                _check_text_prompt(p, f"prompt {i}")
            return v
        if all(isinstance(p, list) for p in v):
            v = [[_token_or_as_is(t) for t in p] for p in v]
            for i, p in enumerate(v):
                if not p:
                    raise ValueError(f"prompt {i} is an empty list of token ids")
                if not all(_is_token_id(t) for t in p):
                    raise ValueError(f"prompt {i}: token ids must be integers >= 0")
            return v
        raise ValueError(_PROMPT_SHAPES)

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: a string or a list of token ids each."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    @field_validator("echo")
    @classmethod
    def _check_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v


_PROMPT_SHAPES = "must be a string, a list of strings, a list of token ids or a list of token-id lists"


def _token_or_as_is(t: Any) -> Any:
    """2.0 -> 2 (JSON has one number type); anything else unchanged."""
    return int(t) if _is_integral_float(t) else t


def _is_token_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _check_text_prompt(p: str, which: str) -> None:
    """Refuse an empty or whitespace-only text prompt (`which`: "" for the only prompt, else "prompt i")."""
    if not p.strip():
        raise ValueError(f"{which + ' ' if which else ''}must not be empty or only whitespace")


def chat_text(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Plain ``{"role", "content"}`` dicts for a tokenizer's chat template.

    ``developer`` becomes ``system`` (chat templates predate the developer role).
    """
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.content or ""} for m in messages]
