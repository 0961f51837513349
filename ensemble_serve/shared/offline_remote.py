"""The trainer's engine on remote vLLM OpenAI servers: `OfflineEngine`'s interface, the chains sampled elsewhere.

`evolve`, `eval`, `router` and `calibrate` take `--remote URL,...` (as `ensemble-serve up` does):
their chains then come from running vLLM servers that share the population's base model, not from
an engine in this process. Each generation's members are loaded onto the servers at run time:

* **What a server must run.** `vllm serve BASE --enable-lora --max-lora-rank R --no-enable-chunked-prefill`
  (the last on the CPU) with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`, which adds
  `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`. A server without it is refused
  with that variable named; so is a server whose tokenizer encodes a probe differently, or whose
  base model is not the population's (by its path or hub id as `GET /v1/models` reports it).
* **Adapters by content.** A member is copied into `adapter_dir` (default: a folder beside the
  population, `.NAME.remote-adapters/`) under the name `<run>-<member>-<sha256 of its files>`,
  checked, and loaded from there: a name always means the same weights, so a server's cache
  (and its prefix cache) can never serve an older generation's weights under a new one's name.
  The servers read that folder through a shared path: the same path by default, or
  `adapter_dir_on_servers` where they mount it elsewhere. A server that cannot read it is
  named with the folder it was asked to read.
* **Stale adapters.** `<run>` is a hash of `adapter_dir`, so a resumed run has the same one:
  each `sync` unloads every adapter of this run that the current generation does not use (from
  a run that was killed, say) and deletes its snapshot. Other runs' adapters are left alone.
* **Spread.** Members are dealt to the servers that are up, in order (member i to server
  i mod k). Every request is a `POST /v1/completions` with the chat-formatted prompt, the
  member's name as the model, and every sampling field set explicitly (the server's
  generation-config defaults apply to no field), so a seeded chain is the one the in-process
  engine samples for the same request, up to the batch it lands in.
* **Faults.** A server that cannot be reached, or answers 5xx, is marked down; its members move
  to the servers that are up (loaded there first) and its requests are sent again, with the
  same seeds. The moves are recorded (`take_events`). With every server down, `generate` raises
  `RemoteUnavailable`; a later `sync` asks the down servers again (`GET /health`) and takes
  back those that answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ensemble_serve.shared.adapters import ADAPTER_FILES, adapter_digest, check_adapter_weights
from ensemble_serve.shared.engine_config import EngineConfig
from ensemble_serve.shared.offline_engine import Generation
from ensemble_serve.shared.population import Population
from ensemble_serve.shared.vllm_api import (
    TOKENIZER_PROBE,
    error_text,
    is_missing_route,
    normalize_server_url,
    read_model_list,
    tokenize_body,
)

log = logging.getLogger("ensemble_serve")

RUNTIME_LORA_FLAG = "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1"
MAX_ATTEMPTS = 8  # sends of one request (each failure moves it, or reloads its adapter) before giving up
SAMPLING_FIELDS = (  # SamplingParams fields sent with every request, whatever their value
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "min_tokens",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
)


class RemoteSetupError(ValueError):
    """The remote servers cannot serve this population; the message names the server and what to change."""


class RemoteUnavailable(RuntimeError):
    """Every remote server is down: nothing can be sampled now."""


class RemoteRequestError(RuntimeError):
    """A server refused a request for its content (4xx): sending it again would not help."""


@dataclass
class RemoteServerState:
    """One server as the engine holds it."""

    url: str
    base_id: str = ""
    up: bool = True
    loaded: set[str] = field(default_factory=set)  # this run's adapters it holds


def run_prefix(adapter_dir: Path) -> str:
    """This run's adapter name prefix: the same for a resumed run (it has the same adapter folder)."""
    return "es" + hashlib.sha256(str(Path(adapter_dir).resolve()).encode()).hexdigest()[:8]


def default_adapter_dir(population_root: Path) -> Path:
    root = Path(population_root).resolve()
    return root.parent / f".{root.name}.remote-adapters"


