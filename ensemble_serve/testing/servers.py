"""Servers in subprocesses, for end-to-end tests and benchmarks: `ensemble-serve up` and vLLM's own OpenAI server.

One helper for both: tests and the scripts in bench/ import it as `ensemble_serve.testing.servers`. Every server is `launch`ed in its own process group (its
own session) with its output in a log file, and `wait_healthy` waits until its `GET /health`
answers 200 (recording `started_s`); one that exits first, or does not come up in time, fails
with the error lines of its log and its tail. `Server.stop` sends SIGTERM (SIGKILL after a
grace), then SIGKILL to whatever is left of its group (vLLM's engine core and workers); `Server.kill`
SIGKILLs the group at once. Test fixtures end their servers with `kill`: vLLM's engine takes about
7 s to stop on SIGTERM (its worker and engine-core grace periods), and the graceful path has tests
of its own (tests/hostile/test_termination_e2e.py).
Measurements: a Prometheus metric's samples (`metric`) and the CPU time of a server's process
group (`ServerProcess.cpu_seconds`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from ensemble_serve.shared.embedded import EMBEDDED_POPULATION, EMBEDDED_SUBSTRATE
from ensemble_serve.shared.population import prune_unreferenced, read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[2]  # the repository (the harness runs from a checkout)
API_KEY = "test-key-123"
VLLM_KEY = "remote-key-456"  # the vLLM servers' --api-key: ensemble-serve must send it (--remote-api-key)
VLLM_START_TIMEOUT = 420.0  # two vLLM servers start at once on 2 shared cores: about 60 s idle, 4 min under load
POLL_S = 0.5  # seconds between two looks at a starting server
STOP_GRACE = 30.0  # seconds a server may take to exit on SIGTERM before it is killed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PLAIN_MEMBERS = 8  # members of a plain copy: m00..m07


def copy_embedded(dest: Path, *, as_shipped: bool = False) -> Path:
    """A private copy of the embedded substrate + population (tests may change the population).

    By default a PLAIN copy: the first 8 members (`m00`..`m07`, every family's specialist and two
    more) with no router, reliability table, voting weights or request defaults, so that a request
    with no options fans out to all 8 and takes a majority: the mechanics most tests check. The
    tests of routing, calibration and the shipped defaults add them back, or ask `as_shipped`.
    """
    shutil.copytree(EMBEDDED_SUBSTRATE, dest / "substrate")
    shutil.copytree(EMBEDDED_POPULATION, dest / "population")
    root = dest / "population"
    if not as_shipped:
        manifest = read_manifest(root)
        plain = manifest.model_copy(
            update={
                "members": manifest.members[:PLAIN_MEMBERS],
                "router": None,
                "reliability": None,
                "voting_weights": None,
                "ensemble_defaults": None,
            }
        )
        write_manifest(root, plain)
        prune_unreferenced(root)
        for entry in (manifest.router, manifest.reliability):  # their files too, so nothing reads them by accident
            path = root / str((entry or {}).get("path", ""))
            if entry and path != root and path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return root


_plain: Path | None = None


def plain_embedded() -> Path:
    """One plain copy (see `copy_embedded`) per test process, for tests that only read it."""
    global _plain
    if _plain is None:
        tmp = Path(tempfile.mkdtemp(prefix="ensemble-serve-plain-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        _plain = copy_embedded(tmp)
    return _plain


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a server or CLI subprocess: offline, quiet tokenizers, no usage statistics."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_NO_USAGE_STATS": "1",
        **(extra or {}),
    }


def metric(url: str, name: str, *, headers: dict[str, str] | None = None, **labels: str) -> float:
    """Sum of a Prometheus metric's samples on `url`/metrics (optionally only those with these labels)."""
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[-1])
    return total


# ---------------------------------------------------------------- one server process


@dataclass
class ServerProcess:
    """A server listening on `url`, running as `proc` (the leader of its own process group)."""

    name: str
    url: str
    proc: subprocess.Popen
    log: Path
    api_key: str | None = None  # what its clients send as a bearer token
    launched_at: float = 0.0  # time.perf_counter() when it was launched
    started_s: float = 0.0  # seconds from its launch until its /health answered 200

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw: Any):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0, **kw)

    def async_client(self, **kw: Any):
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0, **kw)

    def alive(self) -> bool:
        """Whether its `GET /health` answers 200."""
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def metric(self, name: str, **labels: str) -> float:
        """Sum of one of its Prometheus metric's samples (optionally only those with these labels)."""
        return metric(self.url, name, headers=self.headers, **labels)

    def cpu_seconds(self) -> float:
        """User+system CPU time of the server's whole process group so far (from /proc)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        pgid = self.proc.pid
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:  # field 5 of stat: pgrp
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def failure(self, what: str) -> str:
        """`what`, the log's error lines (the root cause sits above the final traceback) and its tail."""
        text = self.log.read_text(errors="replace")
        errors = [line for line in text.splitlines() if "Error" in line and "ulimit" not in line][:20]
        return f"server {self.name} {what}:\n" + "\n".join(errors) + "\n...\n" + text[-4000:]

    def kill(self) -> None:
        """SIGKILL the whole process group (API server, engine core, workers) at once: a crash, or a fast teardown."""
        self._kill_group()
        self.proc.wait()

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the server (it stops its own engine), SIGKILL after `grace` s, then whatever is left of its group."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._kill_group()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Server(ServerProcess):
    """`ensemble-serve up`."""

    population: Path | None = None  # the population folder it serves


