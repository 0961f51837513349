"""Shared fixtures: tiny real checkpoints built by the project's own code.

Nothing here is a fake: the substrate is a real (small, briefly trained) Llama saved
by `ensemble-train substrate`'s code, and the population is real PEFT adapters.
"""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import subprocess
from collections.abc import Iterator
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
def tiny_engine(tiny_population: Path, tmp_path_factory: pytest.TempPathFactory):
    """One vLLM engine on the tiny substrate for the in-process evolve and curriculum runs (`engine=`).

    They evolve copies of `tiny_population`; the engine loads private snapshots of the adapters it is
    given, so a copy deleted after its test cannot pull files from under it.
    """
    from ensemble_serve.shared.engine_config import EngineConfig
    from ensemble_serve.shared.offline_engine import OfflineEngine
    from ensemble_serve.shared.population import load_population

    engine = OfflineEngine(
        load_population(tiny_population),
        EngineConfig(max_loras=4, max_cpu_loras=8, max_lora_rank=8, max_num_seqs=64),
        snapshot_root=tmp_path_factory.mktemp("tiny-engine-snapshots"),
    )
    yield engine
    del engine


@pytest.fixture(scope="session")
def realshape():
    """The real-shaped Qwen2 test model and its three PEFT adapters (trainer/testing/realshape.py).

    Installed into the user's cache from the copy in tests/assets/ when its key is current, else built
    there (about 90 s on 2 cores; `make realshape` does it ahead), then reused.
    """
    from trainer.testing.realshape import build_realshape

    return build_realshape(shipped=Path(__file__).parent / "assets")


@pytest.fixture(scope="session")
def embedded_population() -> Path:
    """The shipped default: the trained substrate and its starting population."""
    path = EMBEDDED_POPULATION
    if not (path / "population.json").is_file():
        pytest.fail(f"the embedded population is missing at {path}; run `make embedded`")
    return path


# ---------------------------------------------------------------- tiers

# A test in a tier (pyproject's markers) is slow: `make test-fast` (-m "not slow") leaves it out.
TIERS = ("engine", "evolve", "packaging", "realshape")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(t) for t in TIERS) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


# What libraries run to look at the machine (vLLM's import asks `file` about the interpreter through
# `platform.architecture()`; `ctypes.util.find_library` runs ldconfig or gcc): allowed in the fast tier.
SYSTEM_PROBES = frozenset({"file", "uname", "ldconfig", "gcc", "cc", "ld", "lscpu", "objdump", "nvidia-smi"})


class FastTierViolation(AssertionError):
    """A test outside every tier started a process: it belongs to a tier (and so out of `make test-fast`)."""


@contextlib.contextmanager
def _no_process(test: str) -> Iterator[None]:
    """Starting a subprocess or a multiprocessing process raises FastTierViolation, naming the test."""

    def refuse(what: str):
        raise FastTierViolation(f"{test} starts {what}; mark it with a tier ({', '.join(TIERS)}) or keep it in-process")

    def guarded_popen(self, args, *a, **kw):
        argv = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)
        program = os.path.basename(os.fsdecode(argv[0]).split()[0]) if argv else ""
        if program in SYSTEM_PROBES:  # libraries asking the system about itself, not a program of ours
            return popen_init(self, args, *a, **kw)
        refuse(f"a subprocess ({' '.join(map(os.fsdecode, argv))[:120]})")

    def guarded_start(self):
        refuse(f"a process ({type(self).__name__} {self.name})")

    popen_init = subprocess.Popen.__init__
    saved = popen_init, multiprocessing.process.BaseProcess.start
    subprocess.Popen.__init__ = guarded_popen
    multiprocessing.process.BaseProcess.start = guarded_start
    try:
        yield
    finally:
        subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start = saved


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    """The fast tier starts no engine (vLLM's engine core is a process), no Ray cluster and no CLI subprocess.

    A test without a tier that starts a process, in its fixtures (set up here) or its body, fails with the
    name of what it started, so the fast tier stays fast by construction rather than by review.
    """
    if item.get_closest_marker("slow"):
        return (yield)
    with _no_process(item.nodeid):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    if item.get_closest_marker("slow"):
        return (yield)
    with _no_process(item.nodeid):
        return (yield)
