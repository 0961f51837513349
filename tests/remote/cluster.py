"""The remote cluster the package's tests share (started by `conftest.py`'s package-scoped fixture)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ensemble_serve.testing.servers import (
    Server,
    VLLMServer,
    start_vllm,
)

MEMBERS = [f"m0{i}" for i in range(8)]
SERVED_BY = {"a": MEMBERS[:4], "b": MEMBERS[4:]}
START_TIMEOUT = 300.0
RUNTIME_LORA = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}  # POST /v1/load_lora_adapter, for the trainer's --remote


@dataclass
class Cluster:
    root: Path
    population: Path
    a: VLLMServer
    b: VLLMServer
    ensemble: Server
    started: list[Any] = field(default_factory=list)

    def restart_b(self) -> VLLMServer:
        """B again on the same port (after a kill)."""
        b = start_vllm(
            "b",
            self.root / "substrate",
            self.population,
            SERVED_BY["b"],
            self.b.log,
            port=self.b.port,
            env=RUNTIME_LORA,
        )
        self.started.append(b)
        self.b = b
        return b