@dataclass
class VLLMServer(ServerProcess):
    """`python -m vllm.entrypoints.openai.api_server`."""

    def healthy(self) -> bool:
        """Whether its `GET /health` answers 200 (vLLM answers 503 once its engine is dead)."""
        return self.alive()


S = TypeVar("S", bound=ServerProcess)


def launch(
    kind: type[S],
    name: str,
    args: list[str],
    port: int,
    log: Path,
    *,
    append: bool = False,
    env: dict[str, str] | None = None,
    **fields: Any,
) -> S:
    """Start `args` (a server that will listen on 127.0.0.1:`port`) in its own process group; not waited for.

    Its output goes to `log` (appended to with `append`); `env` adds environment variables to
    `server_env()`; `fields` are the server's other fields (`api_key`, `population`).
    """
    launched_at = time.perf_counter()
    proc = subprocess.Popen(
        args,
        stdout=log.open("a" if append else "w"),
        stderr=subprocess.STDOUT,
        env=server_env(env),
        cwd=ROOT,
        start_new_session=True,
    )
    return kind(name=name, url=f"http://127.0.0.1:{port}", proc=proc, log=log, launched_at=launched_at, **fields)


def wait_healthy(servers: Sequence[ServerProcess], timeout: float = VLLM_START_TIMEOUT) -> None:
    """Wait until every server's /health answers 200 (each one's `started_s` is then set).

    RuntimeError, with the server's log, if one exits first or they are not all up in `timeout` s.
    """
    deadline = time.monotonic() + timeout
    waiting = list(servers)
    while waiting and time.monotonic() < deadline:
        for s in list(waiting):
            if s.proc.poll() is not None:
                raise RuntimeError(s.failure(f"exited with {s.proc.returncode}"))
            if s.alive():
                s.started_s = time.perf_counter() - s.launched_at
                waiting.remove(s)
        if waiting:
            time.sleep(POLL_S)
    if waiting:
        raise RuntimeError(waiting[0].failure(f"did not start in {timeout}s"))


# ---------------------------------------------------------------- commands


def ensemble_command(port: int, *extra: str) -> list[str]:
    """`ensemble-serve up` on 127.0.0.1:`port` with the options `extra`."""
    return [sys.executable, "-m", "ensemble_serve.cli", "up", "--port", str(port), *extra]


def vllm_command(
    model: str | Path, port: int, lora_modules: Sequence[str], *extra: str, max_loras: int, max_lora_rank: int = 16
) -> list[str]:
    """vLLM's OpenAI server for `model` on 127.0.0.1:`port`, serving `lora_modules` (`NAME=PATH`) as the embedded
    members are served: LoRA ranks up to `max_lora_rank` (one of vLLM's sizes), `max_loras` adapters per batch
    (and in CPU memory), float32, eager."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-lora",
        "--lora-modules",
        *lora_modules,
        "--max-lora-rank",
        str(max_lora_rank),
        "--max-loras",
        str(max_loras),
        "--max-cpu-loras",
        str(max_loras),
        "--enforce-eager",
        "--dtype",
        "float32",
        *extra,
    ]


# ---------------------------------------------------------------- what the end-to-end tests start


def start_server(
    population: Path, log: Path, *extra: str, api_key: str | None = API_KEY, timeout: float = 300
) -> Server:
    """`ensemble-serve up` for `population` (with `--api-key`), waited for; stopped again if it does not come up."""
    port = free_port()
    args = ensemble_command(port, "--population", str(population), *extra)
    if api_key:
        args += ["--api-key", api_key]
    server = launch(Server, "ensemble-serve", args, port, log, api_key=api_key, population=population)
    try:
        wait_healthy([server], timeout)
    except RuntimeError:
        server.stop()
        raise
    return server


def start_vllm(
    name: str,
    substrate: Path,
    population: Path,
    members: list[str],
    log: Path,
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> VLLMServer:
    """Start a CPU vLLM OpenAI server for `members` the way README's "Beyond one machine" shows (not waited for).

    `--no-enable-chunked-prefill` keeps seeded requests from killing the CPU engine. `env` adds
    environment variables (e.g. `VLLM_SERVER_DEV_MODE=1`, which serves `GET /server_info`).
    """
    port = port or free_port()
    modules = [f"{m}={population / 'members' / m}" for m in members]
    args = vllm_command(
        substrate,
        port,
        modules,
        "--api-key",
        VLLM_KEY,
        # Memory on the CPU backend is a fraction of NUMA node 0's: the worker alone holds about
        # 0.7 GiB before its KV cache, more than --gpu-memory-utilization 0.08 grants, so the KV
        # cache is sized explicitly (this also skips the warm-up that sizes it: a faster start).
        "--kv-cache-memory-bytes",
        str(64 * 2**20),
        # the CPU sampler dies on a seeded request whose prefill is split over engine steps
        "--no-enable-chunked-prefill",
        # every prompt computed whole: which prompts reuse a cached prefix depends on when they arrive,
        # and a reused prefix can round differently, so the chains would depend on timing
        "--no-enable-prefix-caching",
        max_loras=4,
    )
    return launch(VLLMServer, name, args, port, log, append=True, env=env, api_key=VLLM_KEY)
