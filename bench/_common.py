"""Shared helpers for the benchmarks in this folder: servers in subprocesses, statistics, tables, JSON.

Every server is started in its own process group and stopped (SIGTERM, then SIGKILL of that group)
by :class:`ServerSet` on exit, even on error or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
# Server logs hold machine paths, so they stay outside the repository (the temp folder); a server that
# fails to start has the tail of its log in the error.
LOGS = Path(tempfile.gettempdir()) / "ensemble-serve-bench-logs"
EMBEDDED = ROOT / "ensemble_serve" / "embedded"
EMBEDDED_POPULATION = EMBEDDED / "population"
EMBEDDED_SUBSTRATE = EMBEDDED / "substrate"
ENSEMBLE_NAME = "sandbox-ensemble"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel(path: Path) -> str:
    """A path relative to the repository root (never an absolute machine path in results)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return Path(path).name


def member_names(population: Path = EMBEDDED_POPULATION) -> list[str]:
    manifest = json.loads((population / "population.json").read_text())
    return [m["name"] for m in manifest["members"]]


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    log: Path
    args: list[str]
    started_s: float = 0.0

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def alive(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

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

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pass
        # whatever of its group is left (vLLM's engine core and worker processes)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


class ServerSet:
    """A context manager that owns server subprocesses and stops all of them on exit."""

    def __init__(self) -> None:
        self.servers: list[Server] = []

    def __enter__(self) -> ServerSet:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        while self.servers:
            self.servers.pop().stop()

    def stop(self, server: Server) -> None:
        server.stop()
        if server in self.servers:
            self.servers.remove(server)

    def _start(self, name: str, args: list[str], port: int, timeout: float) -> Server:
        LOGS.mkdir(parents=True, exist_ok=True)
        log = LOGS / f"{name}.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_NO_USAGE_STATS="1")
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
        server = Server(name, f"http://127.0.0.1:{port}", proc, log, args)
        self.servers.append(server)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if server.alive():
                server.started_s = time.perf_counter() - t0
                return server
            time.sleep(0.5)
        raise RuntimeError(f"{name} did not start in {timeout}s:\n{log.read_text()[-4000:]}")

    def start_ensemble(
        self, *extra: str, name: str = "ensemble-serve", gpu_memory_utilization: float = 0.1, timeout: float = 300
    ) -> Server:
        """`ensemble-serve up` on the embedded default (model `sandbox-ensemble`), population watching off."""
        port = free_port()
        args = [
            sys.executable,
            "-m",
            "ensemble_serve.cli",
            "up",
            "--port",
            str(port),
            "--no-watch",
            "--gpu-memory-utilization",
            str(gpu_memory_utilization),
            "--log-level",
            "warning",
            *extra,
        ]
        return self._start(name, args, port, timeout)

    def start_vllm(
        self, *extra: str, name: str = "vllm-openai", gpu_memory_utilization: float = 0.1, timeout: float = 300
    ) -> Server:
        """vLLM's own OpenAI server with the embedded base model and every member as a LoRA module."""
        port = free_port()
        mods = [f"{m}={rel(EMBEDDED_POPULATION / 'members' / m)}" for m in member_names()]
        args = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            rel(EMBEDDED_SUBSTRATE),
            "--served-model-name",
            "sandbox-substrate",
            "--enable-lora",
            "--lora-modules",
            *mods,
            "--max-lora-rank",
            "16",
            "--max-loras",
            str(len(mods)),
            "--max-cpu-loras",
            str(len(mods)),
            "--gpu-memory-utilization",
            str(gpu_memory_utilization),
            "--enforce-eager",
            "--dtype",
            "float32",
            "--max-num-seqs",
            "64",
            "--seed",
            "0",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--disable-uvicorn-access-log",
            "--uvicorn-log-level",
            "warning",
            *extra,
        ]
        return self._start(name, args, port, timeout)


def system_busy_s() -> float:
    """CPU seconds all processes on this machine have been busy since boot (user+nice+system+irq+softirq+steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this (client) process."""
    t = os.times()
    return t.user + t.system


