"""Discovery: what each remote vLLM server serves, and whether it can serve the population at all.

A server is asked `GET /v1/models` (which members it serves, its base model's name, its
`max_model_len`) and `POST /tokenize` of `TOKENIZER_PROBE`: a server whose tokenizer encodes
differently from the population's base model is refused. The backend's constructor and
`set_population` discover synchronously (the app's lifespan reads `max_model_len` right away,
and a server that is down or a member no server has should stop `ensemble-serve up` at once
with a message that names it); `discover` does the same without blocking the event loop. A
refresh asks only the servers that are up: a server that is down (or found down by the
refresh: unreachable, or answering 5xx, `ServerDown`) keeps the members it served when last
seen, and the monitor re-discovers it when it comes back. Only names are matched: a remote
server must load a new generation's adapters itself (start it with them, or
`POST /v1/load_lora_adapter` with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`), and a member name must
keep meaning the same weights, as the trainer's do.

Settings. vLLM's CPU sampler kills the engine ("CPU Generator does not use offset", then
`EngineDeadError`) when a seeded request's prefill is split over engine steps, so CPU servers
must run with `--no-enable-chunked-prefill`. The first discovery of a server (and its
re-discovery after it was down) reads its configuration from
`GET /server_info?config_format=json`, which vLLM serves only with `VLLM_SERVER_DEV_MODE=1`: a
CPU server with chunked prefill on is named in a warning each time; a server without that route
gets one warning that it could not be checked. Neither refuses the server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import httpx

from ensemble_serve.engine.remote.servers import Found, MarkDown, RemoteServer
from ensemble_serve.engine.remote.wire import error_message, marks_down
from ensemble_serve.shared.population import Population
from ensemble_serve.shared.vllm_api import read_model_list, tokenize_body

log = logging.getLogger("ensemble_serve")

DISCOVERY_TIMEOUT = 30.0
CHUNKED_PREFILL_FLAG = "--no-enable-chunked-prefill"


class RemoteDiscoveryError(ValueError):
    """The remote servers cannot serve this population: one is unreachable, differs, or lacks members."""


class ServerDown(RemoteDiscoveryError):
    """Discovery could not reach a server, or it answered 5xx: the server is down, not misconfigured."""


def base_source(population: Population) -> Any:
    """Where the population's base model comes from (its local path, else its hub id), as messages name it."""
    return population.base_model_path or population.manifest.base_model.hub_id


def parse_models(url: str, resp: httpx.Response) -> tuple[str, int, frozenset[str]]:
    """(base model name, max_model_len, LoRA adapters) from a server's `GET /v1/models` answer."""
    if resp.status_code != 200:
        message, _ = error_message(resp)
        hint = " (set remote_api_key to the server's --api-key)" if resp.status_code in (401, 403) else ""
        error = ServerDown if marks_down(resp.status_code) else RemoteDiscoveryError
        raise error(f"{url}: GET /v1/models answered {resp.status_code}{hint}: {message}")
    try:
        name, _root, max_len, loras = read_model_list(resp.json())
        return name, max_len, loras
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise RemoteDiscoveryError(
            f"{url}: GET /v1/models is not a vLLM model list ({type(e).__name__}: {e})"
        ) from None


def settings_problem(url: str, info: httpx.Response | httpx.HTTPError) -> tuple[str | None, bool]:
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


def _unreachable(url: str, e: Exception) -> ServerDown:
    return ServerDown(f"{url}: cannot reach the vLLM server ({type(e).__name__}: {e})")


