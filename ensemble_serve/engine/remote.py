"""Remote mode: the ensemble layer over existing vLLM OpenAI servers instead of an in-process engine.

`RemoteBackend` is the same duck-typed backend as `engine.AsyncEngine` (see
`serving.Backend`): the service tokenizes, fans out, votes and answers exactly as
in-process; only the generation and the scoring go over HTTP to one or more
`python -m vllm.entrypoints.openai.api_server --enable-lora --lora-modules NAME=PATH ...`
servers, each serving some of the members under the member's name. A member may be
served by several servers; each request goes to the one of them with the fewest
requests in flight from this backend. The base model (member None) is asked of any server.

Discovery. The constructor asks every server `GET /v1/models` (which members it serves,
its base model's name, its `max_model_len`) and checks with `POST /tokenize` that the
server's tokenizer encodes like the population's base model, synchronously: the app's
lifespan builds the backend and reads `max_model_len` right away, and a server that is
down or a member that no server has should stop `ensemble-serve up` at once with a
message that names it. `set_population` (a population refresh) discovers again, also
synchronously (one short request per server), and refuses a generation with members no
server serves; `await start()` re-discovers without blocking the event loop. A refresh
asks only the servers that are up: a server that is down (or found down by the refresh:
unreachable, or answering 5xx) keeps the members it served when it was last seen, and
the monitor re-discovers it when it comes back. Only names
are matched: a remote server must load a new generation's adapters itself (start it
with them, or `POST /v1/load_lora_adapter` with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`),
and a member name must keep meaning the same weights, as the trainer's do.

Settings. vLLM's CPU sampler kills the engine ("CPU Generator does not use offset", then
`EngineDeadError`) when a seeded request's prefill is split over engine steps, so CPU
servers must run with `--no-enable-chunked-prefill`. The first discovery of a server (and
its re-discovery after it was down) reads its configuration from
`GET /server_info?config_format=json`, which vLLM serves only with
`VLLM_SERVER_DEV_MODE=1`: a CPU server with chunked prefill on is named in a warning;
a server without that route gets one warning that it could not be checked. Neither
refuses the server.

Liveness. Each server is up, or down with a reason and a time for the next retry. A
server goes down when a request to it cannot connect or times out, when it answers 5xx
(501 aside: that is about the request), or when a stream carries an error of 500 or
more (vLLM's `EngineDeadError` arrives that way). The monitor (`start_monitor`, started
on the running loop; `shutdown` cancels it) probes every up server's `GET /health` every
`probe_interval` seconds (vLLM answers 503 once its engine is dead) and retries a down
server with exponential backoff (`backoff_initial` doubling to `backoff_max`, less up to
`backoff_jitter` of it at random). A down server that answers /health 200 is discovered
again (its /v1/models: which members it serves now; its /tokenize) before it is up.
`servers_of` offers only up servers and raises `MemberUnavailableError` (503) when none
serves the member; `unavailable_members()` and `health()` report the state.

Generation streams `POST /v1/completions` with the prompt as token ids and `logprobs`
(at least 0) plus vLLM's `return_tokens_as_token_ids`, so every generated token comes
back as its exact id ("token_id:123") with its log-probability. The deltas are folded
into cumulative outputs shaped like vLLM's `RequestOutput`. Cancelling the iteration
closes the HTTP stream, and vLLM aborts the request when its client goes away.

Scoring (cross votes) uses vLLM's `prompt_logprobs` extension field and passes, per
remote server, the same `ScoringGate` as the in-process engine: generation holds the
server's gate shared, scoring holds it exclusively. vLLM's CPU build (0.32) kills its
engine core when a prompt-logprobs request under a LoRA adapter shares an engine step
with any other request, even one under the same adapter (the LoRA logits of the prompt
are computed with the batch's per-request adapter indices), so a scoring request must
have the server to itself: under the exclusive gate the continuations are scored one
request at a time. A request left running on a server (a generation stream closed
before it finished, a scoring request cancelled or cut off) keeps the gate for
`abort_grace` seconds more: a margin for vLLM to notice the closed connection and abort
the request before anything else is scheduled next to it. The gate only orders
this backend's own requests: other clients (or another ensemble-serve) sending traffic
to the same CPU vLLM servers can still trigger the bug and kill a server, so servers
used for `cross` votes should be dedicated to one ensemble-serve.

The backend and its HTTP clients belong to the event loop that first uses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from ensemble_serve.shared.vllm import ScoringGate
from ensemble_serve.errors import (
    APIError,
    BadRequestError,
    MemberUnavailableError,
    NotImplementedAPIError,
    ServiceUnavailableError,
)
from ensemble_serve.shared.population import Population

log = logging.getLogger("ensemble_serve")

DEFAULT_TIMEOUT = 600.0  # seconds a remote server may stay silent (a long prefill on a CPU) before a request fails
CONNECT_TIMEOUT = 10.0
DISCOVERY_TIMEOUT = 30.0
TOKEN_ID_PREFIX = "token_id:"
# Encoded here and by each server's /tokenize: a server whose tokenizer differs is refused.
TOKENIZER_PROBE = "ensemble-serve probe: add 478+365 = 843\n#### The quick brown fox, 0.5 * (2 - 3)!"
PROBE_INTERVAL = 5.0  # seconds between two /health probes of a server that is up
PROBE_TIMEOUT = 10.0  # a /health probe that takes longer marks the server down
BACKOFF_INITIAL = 1.0  # seconds from a server going down to its first retry; doubles with each failed retry
BACKOFF_MAX = 30.0
BACKOFF_JITTER = 0.2  # each wait is shortened by up to this fraction, at random (servers do not retry in step)
CHUNKED_PREFILL_FLAG = "--no-enable-chunked-prefill"
ENGINE_DEAD_MARKERS = ("EngineCore encountered an issue", "EngineDeadError", "engine is dead")


class RemoteError(APIError):
    """502: a remote vLLM server failed, could not be reached, or answered something unusable."""

    status_code = 502
    error_type = "upstream_error"


class RemoteDiscoveryError(ValueError):
    """The remote servers cannot serve this population: one is unreachable, differs, or lacks members."""


class _ServerDown(RemoteDiscoveryError):
    """Discovery could not reach a server, or it answered 5xx: the server is down, not misconfigured."""


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


# --------------------------------------------------------------------------- servers


@dataclass
class RemoteServer:
    """One vLLM OpenAI server and what discovery found on it."""

    url: str
    client: httpx.AsyncClient
    gate: ScoringGate = field(default_factory=ScoringGate)
    base_model: str | None = None  # the server's name for its base model
    max_model_len: int | None = None
    members: frozenset[str] = frozenset()
    inflight: int = 0
    # liveness (see the module docstring); times are on the backend's clock
    up: bool = True
    reason: str | None = None  # why it is down
    retry_at: float | None = None  # when a down server is tried next
    failures: int = 0  # failed retries since it went down: the backoff's exponent
    epoch: int = 0  # +1 each time it comes back up: a request sent before then cannot mark it down
    next_probe: float = 0.0  # when an up server's /health is probed next
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # wakes its monitor when it goes down


@dataclass(frozen=True)
class _Found:
    base_model: str
    max_model_len: int
    models: frozenset[str]  # the LoRA adapters the server serves


class _GateView:
    """All servers' gates as one, for the app's in-flight metric (`state[0]`: generations in flight)."""

    def __init__(self, servers: Sequence[RemoteServer]):
        self._servers = servers

    @property
    def state(self) -> tuple[int, bool]:
        states = [s.gate.state for s in self._servers]
        return sum(r for r, _ in states), any(w for _, w in states)


def normalize_url(url: str) -> str:
    """`http://host:8000/v1/` -> `http://host:8000`: the server's root, where /v1, /health and /tokenize live."""
    u = url.strip().rstrip("/").removesuffix("/v1")
    if not u.startswith(("http://", "https://")):
        raise ValueError(f"remote server URL {url!r} must start with http:// or https://")
    return u


