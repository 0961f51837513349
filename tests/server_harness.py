"""Start the real `ensemble-serve up` (real vLLM engine), and vLLM's own OpenAI servers, in subprocesses for
end-to-end tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "ensemble_serve" / "embedded"
API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_embedded(dest: Path) -> Path:
    """A private copy of the embedded substrate + population (tests may change the population)."""
    shutil.copytree(EMBEDDED / "substrate", dest / "substrate")
    shutil.copytree(EMBEDDED / "population", dest / "population")
    return dest / "population"


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    population: Path
    log: Path
    api_key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def async_client(self, **kw):
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def alive(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(
    population: Path, log: Path, *extra: str, api_key: str | None = API_KEY, timeout: float = 300
) -> Server:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "ensemble_serve.cli",
        "up",
        "--population",
        str(population),
        "--port",
        str(port),
        *extra,
    ]
    if api_key:
        args += ["--api-key", api_key]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = Server(f"http://127.0.0.1:{port}", proc, population, log, api_key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if server.alive():
            return server
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"server did not start in {timeout}s:\n{log.read_text()[-4000:]}")


# ---------------------------------------------------------------- remote vLLM OpenAI servers (remote mode)

VLLM_KEY = "remote-key-456"  # the vLLM servers' --api-key: ensemble-serve must send it (--remote-api-key)
VLLM_START_TIMEOUT = 420.0  # two vLLM servers start at once on 2 shared cores: about 60 s idle, 4 min under load


@dataclass
class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` in its own process group."""

    name: str
    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {VLLM_KEY}"}

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=VLLM_KEY, max_retries=0)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus metric's samples (optionally only those with these labels)."""
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[-1])
        return total

    def failure(self, what: str) -> str:
        """`what`, the log's error lines (the root cause sits above the final traceback) and its tail."""
        text = self.log.read_text(errors="replace")
        errors = [line for line in text.splitlines() if "Error" in line and "ulimit" not in line][:20]
        return f"vLLM server {self.name} {what}:\n" + "\n".join(errors) + "\n...\n" + text[-3000:]

    def kill(self) -> None:
        """SIGKILL the whole process group (API server, engine core, workers) at once: a crash."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the API server stops its engine-core and worker processes itself
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:  # whatever of its process group is left
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
    args = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(substrate),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        VLLM_KEY,
        "--enable-lora",
        "--lora-modules",
        *[f"{m}={population / 'members' / m}" for m in members],
        "--max-lora-rank",
        "16",
        "--max-loras",
        "4",
        "--max-cpu-loras",
        "4",
        # Memory on the CPU backend is a fraction of NUMA node 0's: the worker alone holds about
        # 0.7 GiB before its KV cache, more than --gpu-memory-utilization 0.08 grants, so the KV
        # cache is sized explicitly (this also skips the warm-up that sizes it: a faster start).
        "--kv-cache-memory-bytes",
        str(64 * 2**20),
        "--enforce-eager",
        "--dtype",
        "float32",
        # the CPU sampler dies on a seeded request whose prefill is split over engine steps
        "--no-enable-chunked-prefill",
    ]
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    proc = subprocess.Popen(
        args, stdout=log.open("a"), stderr=subprocess.STDOUT, env=full_env, cwd=ROOT, start_new_session=True
    )
    return VLLMServer(name, f"http://127.0.0.1:{port}", proc, log)


def wait_healthy(servers: list[VLLMServer], timeout: float = VLLM_START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(servers)
    while waiting and time.monotonic() < deadline:
        for s in list(waiting):
            if s.proc.poll() is not None:
                raise RuntimeError(s.failure(f"exited with {s.proc.returncode}"))
            if s.healthy():
                waiting.remove(s)
        time.sleep(1)
    if waiting:
        s = waiting[0]
        raise RuntimeError(s.failure(f"did not start in {timeout}s"))


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples on `url`/metrics (optionally only those with these labels)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[-1])
    return total