class ForeignLoad:
    """CPU time used on this machine by processes other than this client and the given servers.

    Other work on the machine (another test suite, a build) competes for the same cores and inflates
    wall times; benchmarks record it per request so contaminated rounds can be seen.
    """

    def __init__(self, servers: Sequence[Server]):
        self.servers = list(servers)
        self.mark()

    def _now(self) -> tuple[float, float]:
        ours = own_cpu_s() + sum(s.cpu_seconds() for s in self.servers)
        return system_busy_s(), ours

    def mark(self) -> None:
        self._t0 = time.perf_counter()
        self._busy0, self._ours0 = self._now()

    def foreign_s(self) -> float:
        busy, ours = self._now()
        return max(0.0, (busy - self._busy0) - (ours - self._ours0))


def others_running(servers: Sequence[Server] = ()) -> int:
    """How many vLLM / ensemble-serve / pytest / ensemble-train processes run on this machine besides ours."""
    mine = {s.proc.pid for s in servers}
    count = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\\0", b" ").decode(errors="replace")
            pgid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[2])
        except (OSError, ValueError, IndexError):
            continue
        if pgid not in mine and any(
            k in cmd for k in ("vllm.entrypoints", "ensemble_serve.cli", "pytest", "ensemble-train")
        ):
            count += 1
    return count


def wait_quiet(max_wait_s: float, poll_s: float = 5.0) -> float:
    """Wait (at most `max_wait_s`) until no other vLLM / ensemble-serve / pytest process runs; the seconds waited."""
    t0 = time.monotonic()
    while max_wait_s > 0 and others_running() and time.monotonic() - t0 < max_wait_s:
        time.sleep(poll_s)
    waited = time.monotonic() - t0
    if others_running():
        print(
            f"warning: {others_running()} other serving/test processes are running; timings may suffer", file=sys.stderr
        )
    return waited


def add_common_args(parser: Any) -> None:
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long until no other vLLM/ensemble-serve/pytest process runs",
    )


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------------
# statistics and output
# ---------------------------------------------------------------------------


def spread(xs: Sequence[float]) -> dict[str, float]:
    """Median, min, max, quartiles of a sample."""
    xs = sorted(xs)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3, "n": len(xs)}


def fmt_spread(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import torch
    import vllm

    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    return {
        "cpus": os.cpu_count(),
        "arch": platform.machine(),
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


def _python() -> str:
    """The interpreter as typed from the repository root (".venv/bin/python"), never an absolute path."""
    try:
        return str(Path(sys.executable).absolute().relative_to(ROOT))
    except ValueError:
        return "python"


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "command": " ".join([_python(), rel(Path(sys.argv[0]))] + sys.argv[1:]),
        "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


# vLLM's CPU build kills its engine when a request with a `seed` has its prefill split over engine steps
# (chunked prefill): the worker rewinds the request's torch.Generator with `set_offset`, which CPU generators
# do not support ("RuntimeError: CPU Generator does not use offset", then EngineDeadError). The server's
# engine runs with max_num_batched_tokens=2048 (see its log), so a seeded request is only sent when every
# prefill that can share its step fits in that budget (see `seed_is_safe`).
MAX_BATCHED_TOKENS = 2048


class PromptLength:
    """Token count of a chat prompt as the server builds it (the embedded substrate's chat template)."""

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(EMBEDDED_SUBSTRATE)

    def __call__(self, prompt: str) -> int:
        text = self.tok.apply_chat_template(chat(prompt), tokenize=False, add_generation_prompt=True)
        return len(self.tok.encode(text, add_special_tokens=False))


def seed_is_safe(prompt_tokens: int, sequences_in_flight: int, budget: int = MAX_BATCHED_TOKENS) -> bool:
    """Whether `sequences_in_flight` seeded sequences of this prompt length can never need a chunked prefill."""
    return sequences_in_flight * (prompt_tokens + 1) <= budget


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]
