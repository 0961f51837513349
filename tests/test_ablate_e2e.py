"""`ensemble-train ablate` end to end: the real CLI, vLLM self-play, PEFT training, router, mixture scoring.

A small 2 x 2 design (router x lifecycle, random-vs-pre-aligned start fixed to random so the
PEFT re-initialisation path runs too) with 2 seeds: interrupted with Ctrl-C (SIGINT) after its
first finished cell, it exits 130 and keeps that cell; the same command then finishes the rest
without recomputing it, and a third run recomputes nothing. Every cell is also scored on a
perturbed base (the base-perturbation probe). Slow: the engine starts twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ensemble_serve.shared.population import load_population

pytestmark = pytest.mark.evolve

ROOT = Path(__file__).resolve().parent.parent

CONFIG = {
    "factors": ["router", "lifecycle"],
    "fixed": {"init": "random"},
    "seeds": [0, 1],
    "generations": 1,
    "interactions": [["router", "lifecycle"]],
    "base_perturbation": 0.1,
    "evolve": {
        "problems_per_generation": 6,
        "max_tokens": 48,
        "train_steps": 2,
        "train_batch_size": 4,
        "cross_eval_chains": 2,
        "probe_chains": 2,
        "max_num_seqs": 64,
        "gpu_memory_utilization": 0.1,
        "evolution": {"elite": 1, "offspring": 1},
        "lifecycle": {"death_fitness": 10.0, "max_deaths": 1, "inherit_alpha": 0.5, "reallocation": "fresh"},
    },
    "router": {"steps": 20},
    "router_per_domain": 3,
    "heldout_per_domain": 2,
    "gpu_memory_utilization": 0.1,
}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(config: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", "ablate", "--quiet", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # a shell without job control starts background jobs with SIGINT ignored, and Python keeps an
        # ignored SIGINT: so that the Ctrl-C below reaches the CLI however pytest was started, reset it
        preexec_fn=_default_sigint,
    )


def _run(config: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", "ablate", "--quiet", "--config", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _results(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted((out / "cells").glob("*/seed-*.json"))}


def test_ablate_cli_interrupted_then_resumed_recomputes_nothing(tmp_path):
    out = tmp_path / "ablation"
    config = tmp_path / "ablate.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "out": str(out)}))

    proc = _cli(config)
    deadline = time.monotonic() + 420
    while not _results(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    first = _results(out)
    assert first, "no cell finished in time"
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, log[-3000:]
    assert "run the same command to continue" in log

    done = _run(config, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    after = _results(out)
    assert len(after) == 8  # 4 cells x 2 seeds
    for name, mtime in first.items():
        assert after[name] == mtime, f"{name} was recomputed"

    summary = json.loads((out / "ablation.json").read_text())
    assert summary["complete"] and not summary["missing"]
    for factor in ("router", "lifecycle"):
        e = summary["effects"][factor]
        assert e["n"] == 2 and e["mean"] is not None and e["p"] is not None
    assert summary["interactions"][0]["factor"] == "router"
    assert {row["cell"] for row in summary["cells"]} == {
        "router-softmax__lifecycle-off",
        "router-sigmoid_floor__lifecycle-off",
        "router-softmax__lifecycle-on",
        "router-sigmoid_floor__lifecycle-on",
    }
    for name in ("ablation.md", "effects.png", "domains.png"):
        assert (out / name).stat().st_size > 0
    assert "## Effects" in (out / "ablation.md").read_text()

    cell = json.loads((out / "cells" / "router-sigmoid_floor__lifecycle-on" / "seed-0.json").read_text())
    assert cell["levels"]["init"] == "random" and cell["router"]["variant"] == "sigmoid_floor"
    ref = cell["reference"]
    # the start was PEFT's initialisation (B = 0) trained for 2 steps: it stays close to the bare base
    assert abs(ref["uniform"]["balanced_log_ppl"] - ref["base"]["balanced_log_ppl"]) < 0.05
    assert set(cell["per_domain"]) == set(ref["base"]["per_domain"])
    # the probe: the same router and adapters on a perturbed base, a worse bare base, every effect again
    probe = cell["perturbed"]
    assert set(probe["per_domain"]) == set(cell["per_domain"])
    assert probe["reference"]["base"]["balanced_log_ppl"] > ref["base"]["balanced_log_ppl"]
    assert summary["perturbed"]["sigma"] == 0.1
    assert all(summary["perturbed"]["effects"][f]["n"] == 2 for f in ("router", "lifecycle"))
    assert "Effects on a perturbed base" in (out / "ablation.md").read_text()
    # the lifecycle ran in the "on" stage (death_fitness above any fitness: a member died and was re-seeded)
    stage = out / "stages" / "init-random__evolution-on__scope-global__lifecycle-on" / "seed-0"
    assert json.loads((stage / "done.json").read_text())["last"]["lifecycle"]["deaths"]
    load_population(stage / "population")  # a valid population directory
    start = load_population(out / "starts" / "random-seed-0")
    assert start.manifest.generation == 0 and all(m.fitness is None for m in start.manifest.members)

    again = _run(config, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _results(out) == after  # nothing recomputed
