"""A request's sampling parameters: the keyword arguments of `vllm.SamplingParams` (pure: no vLLM import)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ensemble_serve.errors import BadRequestError
from ensemble_serve.protocol.requests import GREEDY_TEMPERATURE, ChatCompletionRequest, CompletionRequest


def _context_error(max_model_len: int, requested: str, what: str, param: str) -> BadRequestError:
    return BadRequestError(
        f"This model's maximum context length is {max_model_len} tokens. However, {requested}. "
        f"Please reduce the length of the {what}.",
        param=param,
        code="context_length_exceeded",
    )


def sampling_kwargs(
    req: ChatCompletionRequest | CompletionRequest,
    *,
    max_model_len: int,
    prompt_tokens: int,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``vllm.SamplingParams`` for `req` (one prompt of `prompt_tokens` tokens).

    A parameter the request leaves unset comes from `defaults` (e.g. the model's generation config),
    else from OpenAI's default. max_tokens unset fills the context. BadRequestError
    (``context_length_exceeded``) when the prompt leaves no room or an explicit max_tokens does not fit,
    and (param ``n``) for n > 1 with temperature 0, which vLLM refuses.
    """
    if max_model_len < 1 or prompt_tokens < 0:
        raise ValueError(f"need max_model_len >= 1 and prompt_tokens >= 0, got {max_model_len}, {prompt_tokens}")
    defaults = defaults or {}
    chat = isinstance(req, ChatCompletionRequest)
    where = "messages" if chat else "prompt"
    if prompt_tokens >= max_model_len:
        raise _context_error(max_model_len, f"your request has {prompt_tokens} input tokens", where, where)

    room = max_model_len - prompt_tokens
    if chat:
        use_mct = req.max_completion_tokens is not None
        asked = req.max_completion_tokens if use_mct else req.max_tokens
        param = "max_completion_tokens" if use_mct else "max_tokens"
    else:
        # The completion default (16) is OpenAI's, not the client's: it is clamped, never an error.
        asked = req.max_tokens if "max_tokens" in req.model_fields_set else None
        param = "max_tokens"
    if asked is None:
        fallback = defaults.get("max_tokens", None if chat else req.max_tokens)
        max_tokens = room if fallback is None else min(room, fallback)
    elif asked > room:
        raise _context_error(
            max_model_len,
            f"you requested {prompt_tokens + asked} tokens ({prompt_tokens} in the {where}, {asked} in the completion)",
            f"{where} or completion",
            param,
        )
    else:
        max_tokens = asked

    def pick(name: str, openai_default: Any) -> Any:
        value = getattr(req, name)
        return value if value is not None else defaults.get(name, openai_default)

    temperature = pick("temperature", 1.0)
    if req.n > 1 and temperature < GREEDY_TEMPERATURE:
        raise BadRequestError(
            f"n must be 1 when temperature is 0 (greedy sampling), got n={req.n}", param="n", code="invalid_value"
        )
    if chat:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    return {
        "n": req.n,
        "temperature": temperature,
        "top_p": pick("top_p", 1.0),
        # vLLM reads any top_k of at least the vocabulary size as "no top-k"; one beyond 64 bits could not
        # even be sent to its engine core (a 500), so every value that large is sent as 0, which means the same
        "top_k": top_k if (top_k := pick("top_k", 0)) < 2**31 else 0,
        "min_p": pick("min_p", 0.0),
        "seed": req.seed,
        "stop": list(req.stop or []),
        "presence_penalty": pick("presence_penalty", 0.0),
        "frequency_penalty": pick("frequency_penalty", 0.0),
        "repetition_penalty": pick("repetition_penalty", 1.0),
        "max_tokens": max_tokens,
        "logprobs": logprobs,
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": True,
    }
