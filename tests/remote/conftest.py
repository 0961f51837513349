"""One remote cluster for the package: two real CPU vLLM OpenAI servers, each serving half of the embedded
ensemble's members, and `ensemble-serve up --remote` in front, as README's "Beyond one machine" starts them.

Started once (30-60 s per vLLM server on 2 cores, both at once, then the ensemble server) and shared by
`test_remote_e2e.py` (discovery, routing, fan-out, scoring, disconnects, a refresh that it undoes),
then `test_remote_health_e2e.py` (a seeded burst, then a server killed and restarted, and killed again),
then `test_remote_self_play_e2e.py` (the trainer's commands sampling on both servers: it restarts B,
and kills it once more). A serves GET /server_info (dev mode), so ensemble-serve checks its settings; B
does not, so ensemble-serve warns once that it cannot. Both load adapters at run time
(VLLM_ALLOW_RUNTIME_LORA_UPDATING=1), as the trainer's `--remote` needs.
"""

from __future__ import annotations

from typing import Any

import pytest

from ensemble_serve.testing.servers import VLLM_KEY, copy_embedded, start_server, start_vllm, wait_healthy

from .cluster import RUNTIME_LORA, SERVED_BY, START_TIMEOUT, Cluster


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("remote")
    population = copy_embedded(root)
    started: list[Any] = []
    try:
        a = start_vllm(
            "a",
            root / "substrate",
            population,
            SERVED_BY["a"],
            root / "vllm-a.log",
            env={"VLLM_SERVER_DEV_MODE": "1", **RUNTIME_LORA},
        )
        started.append(a)
        b = start_vllm("b", root / "substrate", population, SERVED_BY["b"], root / "vllm-b.log", env=RUNTIME_LORA)
        started.append(b)
        wait_healthy([a, b])
        ensemble = start_server(
            population,
            root / "ensemble.log",
            "--remote",
            f"{a.url},{b.url}/v1",  # both forms of a server's address
            "--remote-api-key",
            VLLM_KEY,
            "--served-model-name",
            "sandbox-ensemble",
            "--no-watch",
            timeout=START_TIMEOUT,
        )
        started.append(ensemble)
        yield Cluster(root, population, a, b, ensemble, started)
    finally:
        for proc in reversed(started):
            proc.kill()