class Discovery:
    """Asks the servers what they serve (see the module docstring).

    `probe_ids` are the population's tokenizer's ids of `TOKENIZER_PROBE`; `mark_down` takes a
    server that a refresh finds down or misconfigured out of routing. The first discovery
    (`first=True`: the constructor's) marks nothing down: every server must answer, or it fails.
    """

    def __init__(
        self,
        *,
        headers: dict[str, str],
        timeout: httpx.Timeout,
        transport: Any,
        probe_ids: list[int],
        mark_down: MarkDown,
    ):
        self._headers = headers
        self.timeout = timeout
        self._transport = transport
        self._probe_ids = probe_ids
        self._mark_down = mark_down
        self._unchecked_warned: set[str] = set()  # servers already named as not checkable

    # ------------------------------------------------------------------ synchronous (construction, refresh)

    def discover_sync(self, servers: Sequence[RemoteServer], base: Any, *, first: bool) -> dict[str, Found]:
        """What every server serves, by URL. `first`: every server must answer (the constructor); otherwise a
        server that is down, or found down, keeps what it served when last seen. `base`: see `base_source`."""
        with httpx.Client(headers=self._headers, timeout=self.timeout, transport=self._transport) as c:
            return {s.url: self._ask_sync(c, s, base, first=first) for s in servers}

    def _ask_sync(self, c: httpx.Client, s: RemoteServer, base: Any, *, first: bool) -> Found:
        if not first and not s.up:
            return s.last_seen()
        try:
            try:
                name, max_len, loras = parse_models(s.url, c.get(s.url + "/v1/models"))
                self.check_tokens(s.url, c.post(s.url + "/tokenize", json=tokenize_body(name)), base)
            except httpx.HTTPError as e:
                raise _unreachable(s.url, e) from None
        except ServerDown as e:
            if first:
                raise
            self._mark_down(s, f"discovery: {e}")
            return s.last_seen()
        except RemoteDiscoveryError as e:
            if not first:
                self._mark_down(s, f"discovery: {e}")
            raise
        if first:
            try:
                info: httpx.Response | httpx.HTTPError = c.get(s.url + "/server_info", params={"config_format": "json"})
            except httpx.HTTPError as e:
                info = e
            self.warn_settings(s.url, info)
        return Found(name, max_len, loras)

    # ------------------------------------------------------------------ asynchronous (start, recovery)

    async def discover(self, servers: Sequence[RemoteServer], base: Any) -> dict[str, Found]:
        """`discover_sync` (not the first) without blocking the event loop: the servers are asked at once."""
        results = await asyncio.gather(*(self._ask(s, base) for s in servers))
        return {s.url: f for s, f in zip(servers, results)}

    async def _ask(self, s: RemoteServer, base: Any) -> Found:
        if not s.up:
            return s.last_seen()
        epoch = s.epoch
        try:
            return await self.discover_one(s, base)
        except ServerDown as e:
            self._mark_down(s, f"discovery: {e}", epoch=epoch)
            return s.last_seen()
        except RemoteDiscoveryError as e:
            self._mark_down(s, f"discovery: {e}", epoch=epoch)
            raise

    async def discover_one(self, s: RemoteServer, base: Any, *, check_settings: bool = False) -> Found:
        """What `s` serves (raises `RemoteDiscoveryError`, `ServerDown` if it cannot be reached); with
        `check_settings` its settings are checked too (a server coming back up)."""
        try:
            name, max_len, loras = parse_models(s.url, await s.client.get("/v1/models", timeout=self.timeout))
            self.check_tokens(
                s.url, await s.client.post("/tokenize", json=tokenize_body(name), timeout=self.timeout), base
            )
        except httpx.HTTPError as e:
            raise _unreachable(s.url, e) from None
        if check_settings:
            try:
                info: httpx.Response | httpx.HTTPError = await s.client.get(
                    "/server_info", params={"config_format": "json"}, timeout=self.timeout
                )
            except httpx.HTTPError as e:
                info = e
            self.warn_settings(s.url, info)
        return Found(name, max_len, loras)

    # ------------------------------------------------------------------ checks

    def check_tokens(self, url: str, resp: httpx.Response, base: Any) -> None:
        """Refuse a server whose `POST /tokenize` of the probe differs from the population's tokenizer."""
        if resp.status_code == 404:  # no /tokenize route on this server: cannot check
            log.warning("%s has no /tokenize; not checking that its tokenizer is the base model's", url)
            return
        if resp.status_code != 200:
            message, _ = error_message(resp)
            error = ServerDown if marks_down(resp.status_code) else RemoteDiscoveryError
            raise error(f"{url}: POST /tokenize answered {resp.status_code}: {message}")
        tokens = resp.json().get("tokens")
        if tokens != self._probe_ids:
            raise RemoteDiscoveryError(
                f"{url}: its tokenizer encodes differently from the population's base model ({base}); "
                "every server must serve the population's base model"
            )

    def warn_settings(self, url: str, info: httpx.Response | httpx.HTTPError) -> None:
        """Log what `GET /server_info` (its answer, or how it failed) says is wrong with a server's settings.

        Never refuses the server: the check is advice. That a server could not be checked is
        said once per server; a CPU server with chunked prefill on is named each time it is
        (re-)discovered.
        """
        problem, checked = settings_problem(url, info)
        if problem and (checked or url not in self._unchecked_warned):
            log.warning("%s", problem)
        if not checked:
            self._unchecked_warned.add(url)
