"""What goes over the wire to a vLLM OpenAI server, and what comes back, as plain functions and values.

Generation streams `POST /v1/completions` with the prompt as token ids. With `logprobs` (at
least 0) the body also asks for vLLM's `return_tokens_as_token_ids`, so every generated token
comes back as its exact id ("token_id:123") with its log-probability; without, it asks for
`return_token_ids` (each chunk's new ids, no log-probabilities to compute). `StreamFold` folds
the stream's choice deltas into cumulative outputs shaped like vLLM's `RequestOutput`.

Scoring (cross votes) sends one non-streamed request per continuation with vLLM's
`prompt_logprobs` extension field and averages the continuation's prompt log-probabilities.

Errors: `error_message` reads an error body in vLLM's or OpenAI's shape; `mapped_error` turns a
server's status into the service's exception (400 stays the client's fault, 429/503 a 503,
501 a 501, everything else a 502 `RemoteError`); `marks_down` and `engine_dead` say whether an
answer means the server itself (not the request) is broken. Nothing here sends a request or holds
state beyond one stream's outputs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from ensemble_serve.errors import APIError, BadRequestError, NotImplementedAPIError, ServiceUnavailableError

TOKEN_ID_PREFIX = "token_id:"
ENGINE_DEAD_MARKERS = ("EngineCore encountered an issue", "EngineDeadError", "engine is dead")
DONE = "[DONE]"  # the data of the last event of a stream

log = logging.getLogger("ensemble_serve")


class RemoteError(APIError):
    """502: a remote vLLM server failed, could not be reached, or answered something unusable."""

    status_code = 502
    error_type = "upstream_error"


# --------------------------------------------------------------------------- outputs shaped like vLLM's


@dataclass
class RemoteLogprob:
    """Like `vllm.logprobs.Logprob`; `rank` is the position among the returned candidates (1 = most likely)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class RemoteCompletion:
    """Like vLLM's `CompletionOutput`, cumulative: it grows as the stream goes on."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, RemoteLogprob] | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RemoteRequestOutput:
    """Like vLLM's `RequestOutput` (cumulative): `outputs` are the choices seen so far, by index."""

    request_id: str
    outputs: list[RemoteCompletion]
    finished: bool


# --------------------------------------------------------------------------- requests


def request_body(prompt_ids: Sequence[int], params: Any, model: str, max_model_len: int) -> dict[str, Any]:
    """The `/v1/completions` body for vLLM `SamplingParams` (streamed, ids back for every token).

    Every sampling field is sent explicitly, so the server's generation-config defaults
    do not apply: the same request samples the same way in-process and remote.
    """
    if getattr(params, "structured_outputs", None) is not None:
        raise NotImplementedAPIError("structured outputs are not passed to remote vLLM servers")
    max_tokens = params.max_tokens if params.max_tokens is not None else max(1, max_model_len - len(prompt_ids))
    want = params.logprobs
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(prompt_ids),
        "stream": True,
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
        "max_tokens": max_tokens,
        "min_tokens": params.min_tokens,
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": params.skip_special_tokens,
        "spaces_between_special_tokens": params.spaces_between_special_tokens,
        "include_stop_str_in_output": params.include_stop_str_in_output,
    }
    if want is not None:  # every token's log-probability, with its exact id ("token_id:123")
        body["logprobs"] = want
        body["return_tokens_as_token_ids"] = True
    else:  # the ids alone (each chunk's new token ids): no log-probabilities to compute
        body["return_token_ids"] = True
    if params.seed is not None:
        body["seed"] = params.seed
    stop = params.stop
    if stop:
        body["stop"] = [stop] if isinstance(stop, str) else list(stop)
    _add_optional(body, params)
    return body


