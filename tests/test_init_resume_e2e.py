"""`ensemble-train init` SIGKILLed during the shared seed's training and again during branching, then run again:
the population is the one an uninterrupted run writes, file for file.

Slow: three `ensemble-train init` processes on the tiny substrate.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_init import _population_bytes

from ensemble_serve.testing.servers import ROOT
from trainer.models.config import InitConfig
from trainer.models.init_population import init_population, staging_dir

pytestmark = pytest.mark.evolve


def _init(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", "init", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for(proc: subprocess.Popen, done, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        if proc.poll() is not None:
            raise AssertionError(f"init exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.timeout(900)
def test_init_killed_in_the_seed_phase_and_in_branching_resumes_to_the_same_population(
    tiny_substrate: Path, tmp_path: Path
):
    kw = {
        "base": tiny_substrate,
        "members": 2,
        "warmup_steps": 120,
        "batch_size": 8,
        "ranks": [4],
        "seed_share": 0.5,
    }
    ref = init_population(InitConfig(**kw, out=tmp_path / "ref"), progress=False)
    cfg = InitConfig(**kw, out=tmp_path / "run")
    config = tmp_path / "init.yaml"
    config.write_text(yaml.safe_dump({**kw, "base": str(tiny_substrate), "out": str(cfg.out)}))
    work, log = staging_dir(cfg), tmp_path / "init.log"

    # 1. killed while the shared seed trains (its progress bar is moving, nothing is finished yet)
    proc = _init(config, log)
    _wait_for(proc, lambda: "warm-up:" in log.read_text(errors="replace") and " 1/" in log.read_text(), log)
    assert not (work / "seed.json").exists()
    _kill(proc)
    assert not cfg.out.exists()

    # 2. killed while the first branch trains (the seed is finished and kept)
    proc = _init(config, log)
    _wait_for(proc, lambda: (work / "seed.json").is_file(), log)
    assert not (work / "m01.json").exists()
    _kill(proc)
    assert not cfg.out.exists() and (work / "seed.json").is_file()

    # 3. run to the end: the seed is not trained again
    proc = _init(config, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert "resuming: 1 trained member(s) kept from an interrupted run (seed)" in log.read_text()
    assert not work.exists()
    assert _population_bytes(cfg.out) == _population_bytes(ref.root)