def _error_message(resp: httpx.Response) -> tuple[str, str | None]:
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


def _mapped_error(status: int, message: str, param: str | None, model: str) -> Exception:
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


def _unreachable(url: str, e: Exception) -> RemoteDiscoveryError:
    return _ServerDown(f"{url}: cannot reach the vLLM server ({type(e).__name__}: {e})")


def _marks_down(status: int) -> bool:
    """Whether an answer with this status says the server (not the request) is broken: 5xx but 501."""
    return status >= 500 and status != 501


def _settings_problem(url: str, info: httpx.Response | httpx.HTTPError) -> tuple[str | None, bool]:
    """(a warning about a server's settings or None, whether they could be checked at all), from its
    `GET /server_info?config_format=json` answer or how that request failed."""
    advice = (
        f"if it runs on the CPU, start it with {CHUNKED_PREFILL_FLAG}, or a request with a `seed` can kill its engine"
    )
    if isinstance(info, httpx.HTTPError):
        why = f"GET /server_info failed ({type(info).__name__})"
    elif info.status_code == 404:
        why = "GET /server_info needs VLLM_SERVER_DEV_MODE=1 on the server"
    elif info.status_code != 200:
        why = f"GET /server_info answered {info.status_code}"
    else:
        try:
            cfg = info.json()["vllm_config"]
            device = cfg.get("device_config") or {}
            device = str(device.get("device_type") or device.get("device") or "")
            chunked = (cfg.get("scheduler_config") or {}).get("enable_chunked_prefill")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            why = f"GET /server_info is not vLLM's ({type(e).__name__})"
        else:
            if device.startswith("cpu") and chunked:
                return (
                    f"remote vLLM server {url} runs on the CPU with chunked prefill enabled: a request with a "
                    f'`seed` can kill its engine ("CPU Generator does not use offset"); restart it with '
                    f"{CHUNKED_PREFILL_FLAG}",
                    True,
                )
            return None, True
    return f"remote vLLM server {url}: cannot check its settings ({why}); {advice}", False


