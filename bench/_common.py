"""Shared helpers for the benchmarks in this folder: the servers they start, interleaved rounds, statistics,
tables, JSON.

Servers are launched and measured with the harness the tests use (`ensemble_serve.testing.servers`);
each script runs as `python bench/NAME.py`, which puts this folder first on the path: :class:`ServerSet` starts them with the benchmarks' settings and stops
every one of them on exit, even on error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ensemble_serve.shared.embedded import EMBEDDED_NAME, EMBEDDED_POPULATION, EMBEDDED_SUBSTRATE
from ensemble_serve.shared.voting import candidate_from_text, vote
from ensemble_serve.testing.servers import (
    ROOT,
    Server,
    ServerProcess,
    VLLMServer,
    ensemble_command,
    free_port,
    launch,
    vllm_command,
    wait_healthy,
)

BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
# Server logs hold machine paths, so they stay outside the repository (the temp folder); a server that
# fails to start has the tail of its log in the error.
LOGS = Path(tempfile.gettempdir()) / "ensemble-serve-bench-logs"
ENSEMBLE_NAME = EMBEDDED_NAME

S = TypeVar("S", bound=ServerProcess)


def rel(path: Path) -> str:
    """A path relative to the repository root (never an absolute machine path in results)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return Path(path).name


def member_names(population: Path = EMBEDDED_POPULATION) -> list[str]:
    manifest = json.loads((population / "population.json").read_text())
    return [m["name"] for m in manifest["members"]]


class ServerSet:
    """A context manager that owns server subprocesses and stops all of them on exit."""

    def __init__(self) -> None:
        self.servers: list[ServerProcess] = []

    def __enter__(self) -> ServerSet:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        while self.servers:
            self.servers.pop().stop()

    def stop(self, server: ServerProcess) -> None:
        server.stop()
        if server in self.servers:
            self.servers.remove(server)

    def _start(self, kind: type[S], name: str, args: list[str], port: int, timeout: float) -> S:
        LOGS.mkdir(parents=True, exist_ok=True)
        server = launch(kind, name, args, port, LOGS / f"{name}.log")
        self.servers.append(server)
        wait_healthy([server], timeout)
        return server

    def start_ensemble(
        self, *extra: str, name: str = "ensemble-serve", gpu_memory_utilization: float = 0.1, timeout: float = 300
    ) -> Server:
        """`ensemble-serve up` (population watching off) on the embedded sandbox (model `sandbox-ensemble`) unless
        `extra` names a population, a model or an embedded ensemble."""
        port = free_port()
        chosen = any(flag in extra for flag in ("--population", "--model", "--embedded"))
        args = ensemble_command(
            port,
            *(() if chosen else ("--embedded", "sandbox")),
            "--no-watch",
            "--gpu-memory-utilization",
            str(gpu_memory_utilization),
            "--log-level",
            "warning",
            *extra,
        )
        return self._start(Server, name, args, port, timeout)

    def start_vllm(
        self,
        *extra: str,
        name: str = "vllm-openai",
        gpu_memory_utilization: float = 0.1,
        timeout: float = 300,
        lora_modules: Sequence[str] | None = None,
        max_lora_rank: int = 16,
    ) -> VLLMServer:
        """vLLM's own OpenAI server with the embedded base model and `lora_modules` (`NAME=PATH`; default: every
        member of the embedded population) as LoRA modules."""
        port = free_port()
        mods = list(lora_modules or [f"{m}={rel(EMBEDDED_POPULATION / 'members' / m)}" for m in member_names()])
        args = vllm_command(
            rel(EMBEDDED_SUBSTRATE),
            port,
            mods,
            "--served-model-name",
            "sandbox-substrate",
            "--gpu-memory-utilization",
            str(gpu_memory_utilization),
            "--max-num-seqs",
            "64",
            "--seed",
            "0",
            "--disable-uvicorn-access-log",
            "--uvicorn-log-level",
            "warning",
            *extra,
            max_loras=len(mods),
            max_lora_rank=max_lora_rank,
        )
        return self._start(VLLMServer, name, args, port, timeout)


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

    def __init__(self, servers: Sequence[ServerProcess]):
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


