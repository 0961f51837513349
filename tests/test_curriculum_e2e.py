"""Curriculum self-play end to end: the real CLI, the real vLLM engine, real PEFT training, real files.

* a hidden-labels curriculum run (frontier proposer, leave-self-out niche peer labels, niche sharing
  and selection, the length filter, the epoch cap) SIGKILLed mid-run and resumed ends byte-identical
  to an uninterrupted run, and the report draws the per-level and label-precision plots;
* bounds that leave no learnable cell: the generation is skipped with a clear message, recorded,
  and the members are the same files;
* every label below the threshold: no training step, and the generation is still recorded;
* a user's JSONL dataset with no levels and no answers runs the agreement proposer with the labels
  hidden (the answers are not there to read).

Slow: every run starts a vLLM engine on the tiny substrate.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from test_evolve_e2e import _cli, _finish, _snapshot, _wait_for_generation

from ensemble_serve.shared.population import load_population, read_history

pytestmark = pytest.mark.evolve

ROOT = Path(__file__).resolve().parent.parent

CURRICULUM = {
    "labels": "hidden",
    "difficulties": [1, 2, 3],
    "domains": ["add", "sub", "sort"],
    "problems_per_generation": 6,
    "samples_per_member": 2,
    "max_tokens": 48,
    "temperature": 0.8,
    "fitness": {"consensus": 1.0, "contribution": 0.2},
    "min_agreement": 0.5,
    "label_rule": "leave_self_out",
    "label_peers": "niche",
    "share_chains": "niche",
    "niche": True,
    "max_length_ratio": 2.0,
    "train_steps": 3,
    "train_batch_size": 4,
    "train_epochs": 2,
    "heldout_per_domain": 3,
    "evolution": {"elite": 1, "offspring": 1, "crossover": "weighted_average", "mutation": "gaussian"},
    "curriculum": {"enabled": True, "low": 0.0, "high": 1.0, "probe_problems": 2, "replay": 0.2},
    "max_num_seqs": 64,
    "gpu_memory_utilization": 0.1,
}


def _history_without_times(root: Path) -> list[dict]:
    out = []
    for r in read_history(root):
        r = {k: v for k, v in r.items() if k not in ("time", "seconds", "run_id")}
        out.append(r)
    return out


@pytest.mark.timeout(1800)  # two evolve processes, each starting vLLM, and a run on the session's engine
def test_curriculum_run_killed_and_resumed_ends_byte_identical(tiny_population: Path, tiny_engine, tmp_path: Path):
    cfg = tmp_path / "curriculum.yaml"
    cfg.write_text(yaml.safe_dump({**CURRICULUM, "seed": 4}))
    common = ["--config", str(cfg), "--population", str(tiny_population), "--generations", "3"]

    from trainer.evolve.config import EvolveConfig
    from trainer.evolve.loop import run_evolve

    # the reference, uninterrupted, in process on the session's engine
    ref = tmp_path / "ref"
    ref_cfg = EvolveConfig(**CURRICULUM, seed=4, population=tiny_population, out=ref, generations=3)
    run_evolve(ref_cfg, progress=False, engine=tiny_engine)

    run = tmp_path / "run"
    proc = _cli(*common, "--out", str(run))
    _wait_for_generation(proc, run, 1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert load_population(run).manifest.generation in (1, 2)
    code, out = _finish(_cli("--out", str(run), "--resume"))
    assert code == 0, out[-3000:]

    a, b = _snapshot(ref), _snapshot(run)
    assert a["generation"] == b["generation"] == 3
    assert a["members"] == b["members"]
    different = [k for k in a["files"] if a["files"][k] != b["files"].get(k)]
    assert a["files"].keys() == b["files"].keys() and not different, different
    # the curriculum's plans, signals and label audits are the same too
    assert _history_without_times(ref) == _history_without_times(run)

    history = read_history(run)
    practised = [rec for rec in history[1:] if "skipped" not in rec]
    assert practised, "every generation was skipped: the test says nothing about a practised one"
    for rec in history[1:]:
        cur = rec["curriculum"]
        if "skipped" in rec:  # the tiny model may leave no family learnable in a generation
            assert rec["skipped"].startswith("no learnable cell") and cur["cells"] == []
            continue
        assert cur["state"]["levels"].keys() == {"add", "sub", "sort"}
        assert set(cur["probe"]) and all(0.0 <= v["score"] <= 1.0 for v in cur["probe"].values())
        assert all("solve_rate" not in v for v in cur["probe"].values())  # hidden: scored by agreement only
        audit = rec["labels_audit"]  # recorded for the report, against answers the run never saw
        assert audit["pairs"] > 0 and 0.0 <= audit["coverage"] <= 1.0
        assert rec["heldout"]["levels"].keys() == {"1", "2", "3"}
        assert 0.0 <= rec["heldout"]["disagreement"] <= 1.0
        assert "niche_vote" in rec["heldout"]
        assert all(m["train_steps"] <= 3 for m in rec["members"])
    # niches survive: every focus domain of the start is still held by a member
    start = {m.info.get("focus_domain") for m in load_population(tiny_population).manifest.members}
    assert start <= {m.info.get("focus_domain") for m in load_population(run).manifest.members}

    from click.testing import CliRunner

    from trainer.cli import main as train_main

    report = CliRunner().invoke(train_main, ["report", str(run)])  # in-process: no engine, no second interpreter
    assert report.exit_code == 0, report.output
    for name in ("levels", "labels"):
        assert (run / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def engine(tiny_engine):
    """The session's engine on the tiny substrate (tests/conftest.py): the runs below evolve copies of it."""
    return tiny_engine