def _engine_dead(message: str) -> bool:
    return any(m in message for m in ENGINE_DEAD_MARKERS)


def _token_id(token: str) -> int:
    if not token.startswith(TOKEN_ID_PREFIX):
        raise RemoteError(
            f"a remote vLLM server returned the token {token!r} instead of 'token_id:N'; "
            "it needs `return_tokens_as_token_ids` (vLLM >= 0.6)"
        )
    return int(token[len(TOKEN_ID_PREFIX) :])


def _logprob_entry(token_id: int, logprob: float, top: dict[str, float] | None) -> dict[int, RemoteLogprob]:
    """vLLM's per-token logprob dict from the completion API's `top_logprobs` (ranked by log-probability)."""
    pairs = [(_token_id(t), lp) for t, lp in (top or {}).items()]
    if token_id not in {t for t, _ in pairs}:
        pairs.append((token_id, logprob))
    pairs.sort(key=lambda p: -p[1])
    return {t: RemoteLogprob(lp, rank=i + 1) for i, (t, lp) in enumerate(pairs)}


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
    return body


# --------------------------------------------------------------------------- the backend


class RemoteBackend:
    """Remote vLLM OpenAI servers as the service's backend (see the module docstring).

    `urls` are the servers' base URLs (a trailing `/v1` is accepted). `api_key` is sent
    as `Authorization: Bearer` to every server (vLLM's `--api-key`). `timeout`: seconds a
    server may stay silent during a request before it fails. Construction discovers the
    servers synchronously and raises `RemoteDiscoveryError` if one cannot be used.

    Liveness settings (keyword-only, short in tests): `probe_interval`, `probe_timeout`,
    `backoff_initial`, `backoff_max`, `backoff_jitter` (seconds, fraction), `clock` (a
    monotonic clock in seconds), `rng` (a `random.Random` for the jitter). `transport`
    replaces the HTTP transport of every client (an `httpx.MockTransport` in tests).
    """

    abort_grace: float = 0.5  # seconds a stream closed early keeps its server's gate (see the module docstring)

    def __init__(
        self,
        population: Population,
        urls: Sequence[str],
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        tokenizer: Any = None,
        probe_interval: float = PROBE_INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        backoff_jitter: float = BACKOFF_JITTER,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        transport: Any = None,
    ):
        normalized = [normalize_url(u) for u in urls]
        if not normalized:
            raise ValueError("remote mode needs at least one vLLM server URL")
        dup = sorted({u for u in normalized if normalized.count(u) > 1})
        if dup:
            raise ValueError(f"remote server URL(s) given twice: {dup}")
        if not 0 <= backoff_jitter < 1:
            raise ValueError(f"backoff_jitter must be in [0, 1), got {backoff_jitter}")
        self.population = population
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.backoff_jitter = backoff_jitter
        self._clock = clock
        self._rng = rng or random.Random()
        self._transport = transport
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout))
        self._discovery_timeout = httpx.Timeout(min(DISCOVERY_TIMEOUT, timeout), connect=min(CONNECT_TIMEOUT, timeout))
        self.servers = [
            RemoteServer(
                u,
                httpx.AsyncClient(
                    base_url=u,
                    headers=self._headers,
                    timeout=self._timeout,
                    # an ensemble request holds one stream per member: no pool limit to queue them behind
                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                    transport=transport,
                ),
            )
            for u in normalized
        ]
        self.gate = _GateView(self.servers)
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(population)
        self._probe_ids = list(self.tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False))
        self.max_model_len: int = 0
        self._by_member: dict[str, list[RemoteServer]] = {}
        self._errored = False
        self._ids = itertools.count()
        self._tag = secrets.token_hex(4)  # request ids stay unique on servers shared by several processes
        self._closing: list[asyncio.Task] = []
        self._late_releases: set[asyncio.Task] = set()
        self._monitors: list[asyncio.Task] = []
        self._unchecked_warned: set[str] = set()  # servers already named as not checkable
        try:
            self._apply(population, self._discover_sync(first=True))
        except BaseException:
            self._close_now()
            raise

    # ------------------------------------------------------------------ discovery

    def _parse_models(self, url: str, resp: httpx.Response) -> tuple[str, int, frozenset[str]]:
        if resp.status_code != 200:
            message, _ = _error_message(resp)
            hint = " (set remote_api_key to the server's --api-key)" if resp.status_code in (401, 403) else ""
            error = _ServerDown if _marks_down(resp.status_code) else RemoteDiscoveryError
            raise error(f"{url}: GET /v1/models answered {resp.status_code}{hint}: {message}")
        try:
            cards = resp.json()["data"]
            bases = [c for c in cards if not c.get("parent")]
            loras = frozenset(c["id"] for c in cards if c.get("parent"))
            base = bases[0]
            return str(base["id"]), int(base["max_model_len"]), loras
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RemoteDiscoveryError(
                f"{url}: GET /v1/models is not a vLLM model list ({type(e).__name__}: {e})"
            ) from None

    def _check_tokens(self, url: str, resp: httpx.Response) -> None:
        if resp.status_code == 404:  # no /tokenize route on this server: cannot check
            log.warning("%s has no /tokenize; not checking that its tokenizer is the base model's", url)
            return
        if resp.status_code != 200:
            message, _ = _error_message(resp)
            error = _ServerDown if _marks_down(resp.status_code) else RemoteDiscoveryError
            raise error(f"{url}: POST /tokenize answered {resp.status_code}: {message}")
        tokens = resp.json().get("tokens")
        if tokens != self._probe_ids:
            raise RemoteDiscoveryError(
                f"{url}: its tokenizer encodes differently from the population's base model "
                f"({self.population.base_model_path or self.population.manifest.base_model.hub_id}); "
                "every server must serve the population's base model"
            )

    def _tokenize_body(self, base: str) -> dict[str, Any]:
        return {"model": base, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}

    def _warn_settings(self, url: str, info: httpx.Response | httpx.HTTPError) -> None:
        """Log what `GET /server_info` (its answer, or how it failed) says is wrong with a server's settings.

        Never refuses the server: the check is advice. That a server could not be checked is
        said once per server; a CPU server with chunked prefill on is named each time it is
        (re-)discovered.
        """
        problem, checked = _settings_problem(url, info)
        if problem and (checked or url not in self._unchecked_warned):
            log.warning("%s", problem)
        if not checked:
            self._unchecked_warned.add(url)

    def _last_seen(self, s: RemoteServer) -> _Found:
        """What discovery found on `s` when it was last reached (a refresh does not ask a down server)."""
        return _Found(s.base_model or "", s.max_model_len or 0, s.members)

    def _discover_sync(self, *, first: bool = False) -> dict[str, _Found]:
        """Ask the servers what they serve. `first`: every server must answer (the constructor); otherwise a
        server that is down, or found down, keeps what it served when last seen."""
        found: dict[str, _Found] = {}
        try:
            with httpx.Client(headers=self._headers, timeout=self._discovery_timeout, transport=self._transport) as c:
                for s in self.servers:
                    if not first and not s.up:
                        found[s.url] = self._last_seen(s)
                        continue
                    try:
                        try:
                            base, max_len, loras = self._parse_models(s.url, c.get(s.url + "/v1/models"))
                            self._check_tokens(s.url, c.post(s.url + "/tokenize", json=self._tokenize_body(base)))
                        except httpx.HTTPError as e:
                            raise _unreachable(s.url, e) from None
                    except _ServerDown as e:
                        if first:
                            raise
                        self._mark_down(s, f"discovery: {e}")
                        found[s.url] = self._last_seen(s)
                        continue
                    except RemoteDiscoveryError as e:
                        if not first:
                            self._mark_down(s, f"discovery: {e}")
                        raise
                    if first:
                        try:
                            info = c.get(s.url + "/server_info", params={"config_format": "json"})
                        except httpx.HTTPError as e:
                            info = e
                        self._warn_settings(s.url, info)
                    found[s.url] = _Found(base, max_len, loras)
        except RemoteDiscoveryError:
            self._errored = True
            raise
        self._errored = False
        return found

    async def _discover_one(self, s: RemoteServer, *, check_settings: bool = False) -> _Found:
        try:
            base, max_len, loras = self._parse_models(
                s.url, await s.client.get("/v1/models", timeout=self._discovery_timeout)
            )
            self._check_tokens(
                s.url,
                await s.client.post("/tokenize", json=self._tokenize_body(base), timeout=self._discovery_timeout),
            )
        except httpx.HTTPError as e:
            raise _unreachable(s.url, e) from None
        if check_settings:
            try:
                info = await s.client.get(
                    "/server_info", params={"config_format": "json"}, timeout=self._discovery_timeout
                )
            except httpx.HTTPError as e:
                info = e
            self._warn_settings(s.url, info)
        return _Found(base, max_len, loras)

    async def _discover(self) -> dict[str, _Found]:
        async def one(s: RemoteServer) -> _Found:
            if not s.up:
                return self._last_seen(s)
            epoch = s.epoch
            try:
                return await self._discover_one(s)
            except _ServerDown as e:
                self._mark_down(s, f"discovery: {e}", epoch=epoch)
                return self._last_seen(s)
            except RemoteDiscoveryError as e:
                self._mark_down(s, f"discovery: {e}", epoch=epoch)
                raise

        try:
            results = await asyncio.gather(*(one(s) for s in self.servers))
        except RemoteDiscoveryError:
            self._errored = True
            raise
        self._errored = False
        return {s.url: f for s, f in zip(self.servers, results)}

    def _apply(self, population: Population, found: dict[str, _Found]) -> None:
        """Route `population`'s members to the servers that serve them; refuse members no server has."""
        by_member = {name: [s for s in self.servers if name in found[s.url].models] for name in population.names}
        missing = [name for name, servers in by_member.items() if not servers]
        if missing:
            served = {s.url: sorted(found[s.url].models) for s in self.servers}
            raise RemoteDiscoveryError(
                f"member(s) {missing} of generation {population.manifest.generation} are served by none of the "
                f"remote vLLM servers (they serve {served}); start a server with --lora-modules NAME=PATH for them "
                "or load them with its POST /v1/load_lora_adapter"
            )
        for s in self.servers:
            f = found[s.url]
            s.base_model, s.max_model_len, s.members = f.base_model, f.max_model_len, f.models
        self.max_model_len = min(f.max_model_len for f in found.values())
        self._by_member = by_member
        self.population = population

    def _route(self) -> None:
        """Re-route the current population after a server's members changed (it came back up)."""
        self._by_member = {name: [s for s in self.servers if name in s.members] for name in self.population.names}
        lens = [s.max_model_len for s in self.servers if s.max_model_len]
        if lens:
            self.max_model_len = min(lens)

    async def start(self) -> None:
        """Discover the servers again (without blocking the event loop) for the current population."""
        self._apply(self.population, await self._discover())

    def set_population(self, population: Population) -> None:
        """Serve `population` from now on; discovers the servers again and refuses members none of them serve."""
        old = self.population
        if (
            population.manifest.base_model.sha256 != old.manifest.base_model.sha256
            or population.base_model_path != old.base_model_path
        ):
            raise ValueError(
                f"{population.root}: the base model changed; a new base model needs a restart of the server"
            )
        self._apply(population, self._discover_sync())

    def servers_of(self, member: str | None) -> list[RemoteServer]:
        """The servers that are up and serve `member` (every up server for the base model).

        Raises `MemberUnavailableError` (503) when every server that serves it is down, and
        `RemoteError` for a name that is not a member of the population.
        """
        if member is None:
            candidates = self.servers
        else:
            try:
                candidates = self._by_member[member]
            except KeyError:
                raise RemoteError(f"no remote vLLM server serves member {member!r}") from None
        up = [s for s in candidates if s.up]
        if up:
            return up
        raise self._unavailable(member, candidates)

    def _unavailable(self, member: str | None, down: list[RemoteServer]) -> MemberUnavailableError:
        what = "the base model" if member is None else f"member {member!r}"
        if not down:
            served = {s.url: sorted(s.members) for s in self.servers}
            return MemberUnavailableError(
                f"{what} is unavailable: no remote vLLM server serves it now (they serve {served})"
            )
        now = self._clock()
        waits = [max(0.0, s.retry_at - now) for s in down if s.retry_at is not None]
        servers = "; ".join(f"{s.url} ({s.reason})" for s in down)
        retry = f"; next retry in {min(waits):.1f} s" if waits else ""
        headers = {"Retry-After": str(max(1, math.ceil(min(waits))))} if waits else None
        return MemberUnavailableError(
            f"{what} is unavailable: its remote vLLM server{'s are' if len(down) > 1 else ' is'} down: {servers}{retry}",
            headers=headers,
        )

    def unavailable_members(self) -> list[str]:
        """The population's members that no up server serves now, in manifest order."""
        return [m for m in self.population.names if not any(s.up for s in self._by_member.get(m, ()))]

    def health(self) -> dict[str, Any]:
        """Each server's state: `{"servers": [{"url", "up", "reason", "retry_in_s", "members"}]}`."""
        now = self._clock()
        return {
            "servers": [
                {
                    "url": s.url,
                    "up": s.up,
                    "reason": s.reason,
                    "retry_in_s": None if s.up or s.retry_at is None else round(max(0.0, s.retry_at - now), 2),
                    "members": sorted(s.members),
                }
                for s in self.servers
            ]
        }

    def _pick(self, member: str | None) -> RemoteServer:
        return min(self.servers_of(member), key=lambda s: s.inflight)  # first of the least busy

    # ------------------------------------------------------------------ liveness

    def _backoff(self, failures: int) -> float:
        """Seconds before retry number `failures + 1` of a down server (capped, with jitter)."""
        delay = min(self.backoff_max, self.backoff_initial * 2.0**failures)
        return delay * (1.0 - self.backoff_jitter * self._rng.random())

    def _mark_down(self, s: RemoteServer, reason: str, *, epoch: int | None = None) -> None:
        """Take `s` out of routing (no-op if it is already down, or if it came back up since `epoch`)."""
        if not s.up or (epoch is not None and epoch != s.epoch):
            return
        s.up, s.reason, s.failures = False, reason, 0
        s.retry_at = self._clock() + self._backoff(0)
        lost = [m for m in self.unavailable_members() if s in self._by_member.get(m, ())]
        log.warning(
            "remote vLLM server %s is down (%s); unavailable now: %s; retrying in %.1f s",
            s.url,
            reason,
            ", ".join(lost) or "no member",
            s.retry_at - self._clock(),
        )
        s.wake.set()

    def _mark_up(self, s: RemoteServer, found: _Found) -> None:
        s.base_model, s.max_model_len, s.members = found.base_model, found.max_model_len, found.models
        s.up, s.reason, s.retry_at, s.failures = True, None, None, 0
        s.epoch += 1
        s.next_probe = self._clock() + self.probe_interval
        self._route()
        if all(x.up for x in self.servers):
            self._errored = False  # every server has been discovered since the discovery that failed
        log.warning(
            "remote vLLM server %s is up again; it serves %s", s.url, ", ".join(sorted(s.members)) or "no member"
        )

    async def _probe(self, s: RemoteServer) -> str | None:
        """None if `s` answers `GET /health` with 200, else what went wrong."""
        try:
            resp = await s.client.get("/health", timeout=self.probe_timeout)
        except httpx.HTTPError as e:
            return f"GET /health failed: {type(e).__name__}: {e}".rstrip(": ")
        if resp.status_code != 200:
            return f"GET /health answered {resp.status_code}" + (
                " (its engine is dead)" if resp.status_code == 503 else ""
            )
        return None

    async def check_server(self, s: RemoteServer) -> bool:
        """One liveness check of `s` now (what the monitor runs when it is due); returns whether it is up.

        An up server's /health is probed. A down server is retried: /health, then discovery
        (its members now, its tokenizer, its settings); on success it is up and routed again,
        otherwise its next retry waits twice as long as the last (up to `backoff_max`).
        """
        epoch = s.epoch
        if s.up:
            problem = await self._probe(s)
            if problem is None:
                s.next_probe = self._clock() + self.probe_interval
            else:
                self._mark_down(s, problem, epoch=epoch)
            return s.up
        problem = await self._probe(s)
        found = None
        if problem is None:
            try:
                found = await self._discover_one(s, check_settings=True)
            except RemoteDiscoveryError as e:
                problem = f"discovery: {e}"
        if s.up:  # brought up meanwhile by another check
            return True
        if found is None:
            s.failures += 1
            s.reason = problem
            s.retry_at = self._clock() + self._backoff(s.failures)
            log.info(
                "remote vLLM server %s is still down (%s); retrying in %.1f s",
                s.url,
                problem,
                s.retry_at - self._clock(),
            )
            return False
        self._mark_up(s, found)
        return True

    async def start_monitor(self) -> None:
        """Start watching every server (from the running event loop; `shutdown` stops it). Idempotent."""
        if any(not t.done() for t in self._monitors):
            return
        loop = asyncio.get_running_loop()
        now = self._clock()
        for s in self.servers:
            if s.up:
                s.next_probe = now + self.probe_interval
        self._monitors = [
            loop.create_task(self._watch(s), name=f"ensemble-serve monitor {s.url}") for s in self.servers
        ]

    async def warm(self) -> None:
        """Called by the app once the backend serves (and after each refresh): start the monitor."""
        await self.start_monitor()

    async def _watch(self, s: RemoteServer) -> None:
        while True:
            due = s.next_probe if s.up else (s.retry_at if s.retry_at is not None else 0.0)
            delay = due - self._clock()
            if delay > 0:
                s.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(s.wake.wait(), delay)
                continue  # woken (it went down) or due: look again
            try:
                await self.check_server(s)
            except asyncio.CancelledError:
                raise
            except Exception:  # the monitor must outlive any surprise
                log.exception("checking remote vLLM server %s failed", s.url)
                await asyncio.sleep(self.probe_interval)

    def _stop_monitor(self) -> None:
        for t in self._monitors:
            t.cancel()
        self._monitors = []

    # ------------------------------------------------------------------ requests

    def next_id(self, prefix: str) -> str:
        return f"{prefix}-{self._tag}-{next(self._ids)}"

    async def generate(
        self, prompt_ids: list[int], params: Any, member: str | None, request_id: str
    ) -> AsyncIterator[RemoteRequestOutput]:
        """Stream cumulative outputs for one request from the server that serves `member`."""
        server = self._pick(member)
        model = member if member is not None else server.base_model
        body = request_body(prompt_ids, params, model, self.max_model_len)
        body["request_id"] = request_id
        keep_logprobs = params.logprobs is not None
        n = params.n
        state: dict[int, RemoteCompletion] = {}
        await server.gate.acquire_shared()
        server.inflight += 1
        epoch = server.epoch
        over = False  # True once the server is done with the request (finished, or refused it)
        try:
            async with server.client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    over = True
                    await resp.aread()
                    raise self._http_error(server, resp, model, epoch)
                done = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        done = over = True
                        break
                    chunk = self._decode(server, data)
                    if "error" in chunk:
                        over = True
                        raise self._stream_error(server, chunk["error"], model, epoch)
                    choices = chunk.get("choices") or []
                    for ch in choices:
                        _fold(state, ch, keep_logprobs)
                    if choices:
                        outs = [state[i] for i in sorted(state)]
                        yield RemoteRequestOutput(request_id, outs, len(outs) == n and all(o.finished() for o in outs))
                if not done or len(state) < n or not all(o.finished() for o in state.values()):
                    raise RemoteError("a remote vLLM server ended the stream before the request finished")
        except httpx.HTTPError as e:
            log.warning("remote vLLM server %s failed during %s: %s: %s", server.url, request_id, type(e).__name__, e)
            if isinstance(e, httpx.TransportError):  # cannot connect, timed out, connection lost
                self._mark_down(server, f"{type(e).__name__} during a request", epoch=epoch)
            raise RemoteError(f"a remote vLLM server failed during the request ({type(e).__name__})") from None
        finally:
            server.inflight -= 1
            if over:
                await server.gate.release_shared()
            else:  # vLLM aborts the request when it notices the closed connection: until then keep scoring out
                self._release_later(server, exclusive=False)

    def _release_later(self, server: RemoteServer, *, exclusive: bool) -> None:
        """Release the server's gate `abort_grace` seconds from now (a request was left running there)."""

        async def release() -> None:
            try:
                await asyncio.sleep(self.abort_grace)
            finally:
                await (server.gate.release_exclusive() if exclusive else server.gate.release_shared())

        task = asyncio.get_running_loop().create_task(release())
        self._late_releases.add(task)
        task.add_done_callback(self._late_releases.discard)

    async def score(self, prompt_ids: list[int], continuations: Sequence[list[int]], member: str | None) -> list[float]:
        """Mean log-probability of each continuation after the prompt, under one member (prompt logprobs).

        Runs with the chosen server's gate held exclusively and one request at a time (see
        the module docstring). A continuation that reaches the context limit is scored on
        the tokens that fit.
        """
        server = self._pick(member)
        model = member if member is not None else server.base_model
        n = len(prompt_ids)
        limit = (server.max_model_len or self.max_model_len) - 1  # the request still asks for one token
        running = False  # a scoring request was sent and its answer has not come back
        epoch = server.epoch

        async def one(cont: list[int]) -> float:
            nonlocal running
            ids = (list(prompt_ids) + list(cont))[:limit]
            if not cont or len(ids) <= n:
                return float("-inf")
            body = {
                "model": model,
                "prompt": ids,
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": 0,
                "request_id": self.next_id("score"),
            }
            running = True
            try:
                resp = await server.client.post("/v1/completions", json=body)
            except httpx.HTTPError as e:
                log.warning("remote vLLM server %s failed while scoring: %s: %s", server.url, type(e).__name__, e)
                if isinstance(e, httpx.TransportError):
                    self._mark_down(server, f"{type(e).__name__} while scoring", epoch=epoch)
                raise RemoteError(f"a remote vLLM server failed while scoring ({type(e).__name__})") from None
            running = False
            if resp.status_code != 200:
                raise self._http_error(server, resp, model, epoch)
            try:
                lps = resp.json()["choices"][0]["prompt_logprobs"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise RemoteError("a remote vLLM server answered a scoring request without prompt_logprobs") from None
            if not lps:
                return float("-inf")
            total = 0.0
            for pos in range(n, len(ids)):
                entry = lps[pos] if pos < len(lps) else None
                hit = entry.get(str(ids[pos])) if entry else None
                total += float(hit["logprob"]) if hit else float("-inf")
            return total / (len(ids) - n)

        await server.gate.acquire_exclusive()
        server.inflight += 1
        try:
            return [await one(c) for c in continuations]  # never two prompt-logprobs requests in one step
        finally:
            server.inflight -= 1
            if running:  # cancelled or cut off mid-request: let vLLM abort it first
                self._release_later(server, exclusive=True)
            else:
                await server.gate.release_exclusive()

    # ------------------------------------------------------------------ errors

    def _decode(self, server: RemoteServer, data: str) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except ValueError:
            log.warning("remote vLLM server %s sent an event that is not JSON: %.200s", server.url, data)
            raise RemoteError("a remote vLLM server sent an event that is not JSON") from None
        if not isinstance(chunk, dict):
            raise RemoteError("a remote vLLM server sent an event that is not a JSON object")
        return chunk

    def _http_error(self, server: RemoteServer, resp: httpx.Response, model: str, epoch: int) -> Exception:
        message, param = _error_message(resp)
        if resp.status_code >= 500 or resp.status_code in (401, 403, 404):
            log.warning("remote vLLM server %s answered %s for %s: %s", server.url, resp.status_code, model, message)
        if _marks_down(resp.status_code) or _engine_dead(message):
            self._mark_down(server, f"answered {resp.status_code}: {message[:200]}", epoch=epoch)
        return _mapped_error(resp.status_code, message, param, model)

    def _stream_error(self, server: RemoteServer, err: Any, model: str, epoch: int) -> Exception:
        """An error event inside the stream (vLLM sends `data: {"error": {...}}` after a 200)."""
        if isinstance(err, dict):
            message = str(err.get("message") or err)
            code = err.get("code")
            status = code if isinstance(code, int) else 500
            param = err.get("param") if isinstance(err.get("param"), str) else None
        else:
            message, status, param = str(err), 500, None
        log.warning("remote vLLM server %s sent an error for %s: %s", server.url, model, message)
        if _marks_down(status) or _engine_dead(message):  # vLLM's EngineDeadError comes as a 500 in the stream
            self._mark_down(server, f"error {status} in a stream: {message[:200]}", epoch=epoch)
        return _mapped_error(status, message, param, model)

    # ------------------------------------------------------------------ lifecycle

    async def check_health(self) -> None:
        """Raise RemoteError unless every server answers `GET /health` with 200."""
        for s in self.servers:
            try:
                resp = await s.client.get("/health", timeout=self._discovery_timeout)
            except httpx.HTTPError as e:
                raise RemoteError(f"{s.url} is unreachable: {type(e).__name__}") from None
            if resp.status_code != 200:
                raise RemoteError(f"{s.url} is unhealthy: HTTP {resp.status_code}")

    @property
    def errored(self) -> bool:
        """True while the last discovery could not reach or use a server (/health then answers 503)."""
        return self._errored

    async def aclose(self) -> None:
        self._stop_monitor()
        await asyncio.gather(*(s.client.aclose() for s in self.servers), return_exceptions=True)

    def shutdown(self) -> None:
        """Stop the monitor and close the HTTP clients (scheduled on the running loop when there is one)."""
        self._stop_monitor()
        self._close_now()

    def _close_now(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self._closing.append(loop.create_task(self.aclose()))
            return
        try:
            asyncio.run(self.aclose())
        except RuntimeError as e:  # pragma: no cover - closing idle connections at exit
            log.debug("closing the remote clients: %s", e)


def _fold(state: dict[int, RemoteCompletion], ch: dict[str, Any], keep_logprobs: bool) -> None:
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
        tokens = lp.get("tokens") or []
        token_lps = lp.get("token_logprobs") or [None] * len(tokens)
        tops = lp.get("top_logprobs") or [None] * len(tokens)
        for token, token_lp, top in zip(tokens, token_lps, tops):
            tid = _token_id(token)
            out.token_ids.append(tid)
            if not keep_logprobs:
                continue
            if token_lp is None:
                out.logprobs.append(None)
                continue
            out.logprobs.append(_logprob_entry(tid, float(token_lp), top))
            out.cumulative_logprob += float(token_lp)
    elif ch.get("token_ids"):
        out.token_ids.extend(int(t) for t in ch["token_ids"])
    if ch.get("finish_reason") is not None:
        out.finish_reason = ch["finish_reason"]
        out.stop_reason = ch.get("stop_reason")


def _load_tokenizer(population: Population) -> Any:
    from transformers import AutoTokenizer

    source = population.base_model_path or population.manifest.base_model.hub_id
    if source is None:
        raise ValueError(f"population {population.root} names no base model path or hub id")
    return AutoTokenizer.from_pretrained(str(source))