def _add_optional(body: dict[str, Any], params: Any) -> None:
    """The fields of `params` that only newer vLLM versions have, when they are set."""
    for name in ("stop_token_ids", "bad_words", "allowed_token_ids"):
        value = getattr(params, name, None)
        if value:
            body[name] = list(value)
    logit_bias = getattr(params, "logit_bias", None)
    if logit_bias:
        body["logit_bias"] = {str(k): v for k, v in logit_bias.items()}
    for name in ("watermarking", "thinking_token_budget"):
        value = getattr(params, name, None)
        if value is not None:
            body[name] = value


def score_body(model: str, ids: list[int], request_id: str) -> dict[str, Any]:
    """A scoring request: the prompt's log-probabilities under `model` (one token generated, greedily)."""
    return {
        "model": model,
        "prompt": ids,
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": 0,
        "request_id": request_id,
    }


# --------------------------------------------------------------------------- answers


def token_id(token: str) -> int:
    """The id in a `token_id:N` token (vLLM's `return_tokens_as_token_ids`)."""
    if not token.startswith(TOKEN_ID_PREFIX):
        raise RemoteError(
            f"a remote vLLM server returned the token {token!r} instead of 'token_id:N'; "
            "it needs `return_tokens_as_token_ids` (vLLM >= 0.6)"
        )
    return int(token[len(TOKEN_ID_PREFIX) :])


def logprob_entry(tid: int, logprob: float, top: dict[str, float] | None) -> dict[int, RemoteLogprob]:
    """vLLM's per-token logprob dict from the completion API's `top_logprobs` (ranked by log-probability)."""
    pairs = [(token_id(t), lp) for t, lp in (top or {}).items()]
    if tid not in {t for t, _ in pairs}:
        pairs.append((tid, logprob))
    pairs.sort(key=lambda p: -p[1])
    return {t: RemoteLogprob(lp, rank=i + 1) for i, (t, lp) in enumerate(pairs)}


def event_data(line: str) -> str | None:
    """The data of one line of a server-sent-events stream; None for a line that carries none."""
    if not line.startswith("data:"):
        return None
    return line[len("data:") :].strip()


def decode_event(data: str, url: str) -> dict[str, Any]:
    """One stream event's JSON object; RemoteError if it is not one (`url`: the server that sent it, for the log)."""
    try:
        chunk = json.loads(data)
    except ValueError:
        log.warning("remote vLLM server %s sent an event that is not JSON: %.200s", url, data)
        raise RemoteError("a remote vLLM server sent an event that is not JSON") from None
    if not isinstance(chunk, dict):
        raise RemoteError("a remote vLLM server sent an event that is not a JSON object")
    return chunk


def fold(state: dict[int, RemoteCompletion], ch: dict[str, Any], keep_logprobs: bool) -> None:
    """Add one streamed choice delta to the cumulative output of its index."""
    idx = int(ch.get("index", 0))
    out = state.get(idx)
    if out is None:
        out = state[idx] = RemoteCompletion(
            idx, logprobs=[] if keep_logprobs else None, cumulative_logprob=0.0 if keep_logprobs else None
        )
    out.text += ch.get("text") or ""
    lp = ch.get("logprobs")
    if lp:
        _fold_logprobs(out, lp, keep_logprobs)
    elif ch.get("token_ids"):
        out.token_ids.extend(int(t) for t in ch["token_ids"])
    if ch.get("finish_reason") is not None:
        out.finish_reason = ch["finish_reason"]
        out.stop_reason = ch.get("stop_reason")


def _fold_logprobs(out: RemoteCompletion, lp: dict[str, Any], keep_logprobs: bool) -> None:
    """The tokens of a delta's `logprobs` (ids as `token_id:N`), and their log-probabilities if kept."""
    tokens = lp.get("tokens") or []
    token_lps = lp.get("token_logprobs") or [None] * len(tokens)
    tops = lp.get("top_logprobs") or [None] * len(tokens)
    for token, token_lp, top in zip(tokens, token_lps, tops):
        tid = token_id(token)
        out.token_ids.append(tid)
        if not keep_logprobs:
            continue
        if token_lp is None:
            out.logprobs.append(None)
            continue
        out.logprobs.append(logprob_entry(tid, float(token_lp), top))
        out.cumulative_logprob += float(token_lp)


