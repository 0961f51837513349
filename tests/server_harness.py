"""Start the real `ensemble-serve up` (real vLLM engine) in a subprocess for end-to-end tests."""

from __future__ import annotations

import os
import shutil
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