def _run(tiny_population: Path, out: Path, engine, **overrides):
    from trainer.evolve.config import EvolveConfig
    from trainer.evolve.loop import run_evolve

    settings = {**CURRICULUM, **overrides}
    cfg = EvolveConfig(**settings, population=tiny_population, out=out, generations=1)
    return run_evolve(cfg, progress=False, engine=engine)


def test_no_learnable_cell_skips_the_generation(tiny_population: Path, tmp_path: Path, engine, capsys):
    out = tmp_path / "skip"
    # a probed score is a mean of a few agreement shares of a few chains: none lies strictly in (0.999, 1.0)
    root, records = _run(
        tiny_population, out, engine, curriculum={**CURRICULUM["curriculum"], "low": 0.999, "high": 1.0}
    )
    assert [r["generation"] for r in records] == [0, 1]
    rec = records[-1]
    assert rec["skipped"].startswith("no learnable cell") and "low (0.999)" in rec["skipped"]
    assert "generation 1 is skipped" in capsys.readouterr().err
    assert rec["curriculum"]["cells"] == [] and rec["heldout"]["problems"] == 9
    before, after = load_population(tiny_population), load_population(root)
    assert after.manifest.generation == 1
    assert [m.path for m in after.manifest.members] == [m.path for m in before.manifest.members]
    for m in before.manifest.members:
        for f in before.member_dir(m.name).iterdir():
            assert (after.member_dir(m.name) / f.name).read_bytes() == f.read_bytes()


def test_every_label_below_the_threshold_trains_nothing(tiny_population: Path, tmp_path: Path, engine):
    # one-token chains cannot reach an answer, so no label reaches the threshold (the curriculum is off here:
    # with no answers every cell would score 0 and the generation would be skipped before any label)
    root, records = _run(tiny_population, tmp_path / "nolabels", engine, max_tokens=1, curriculum={"enabled": False})
    rec = records[-1]
    assert rec["generation"] == 1 and "skipped" not in rec
    assert rec["train"]["labelled"] == 0 and set(rec["train"]["examples"].values()) == {0}
    assert all(m["train_steps"] == 0 for m in rec["members"])
    assert rec["labels_audit"]["labelled"] == 0 and rec["labels_audit"]["precision"] is None
    before, after = load_population(tiny_population), load_population(root)
    survivors = [m for m in after.manifest.members if m.born_generation == 0]
    assert survivors and all(m.path == before.member(m.name).path for m in survivors)


def test_a_dataset_without_levels_or_answers_runs_the_agreement_proposer(tiny_population: Path, tmp_path: Path, engine):
    from trainer.tasks.sandbox import generate_problems

    data = tmp_path / "questions.jsonl"
    problems = generate_problems(30, seed=9, split="train", domains=["add", "sub"], difficulties=[1, 2])
    data.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in problems))
    root, records = _run(
        tiny_population,
        tmp_path / "agreement",
        engine,
        data=str(data),
        heldout_per_domain=0,
        curriculum={**CURRICULUM["curriculum"], "proposer": "agreement"},
    )
    rec = records[-1]
    cur = rec["curriculum"]
    assert set(cur["probe"]) == {"all:0"}
    assert cur["probe"]["all:0"]["problems"] == 12  # 6 practised problems x 2 pool rows each
    assert cur["cells"] == ["all:0"] or rec["skipped"].startswith("no learnable problem")
    assert rec["labels_audit"] is None  # no answers anywhere: nothing was read, nothing to report
    assert load_population(root).manifest.generation == 1


def test_frontier_on_a_dataset_is_refused_before_anything_runs(tiny_population: Path, tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**CURRICULUM, "data": str(tmp_path / "x.jsonl")}))
    code, out = _finish(_cli("--config", str(cfg), "--population", str(tiny_population), "--out", str(tmp_path / "o")))
    assert code != 0 and "use curriculum.proposer: agreement" in out
    assert not (tmp_path / "o").exists()
