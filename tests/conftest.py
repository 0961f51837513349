"""Shared fixtures: tiny real checkpoints built by the project's own code.

Nothing here is a fake: the substrate is a real (small, briefly trained) Llama saved
by `ensemble-train substrate`'s code, and the population is real PEFT adapters.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ensemble_serve.shared.embedded import EMBEDDED_POPULATION

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_substrate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide substrate (head size 32, the smallest vLLM's CPU attention takes), trained for a few steps."""
    from trainer.models.config import SubstrateConfig
    from trainer.models.substrate import train_substrate

    out = tmp_path_factory.mktemp("substrate") / "tiny-substrate"
    cfg = SubstrateConfig(
        out=out,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=2,
        steps=30,
        batch_size=16,
        warmup_steps=5,
        lr=0.01,
        eval_per_domain=2,
        max_position_embeddings=128,
    )
    train_substrate(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_population(tiny_substrate: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real PEFT LoRA members on the tiny substrate, each warmed up for a few steps."""
    from trainer.models.config import InitConfig
    from trainer.models.init_population import init_population

    out = tmp_path_factory.mktemp("population") / "pop"
    cfg = InitConfig(base=tiny_substrate, out=out, members=3, warmup_steps=4, batch_size=8, ranks=(4, 8))
    init_population(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def realshape():
    """The real-shaped Qwen2 test model and its three PEFT adapters (tests/realshape.py).

    Built once into <repo>/.cache/ (a few minutes on 2 cores; `make realshape` does it ahead), then reused.
    """
    from realshape import build_realshape

    return build_realshape()


@pytest.fixture(scope="session")
def embedded_population() -> Path:
    """The shipped default: the trained substrate and its starting population."""
    path = EMBEDDED_POPULATION
    if not (path / "population.json").is_file():
        pytest.fail(f"the embedded population is missing at {path}; run `make embedded`")
    return path