def request_body(prompt: str, model: str, params: Any) -> dict[str, Any]:
    """A `/v1/completions` body for one prompt with vLLM `SamplingParams` (or any object with its fields)."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "return_token_ids": True}
    for name in SAMPLING_FIELDS:
        value = getattr(params, name, None)
        if value is None:
            continue
        body[name] = list(value) if isinstance(value, list | tuple | set) else value
    return body


class RemoteOfflineEngine:
    """`OfflineEngine`'s interface (`chat_prompt`, `generate`, `sync`) over remote vLLM servers (module docstring)."""

    def __init__(
        self,
        population: Population,
        urls: Sequence[str],
        *,
        api_key: str | None = None,
        adapter_dir: Path | None = None,
        adapter_dir_on_servers: Path | None = None,
        concurrency: int = 32,
        timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
    ):
        if not urls:
            raise RemoteSetupError("no remote servers given")
        from transformers import AutoTokenizer

        self.population = population
        self.servers = [RemoteServerState(normalize_server_url(u)) for u in dict.fromkeys(urls)]
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else default_adapter_dir(population.root)
        self.adapter_dir_on_servers = Path(adapter_dir_on_servers) if adapter_dir_on_servers else None
        self.prefix = run_prefix(self.adapter_dir)
        self.concurrency = concurrency
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._transport, self._async_transport = transport, async_transport
        self._events: list[dict[str, Any]] = []
        self.names: dict[str, str] = {}  # member -> its adapter's name on the servers
        self.assignment: dict[str, str] = {}  # member -> the URL of the server that holds it
        base = population.base_model_path or population.manifest.base_model.hub_id
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        self.cfg = EngineConfig()  # what check_engine reads: a rank it cannot know is the population's
        self._check_servers()
        self.sync(population)

    # ------------------------------------------------------------------ setup

    def _client(self) -> httpx.Client:
        return httpx.Client(headers=self._headers, timeout=self._timeout, transport=self._transport)

    def _check_servers(self) -> None:
        """Every server must answer, run this base model, and load adapters at run time (module docstring)."""
        probe = list(self.tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False))
        with self._client() as c:
            for s in self.servers:
                try:
                    resp = c.get(s.url + "/v1/models")
                    if resp.status_code in (401, 403):
                        raise RemoteSetupError(
                            f"remote vLLM server {s.url} refused the key (GET /v1/models answered "
                            f"{resp.status_code}): set remote_api_key to its --api-key"
                        )
                    if resp.status_code != 200:
                        raise RemoteSetupError(
                            f"remote vLLM server {s.url}: GET /v1/models answered {resp.status_code}: "
                            f"{error_text(resp)}"
                        )
                    try:
                        base_id, root, _max_len, _loras = read_model_list(resp.json())
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        raise RemoteSetupError(f"{s.url}: GET /v1/models is not a vLLM model list ({e})") from None
                    self._check_base(s.url, base_id, root)
                    tok = c.post(s.url + "/tokenize", json=tokenize_body(base_id))
                    try:
                        ids = tok.json().get("tokens") if tok.status_code == 200 else None
                    except (ValueError, AttributeError):
                        ids = None  # not vLLM's answer: refused below, as a different tokenizer
                    if ids != probe:
                        raise RemoteSetupError(
                            f"remote vLLM server {s.url} serves {base_id!r}, whose tokenizer is not the one of "
                            f"{self.population.root}'s base model {self.population.manifest.base_model.name!r}: "
                            "start it with that model"
                        )
                    unload = c.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": f"{self.prefix}-probe"})
                except httpx.HTTPError as e:
                    raise RemoteSetupError(
                        f"cannot reach remote vLLM server {s.url} ({type(e).__name__}: {e})"
                    ) from None
                if is_missing_route(unload):
                    raise RemoteSetupError(
                        f"remote vLLM server {s.url} does not load adapters at run time: start it with "
                        f"{RUNTIME_LORA_FLAG} in its environment (and --enable-lora)"
                    )
                s.base_id = base_id

    def _check_base(self, url: str, base_id: str, root: str) -> None:
        """The server's model must be the population's: the same folder (or its name), or the same hub id."""
        pop = self.population
        want = {pop.manifest.base_model.name, str(pop.manifest.base_model.hub_id or "")}
        if pop.base_model_path is not None:
            local = Path(pop.base_model_path).resolve()
            want |= {str(local), local.name}
        have = {base_id, root, Path(root).name if root else ""}
        if not (want - {""}) & (have - {""}):
            where = pop.base_model_path or pop.manifest.base_model.hub_id
            raise RemoteSetupError(
                f"remote vLLM server {url} serves the base model {base_id!r} ({root}), but "
                f"{pop.root} is on {pop.manifest.base_model.name!r} ({where}): start it with that model"
            )

    # ------------------------------------------------------------------ the OfflineEngine interface

    def chat_prompt(self, user_message: str) -> str:
        """The base model's chat template applied to one user turn (the same text the in-process engine sends)."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
        )

    def sync(self, population: Population) -> None:
        """Serve exactly `population`'s members: snapshot, deal out, load what is missing, unload this run's rest."""
        self.population = population
        self._recover()
        self.names = {m: self._snapshot(population, m) for m in population.names}
        up = [s for s in self.servers if s.up]
        if not up:
            raise RemoteUnavailable(self._all_down())
        self.assignment = {m: up[i % len(up)].url for i, m in enumerate(population.names)}
        with self._client() as c:
            for s in up:
                wanted = {self.names[m] for m, url in self.assignment.items() if url == s.url}
                try:
                    present = self._ours(c, s)
                    for name in sorted(present - wanted):
                        c.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": name})
                    s.loaded = present & wanted
                    for name in sorted(wanted - s.loaded):
                        self._load(c, s, name)
                except (httpx.TransportError, _ServerFailed) as e:
                    self._mark_down(s, e, "sync")
        if any(not self._server(url).up for url in self.assignment.values()):
            self.sync(population)  # a server died while loading: deal its members to the others
            return
        self._prune_snapshots()

    def generate(
        self,
        prompts: Sequence[str],
        members: Sequence[str | None],
        params: Any,
        progress: bool = False,
    ) -> list[list[Generation]]:
        """Each (prompt, member) pair's `n` completions, as `OfflineEngine.generate` returns them."""
        if len(prompts) != len(members):
            raise ValueError(f"{len(prompts)} prompts but {len(members)} members")
        unknown = sorted({m for m in members if m is not None and m not in self.names})
        if unknown:
            raise KeyError(f"unknown member(s) {unknown}; known: {sorted(self.names)}")
        per = list(params) if isinstance(params, list | tuple) else [params] * len(prompts)
        return asyncio.run(self._generate(list(prompts), list(members), per, progress))

    def take_events(self) -> list[dict[str, Any]]:
        """The servers marked down or up again, and the requests sent again, since the last call."""
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        """Unload this run's adapters from the servers that are up (the snapshots stay for a resume)."""
        with self._client() as c:
            for s in self.servers:
                if not s.up:
                    continue
                for name in sorted(s.loaded):
                    try:
                        c.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": name})
                    except httpx.HTTPError:
                        break
                s.loaded.clear()

    # ------------------------------------------------------------------ adapters

    def _snapshot(self, population: Population, member: str) -> str:
        src = population.member_dir(member)
        name = f"{self.prefix}-{member}-{adapter_digest(src)[:16]}"
        dest = self.adapter_dir / name
        if not dest.is_dir():
            tmp = dest.with_name(name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for f in ADAPTER_FILES:
                shutil.copyfile(src / f, tmp / f)
            check_adapter_weights(tmp / "adapter_model.safetensors")
            tmp.rename(dest)
        return name

    def _prune_snapshots(self) -> None:
        keep = set(self.names.values())
        for folder in self.adapter_dir.glob(f"{self.prefix}-*"):
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def _server_path(self, name: str) -> str:
        root = self.adapter_dir_on_servers or self.adapter_dir.resolve()
        return str(root / name)

    def _ours(self, c: httpx.Client, s: RemoteServerState) -> set[str]:
        resp = c.get(s.url + "/v1/models")
        if resp.status_code >= 500:
            raise _ServerFailed(f"GET /v1/models answered {resp.status_code}")
        _, _, _, loras = read_model_list(resp.json())
        return {n for n in loras if n.startswith(self.prefix + "-")}

    def _load(self, c: httpx.Client, s: RemoteServerState, name: str) -> None:
        path = self._server_path(name)
        resp = c.post(s.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        if resp.status_code >= 500 and "not found" not in error_text(resp).lower():
            raise _ServerFailed(f"POST /v1/load_lora_adapter answered {resp.status_code}: {error_text(resp)}")
        if resp.status_code != 200 and "already been loaded" not in error_text(resp):
            raise RemoteSetupError(self._unreadable(s.url, path, resp))
        s.loaded.add(name)

    def _unreadable(self, url: str, path: str, resp: httpx.Response) -> str:
        return (
            f"remote vLLM server {url} could not load {path} (answered {resp.status_code}: {error_text(resp)}). "
            "The servers read the members from a folder they share with this machine: check that they see "
            f"{self.adapter_dir_on_servers or self.adapter_dir.resolve()} (set remote_adapter_dir to a shared "
            "folder, and remote_adapter_dir_on_servers if they mount it at another path), and that their "
            "--max-lora-rank holds the members' rank"
        )

    # ------------------------------------------------------------------ servers up and down

    def _server(self, url: str) -> RemoteServerState:
        return next(s for s in self.servers if s.url == url)

    def _all_down(self) -> str:
        return (
            "every remote vLLM server is down ("
            + ", ".join(s.url for s in self.servers)
            + "): nothing can be sampled until one answers again"
        )

    def _mark_down(self, s: RemoteServerState, error: Exception | str, during: str) -> dict[str, Any]:
        if s.up:
            s.up = False
            s.loaded.clear()
            event = {"server": s.url, "event": "down", "during": during, "error": str(error)[:300], "retried": 0}
            self._events.append(event)
            log.warning("remote vLLM server %s is down (%s): its members move to the others", s.url, error)
            return event
        return next(e for e in reversed(self._events) if e["server"] == s.url and e["event"] == "down")

    def _recover(self) -> None:
        with self._client() as c:
            for s in self.servers:
                if s.up:
                    continue
                try:
                    if c.get(s.url + "/health", timeout=10).status_code != 200:
                        continue
                except httpx.HTTPError:
                    continue
                s.up = True
                self._events.append({"server": s.url, "event": "up"})
                log.info("remote vLLM server %s is up again", s.url)

    async def _holder(self, ac: httpx.AsyncClient, member: str, lock: asyncio.Lock) -> RemoteServerState:
        """An up server holding `member`: its own, else the next up one in the member's turn (loaded there first)."""
        async with lock:
            name = self.names[member]
            turn = list(self.names).index(member)
            while True:
                current = self._server(self.assignment[member])
                if current.up:
                    target = current
                else:
                    up = [s for s in self.servers if s.up]
                    if not up:
                        raise RemoteUnavailable(self._all_down())
                    target = up[turn % len(up)]
                if name in target.loaded:
                    break
                path = self._server_path(name)
                try:
                    resp = await ac.post(
                        target.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
                    )
                    if resp.status_code >= 500 and "not found" not in error_text(resp).lower():
                        raise _ServerFailed(f"POST /v1/load_lora_adapter answered {resp.status_code}")
                except (httpx.TransportError, _ServerFailed) as e:
                    self._mark_down(target, e, "sampling")
                    continue
                if resp.status_code != 200 and "already been loaded" not in error_text(resp):
                    raise RemoteSetupError(self._unreadable(target.url, path, resp))
                target.loaded.add(name)
                break
            if target is not current:
                self.assignment[member] = target.url
                for e in reversed(self._events):
                    if e["server"] == current.url and e["event"] == "down":
                        e.setdefault("moved", {})[member] = target.url
                        break
            return target

    # ------------------------------------------------------------------ sampling

    async def _generate(
        self, prompts: list[str], members: list[str | None], params: list[Any], progress: bool
    ) -> list[list[Generation]]:
        results: list[list[Generation] | None] = [None] * len(prompts)
        gates = {s.url: asyncio.Semaphore(self.concurrency) for s in self.servers}
        lock = asyncio.Lock()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts), desc="remote sampling", unit="req")
        limits = httpx.Limits(max_connections=self.concurrency * len(self.servers) + 8)
        async with httpx.AsyncClient(
            headers=self._headers, timeout=self._timeout, transport=self._async_transport, limits=limits
        ) as ac:

            async def one(i: int) -> None:
                member = members[i]
                for _attempt in range(MAX_ATTEMPTS):
                    if member is None:
                        up = [s for s in self.servers if s.up]
                        if not up:
                            raise RemoteUnavailable(self._all_down())
                        server = up[i % len(up)]
                        model = server.base_id
                    else:
                        server = await self._holder(ac, member, lock)
                        model = self.names[member]
                    body = request_body(prompts[i], model, params[i])
                    try:
                        async with gates[server.url]:
                            resp = await ac.post(server.url + "/v1/completions", json=body)
                    except httpx.TransportError as e:
                        self._mark_down(server, e, "sampling")["retried"] += 1
                        continue
                    if resp.status_code >= 500:
                        self._mark_down(server, f"{resp.status_code}: {error_text(resp)}", "sampling")["retried"] += 1
                        continue
                    if resp.status_code == 404 and member is not None:  # restarted since: it lost the adapter
                        server.loaded.discard(model)
                        self._events.append({"server": server.url, "event": "reloaded", "member": member})
                        continue
                    if resp.status_code != 200:
                        raise RemoteRequestError(
                            f"remote vLLM server {server.url} refused a request for {member or 'the base model'} "
                            f"({resp.status_code}): {error_text(resp)}"
                        )
                    choices = sorted(resp.json()["choices"], key=lambda ch: ch.get("index", 0))
                    results[i] = [
                        Generation(member, ch["text"], len(ch.get("token_ids") or []), ch.get("finish_reason"))
                        for ch in choices
                    ]
                    if bar is not None:
                        bar.update(1)
                    return
                raise RemoteRequestError(
                    f"a request for {member or 'the base model'} failed {MAX_ATTEMPTS} times on the remote servers"
                )

            try:
                await asyncio.gather(*(one(i) for i in range(len(prompts))))
            finally:
                if bar is not None:
                    bar.close()
        return [r or [] for r in results]


class _ServerFailed(Exception):
    """A server answered 5xx to a call that set it up: treated as down, like one that cannot be reached."""
