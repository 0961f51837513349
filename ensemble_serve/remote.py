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
server serves; `await start()` re-discovers without blocking the event loop. Only names
are matched: a remote server must load a new generation's adapters itself (start it
with them, or `POST /v1/load_lora_adapter` with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`),
and a member name must keep meaning the same weights, as the trainer's do.

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
import itertools
import json
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from ensemble_serve.engine import ScoringGate
from ensemble_serve.errors import APIError, BadRequestError, NotImplementedAPIError, ServiceUnavailableError
from ensemble_serve.population import Population

log = logging.getLogger("ensemble_serve")

DEFAULT_TIMEOUT = 600.0  # seconds a remote server may stay silent (a long prefill on a CPU) before a request fails
CONNECT_TIMEOUT = 10.0
DISCOVERY_TIMEOUT = 30.0
TOKEN_ID_PREFIX = "token_id:"
# Encoded here and by each server's /tokenize: a server whose tokenizer differs is refused.
TOKENIZER_PROBE = "ensemble-serve probe: add 478+365 = 843\n#### The quick brown fox, 0.5 * (2 - 3)!"


class RemoteError(APIError):
    """502: a remote vLLM server failed, could not be reached, or answered something unusable."""

    status_code = 502
    error_type = "upstream_error"


class RemoteDiscoveryError(ValueError):
    """The remote servers cannot serve this population: one is unreachable, differs, or lacks members."""


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
    return RemoteDiscoveryError(f"{url}: cannot reach the vLLM server ({type(e).__name__}: {e})")


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
        # the least that gives every token's id and log-probability
        "logprobs": want if want is not None else 0,
        "return_tokens_as_token_ids": True,
    }
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
    ):
        normalized = [normalize_url(u) for u in urls]
        if not normalized:
            raise ValueError("remote mode needs at least one vLLM server URL")
        dup = sorted({u for u in normalized if normalized.count(u) > 1})
        if dup:
            raise ValueError(f"remote server URL(s) given twice: {dup}")
        self.population = population
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
        try:
            self._apply(population, self._discover_sync())
        except BaseException:
            self._close_now()
            raise

    # ------------------------------------------------------------------ discovery

    def _parse_models(self, url: str, resp: httpx.Response) -> tuple[str, int, frozenset[str]]:
        if resp.status_code != 200:
            message, _ = _error_message(resp)
            hint = " (set remote_api_key to the server's --api-key)" if resp.status_code in (401, 403) else ""
            raise RemoteDiscoveryError(f"{url}: GET /v1/models answered {resp.status_code}{hint}: {message}")
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
            raise RemoteDiscoveryError(f"{url}: POST /tokenize answered {resp.status_code}: {message}")
        tokens = resp.json().get("tokens")
        if tokens != self._probe_ids:
            raise RemoteDiscoveryError(
                f"{url}: its tokenizer encodes differently from the population's base model "
                f"({self.population.base_model_path or self.population.manifest.base_model.hub_id}); "
                "every server must serve the population's base model"
            )

    def _tokenize_body(self, base: str) -> dict[str, Any]:
        return {"model": base, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}

    def _discover_sync(self) -> dict[str, _Found]:
        found: dict[str, _Found] = {}
        try:
            with httpx.Client(headers=self._headers, timeout=self._discovery_timeout) as client:
                for s in self.servers:
                    try:
                        base, max_len, loras = self._parse_models(s.url, client.get(s.url + "/v1/models"))
                        self._check_tokens(s.url, client.post(s.url + "/tokenize", json=self._tokenize_body(base)))
                    except httpx.HTTPError as e:
                        raise _unreachable(s.url, e) from None
                    found[s.url] = _Found(base, max_len, loras)
        except RemoteDiscoveryError:
            self._errored = True
            raise
        self._errored = False
        return found

    async def _discover(self) -> dict[str, _Found]:
        async def one(s: RemoteServer) -> _Found:
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
            return _Found(base, max_len, loras)

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
        """The servers that can answer for `member` (every server for the base model)."""
        if member is None:
            return list(self.servers)
        try:
            return self._by_member[member]
        except KeyError:
            raise RemoteError(f"no remote vLLM server serves member {member!r}") from None

    def _pick(self, member: str | None) -> RemoteServer:
        return min(self.servers_of(member), key=lambda s: s.inflight)  # first of the least busy

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
        over = False  # True once the server is done with the request (finished, or refused it)
        try:
            async with server.client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    over = True
                    await resp.aread()
                    raise self._http_error(server, resp, model)
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
                        raise self._stream_error(server, chunk["error"], model)
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
                raise RemoteError(f"a remote vLLM server failed while scoring ({type(e).__name__})") from None
            running = False
            if resp.status_code != 200:
                raise self._http_error(server, resp, model)
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

    def _http_error(self, server: RemoteServer, resp: httpx.Response, model: str) -> Exception:
        message, param = _error_message(resp)
        if resp.status_code >= 500 or resp.status_code in (401, 403, 404):
            log.warning("remote vLLM server %s answered %s for %s: %s", server.url, resp.status_code, model, message)
        return _mapped_error(resp.status_code, message, param, model)

    def _stream_error(self, server: RemoteServer, err: Any, model: str) -> Exception:
        """An error event inside the stream (vLLM sends `data: {"error": {...}}` after a 200)."""
        if isinstance(err, dict):
            message = str(err.get("message") or err)
            code = err.get("code")
            status = code if isinstance(code, int) else 500
            param = err.get("param") if isinstance(err.get("param"), str) else None
        else:
            message, status, param = str(err), 500, None
        log.warning("remote vLLM server %s sent an error for %s: %s", server.url, model, message)
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
        await asyncio.gather(*(s.client.aclose() for s in self.servers), return_exceptions=True)

    def shutdown(self) -> None:
        """Close the HTTP clients (scheduled on the running loop when there is one)."""
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