class StreamFold:
    """The cumulative outputs of one streamed request with `n` choices, folded delta by delta."""

    def __init__(self, request_id: str, n: int, keep_logprobs: bool):
        self.request_id = request_id
        self.n = n
        self.keep_logprobs = keep_logprobs
        self.state: dict[int, RemoteCompletion] = {}
        self.done = False  # the stream's last event ([DONE]) came

    def add(self, chunk: dict[str, Any]) -> RemoteRequestOutput | None:
        """Fold one event's choices; the outputs so far, or None for an event without choices."""
        choices = chunk.get("choices") or []
        for ch in choices:
            fold(self.state, ch, self.keep_logprobs)
        if not choices:
            return None
        outs = [self.state[i] for i in sorted(self.state)]
        return RemoteRequestOutput(self.request_id, outs, len(outs) == self.n and all(o.finished() for o in outs))

    def complete(self) -> bool:
        """Whether the stream ended and every one of the `n` choices finished."""
        return self.done and len(self.state) >= self.n and all(o.finished() for o in self.state.values())


def prompt_logprobs(resp: httpx.Response) -> list[Any]:
    """The `prompt_logprobs` of a scoring answer (a list with one entry per prompt position, or empty)."""
    try:
        return resp.json()["choices"][0]["prompt_logprobs"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise RemoteError("a remote vLLM server answered a scoring request without prompt_logprobs") from None


def mean_logprob(lps: list[Any], ids: list[int], start: int) -> float:
    """Mean log-probability of `ids[start:]` from a scoring answer's `prompt_logprobs` (-inf if any is missing)."""
    if not lps:
        return float("-inf")
    total = 0.0
    for pos in range(start, len(ids)):
        entry = lps[pos] if pos < len(lps) else None
        hit = entry.get(str(ids[pos])) if entry else None
        total += float(hit["logprob"]) if hit else float("-inf")
    return total / (len(ids) - start)


# --------------------------------------------------------------------------- errors


def error_message(resp: httpx.Response) -> tuple[str, str | None]:
    """(message, param) from an error response, in vLLM's or OpenAI's shape, else the raw text."""
    text = resp.text
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"]), err.get("param") if isinstance(err.get("param"), str) else None
    if isinstance(err, str) and err:
        return err, None
    return (text.strip()[:500] or resp.reason_phrase or f"HTTP {resp.status_code}"), None


def stream_error(err: Any) -> tuple[str, int, str | None]:
    """(message, status, param) of an error event inside a stream (vLLM sends `data: {"error": {...}}` after a 200)."""
    if isinstance(err, dict):
        message = str(err.get("message") or err)
        code = err.get("code")
        status = code if isinstance(code, int) else 500
        param = err.get("param") if isinstance(err.get("param"), str) else None
        return message, status, param
    return str(err), 500, None


def mapped_error(status: int, message: str, param: str | None, model: str) -> Exception:
    """The exception for a remote server's HTTP error, carrying the server's message."""
    if status == 400 or status == 422:
        return BadRequestError(message, param=param)
    if status in (401, 403):
        return RemoteError(f"a remote vLLM server refused ensemble-serve's API key (remote_api_key): {message}")
    if status == 404:
        return RemoteError(
            f"a remote vLLM server does not serve {model!r} (restarted with other --lora-modules? "
            f"POST /admin/reload re-discovers): {message}"
        )
    if status == 501:
        return NotImplementedAPIError(f"remote vLLM server: {message}")
    if status in (429, 503):
        return ServiceUnavailableError(f"remote vLLM server: {message}")
    return RemoteError(f"remote vLLM server answered {status}: {message}")


def marks_down(status: int) -> bool:
    """Whether an answer with this status says the server (not the request) is broken: 5xx but 501."""
    return status >= 500 and status != 501


def engine_dead(message: str) -> bool:
    """Whether an error message says the server's engine died (vLLM's `EngineDeadError`)."""
    return any(m in message for m in ENGINE_DEAD_MARKERS)
