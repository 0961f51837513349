"""`ensemble-train evolve` end to end: the real CLI, the real vLLM engine, real PEFT training, real files.

* a run on a user's JSONL dataset with the Ray executor, and the same run with the local executor
  that is SIGKILLed mid-run, resumed, stopped with Ctrl-C (SIGINT), and resumed again: both end
  with byte-identical populations;
* a run on the sandbox with the answers hidden (consensus fitness), in process;
* `ensemble-train report` on the result.

Slow: every evolve process starts a vLLM engine (about 30-40 s on 2 cores).
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

from ensemble_serve.shared.population import load_population, read_history

pytestmark = pytest.mark.evolve

ROOT = Path(__file__).resolve().parent.parent

SMALL = {
    "problems_per_generation": 6,
    "samples_per_member": 2,
    "max_tokens": 48,
    "train_steps": 2,
    "train_batch_size": 4,
    "cross_eval_chains": 2,
    "probe_chains": 2,
    "heldout_per_domain": 1,
    "fitness": {
        "correctness": 1.0,
        "cross_eval": 0.1,
        "diversity_embedding": 0.05,
        "diversity_hidden": 0.05,
        "diversity_output": 0.05,
        "contribution": 0.2,
    },
    "evolution": {"elite": 1, "offspring": 1, "crossover": "svd_interpolate", "rank_policy": "pad", "mutation": "svd"},
    "max_num_seqs": 64,
    "gpu_memory_utilization": 0.1,
}


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", "evolve", "--quiet", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the engine core dies with it
        **kw,
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _wait_for_generation(proc: subprocess.Popen, root: Path, generation: int, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"evolve exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if (root / "history.jsonl").exists() and any(r.get("generation") == generation for r in read_history(root)):
            return
        time.sleep(0.2)
    raise AssertionError(f"generation {generation} did not appear within {timeout}s")


def _snapshot(root: Path) -> dict[str, object]:
    """Everything that defines a population: the manifest's members and every member file's bytes."""
    pop = load_population(root)
    members = [m.model_dump(exclude={"info"}) for m in pop.manifest.members]
    files = {
        f"{m.name}/{f.name}": f.read_bytes()
        for m in pop.manifest.members
        for f in sorted(pop.member_dir(m.name).iterdir())
    }
    return {"generation": pop.manifest.generation, "members": members, "files": files}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from trainer.tasks.sandbox import generate_problems, save_jsonl

    folder = tmp_path_factory.mktemp("data")
    train, heldout = folder / "train.jsonl", folder / "heldout.jsonl"
    problems = generate_problems(24, seed=5, split="train", domains=["add", "sub", "sort"], difficulties=[1, 2])
    save_jsonl([p.__class__(p.prompt, p.answer, None, p.domain, 0) for p in problems], train)  # prompt + answer only
    save_jsonl(generate_problems(6, seed=6, split="heldout", domains=["add", "sub", "sort"], difficulties=[1]), heldout)
    return train, heldout


@pytest.mark.timeout(1800)  # three evolve processes, each starting vLLM, and a run on the session's engine
def test_kill_resume_and_ray_give_the_same_population(tiny_population: Path, tiny_engine, dataset, tmp_path: Path):
    from trainer.evolve.config import EvolveConfig
    from trainer.evolve.loop import run_evolve

    train, heldout = dataset
    settings = {**SMALL, "data": str(train), "eval_data": str(heldout), "seed": 3}
    cfg = tmp_path / "evolve.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    common = ["--config", str(cfg), "--population", str(tiny_population), "--generations", "3"]

    # reference: uninterrupted, gradient phases and scoring on a local Ray with 2 workers, sampling on the
    # session's engine (other tests used it before: its state must not show in the result either)
    ref = tmp_path / "ref"
    ref_cfg = EvolveConfig(
        **settings, population=tiny_population, out=ref, generations=3, executor="ray", ray_workers=2
    )
    run_evolve(ref_cfg, progress=False, engine=tiny_engine)
    assert [r["generation"] for r in read_history(ref)] == [0, 1, 2, 3]

    # the same run on the local executor, SIGKILLed once generation 1 is recorded (mid generation 2)
    run = tmp_path / "run"
    proc = _cli(*common, "--out", str(run))
    _wait_for_generation(proc, run, 1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert load_population(run).manifest.generation in (1, 2)  # a complete generation, never a partial one

    # resume; Ctrl-C once generation 2 is recorded: a clean stop, exit 130
    proc = _cli("--out", str(run), "--resume")
    _wait_for_generation(proc, run, 2)
    os.killpg(proc.pid, signal.SIGINT)
    code, out = _finish(proc)
    if code != 0:  # (the run may have finished generation 3 before the signal arrived)
        assert code == 130, f"exit {code}:\n{out[-3000:]}"
        assert "continue with --resume" in out
    assert load_population(run).manifest.generation >= 2

    # resume again to the end
    code, out = _finish(_cli("--out", str(run), "--resume"))
    assert code == 0, out[-3000:]
    assert [r["generation"] for r in read_history(run)] == [0, 1, 2, 3]
    assert not (run / "evolve-pending.json").exists()

    a, b = _snapshot(ref), _snapshot(run)
    assert a["generation"] == b["generation"] == 3
    assert a["members"] == b["members"]
    assert a["files"].keys() == b["files"].keys()
    different = [k for k in a["files"] if a["files"][k] != b["files"][k]]
    assert not different, f"files differ between the Ray run and the killed-and-resumed local run: {different}"

    # lineage: children carry their parents' names; every member's rank is a LoRA rank the config allows
    history = read_history(run)
    children = [m for r in history for m in r["members"] if m["status"] == "child"]
    assert len(children) == 3 and all(c["parents"] for c in children)
    names_before = {m["name"] for r in history[:-1] for m in r["members"]}
    assert all(set(c["parents"]) <= names_before for c in children)

    # resuming a finished run is a no-op
    code, out = _finish(_cli("--out", str(run), "--resume"))
    assert code == 0 and load_population(run).manifest.generation == 3

    # the report
    from click.testing import CliRunner

    from trainer.cli import main as train_main

    report = CliRunner().invoke(train_main, ["report", str(run)])  # in-process: no engine, no second interpreter
    assert report.exit_code == 0, report.output
    html = (run / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert (run / "report" / "lineage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sandbox_run_with_hidden_labels(tiny_population: Path, tiny_engine, tmp_path: Path):
    from trainer.evolve.config import EvolveConfig
    from trainer.evolve.loop import run_evolve

    settings = {**SMALL, "labels": "hidden", "fitness": {**SMALL["fitness"], "correctness": 0.0, "consensus": 1.0}}
    settings["evolution"] = {**SMALL["evolution"], "crossover": "weighted_average", "mutation": "gaussian"}
    # the lifecycle (one death by fitness, alpha-blend inheritance, SVD mutation, a fresh slot) and domain LOO scope
    settings["lifecycle"] = {
        "enabled": True,
        "death_fitness": 2.0,
        "max_deaths": 1,
        "inherit_alpha": 0.5,
        "svd_mutation": 0.05,
        "reallocation": "fresh",
    }
    settings["fitness_scope"] = "domain_loo"
    cfg = EvolveConfig(
        **settings,
        population=tiny_population,
        out=tmp_path / "hidden",
        generations=1,
        domains=("add", "sort"),
        tensorboard=tmp_path / "tb",
    )
    root, records = run_evolve(cfg, progress=False, engine=tiny_engine)
    assert [r["generation"] for r in records] == [0, 1]
    rec = records[-1]
    assert rec["labels"] == "hidden"
    assert "correctness" not in rec["terms"]  # never computed: the answers were not read
    assert set(rec["terms"]) >= {"consensus", "cross_eval", "diversity_embedding", "diversity_output", "contribution"}
    assert set(rec["diversity"]) == {"embedding", "hidden", "output"}
    assert all(0.0 <= v for v in rec["diversity"].values())
    assert rec["heldout"]["problems"] == 2 and 0.0 <= rec["heldout"]["ensemble_vote"] <= 1.0
    assert rec["fitness_scope"] == "domain_loo"
    life = rec["lifecycle"]
    assert len(life["deaths"]) == 1 and len(life["newborn"]) == 1
    newborn = next(m for m in rec["members"] if m["status"] == "reallocated")
    assert newborn["name"].startswith("g1r") and newborn["parents"] == []
    pop = load_population(root)
    assert pop.manifest.generation == 1 and len(pop.names) == 3
    assert all(m.domain_scores for m in pop.manifest.members)  # held-out accuracy per domain recorded
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    # the original population is untouched
    assert load_population(tiny_population).manifest.generation == 0
    assert json.loads((root / "evolve-run.json").read_text())["target_generation"] == 1