def others_running(servers: Sequence[ServerProcess] = ()) -> int:
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
# interleaved rounds
# ---------------------------------------------------------------------------


def interleaved(variants: Sequence[str], rounds: int, rng: random.Random) -> Iterator[tuple[int, str]]:
    """(round, variant): every variant once per round, in an order shuffled anew each round with `rng`.

    Interleaving spreads slow drifts of the machine (other load, thermal state) over all
    variants, so a ratio of two variants in the same round is paired.
    """
    for rnd in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        for v in order:
            yield rnd, v


def timed_rows(rows: dict[str, list[dict]], variants: Sequence[str]) -> dict[str, list[dict]]:
    """Each variant's records without those of the warm-up rounds (`"warmup": True`)."""
    return {v: [r for r in rows[v] if not r["warmup"]] for v in variants}


def paired_ratios(records: Sequence[dict], baseline: Sequence[dict]) -> list[float]:
    """Each record's wall time over the baseline's of the same round (both in round order)."""
    return [r["wall_s"] / b["wall_s"] for r, b in zip(records, baseline)]


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


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """`write_json`, then say on stderr where the results went (a path relative to the repository)."""
    path = write_json(name, payload)
    print(f"wrote {path.relative_to(path.parents[2])}", file=sys.stderr)
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


# ---------------------------------------------------------------------------
# the requests the accuracy benchmarks send
# ---------------------------------------------------------------------------


async def ask_greedy(client: Any, model: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    """One greedy chat completion: (text, completion tokens)."""
    r = await client.chat.completions.create(model=model, messages=chat(prompt), max_tokens=max_tokens, temperature=0.0)
    return r.choices[0].message.content or "", r.usage.completion_tokens


async def ask_self_consistency(
    client: Any, model: str, prompt: str, *, n: int, temperature: float, max_tokens: int, seed: int | None = None
) -> dict[str, Any]:
    """`n` samples in one request, majority over their extracted answers (`ensemble_serve.shared.voting`).

    Sent with `stream: true`: the non-streaming member path returned fewer than n choices for n > 1
    (see BENCHMARKS.md). Returns the winning chain's `text` (the first chain when nothing was
    extracted), the `answer`, the number of `samples` and the completion `tokens` of all of them.
    """
    texts: dict[int, str] = defaultdict(str)
    tokens = None
    kw = {} if seed is None else {"seed": seed}
    stream = await client.chat.completions.create(
        model=model,
        messages=chat(prompt),
        max_tokens=max_tokens,
        temperature=temperature,
        n=n,
        stream=True,
        stream_options={"include_usage": True},
        **kw,
    )
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    cands = [candidate_from_text(model, i, texts[i], 0, "auto") for i in sorted(texts)]
    result = vote(cands, "majority")
    text = cands[result.winner].text if result.winner is not None else (cands[0].text if cands else "")
    return {"text": text, "tokens": tokens, "samples": len(texts), "answer": result.answer}


def seed_interval(xs: list[float]) -> dict:
    """Mean and 95% t-interval over seeds (paired differences go in as one value per seed)."""
    from scipy import stats

    m = statistics.fmean(xs)
    if len(xs) < 2:
        return {"mean": round(m, 4), "low": None, "high": None, "per_seed": [round(x, 4) for x in xs]}
    lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=m, scale=stats.sem(xs)) if statistics.pstdev(xs) > 0 else (m, m)
    return {"mean": round(m, 4), "low": round(lo, 4), "high": round(hi, 4), "per_seed": [round(x, 4) for x in xs]}


def fmt_interval(ci: dict) -> str:
    if ci["low"] is None:
        return f"{ci['mean']:+.3f}"
    return f"{ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]"
