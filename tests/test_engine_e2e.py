"""vLLM (CPU build) loads the substrate and the members, batches them, and the members differ.

Slow: each engine start takes about 20-40 s on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ensemble_serve.shared.population import load_population

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def engine(embedded_population: Path):
    from ensemble_serve.shared.engine_config import EngineConfig
    from ensemble_serve.shared.offline_engine import OfflineEngine

    eng = OfflineEngine(load_population(embedded_population), EngineConfig(gpu_memory_utilization=0.1))
    yield eng
    del eng


def test_vllm_generates_for_base_and_every_member_in_one_batch(engine):
    from vllm import SamplingParams

    from trainer.tasks.sandbox import generate_problems, verify

    problems = generate_problems(12, seed=99, split="heldout")
    names = engine.population.names
    members = [None] + names
    pairs = [(m, p) for m in members for p in problems]
    outputs = engine.generate(
        [engine.chat_prompt(p.prompt) for _, p in pairs],
        [m for m, _ in pairs],
        SamplingParams(temperature=0, max_tokens=96),
    )
    assert len(outputs) == len(pairs) and all(len(o) == 1 for o in outputs)
    texts: dict[str | None, list[str]] = {m: [] for m in members}
    correct = 0
    for (m, p), (gen,) in zip(pairs, outputs):
        assert gen.tokens > 0 and gen.member == m
        texts[m].append(gen.text)
        correct += verify(p, gen.text).correct
    # every member writes chains ending in the marked answer format most of the time
    marked = sum("#### " in t for ts in texts.values() for t in ts)
    assert marked >= 0.8 * len(pairs)
    # different adapters give different text: no two members' outputs are identical over all prompts
    distinct = {tuple(ts) for ts in texts.values()}
    assert len(distinct) == len(members)
    assert correct > 0


def test_different_members_differ_on_the_same_prompt(engine):
    from vllm import SamplingParams

    prompt = engine.chat_prompt("calc (7+8)*6-9*4")
    names = engine.population.names
    outs = engine.generate([prompt] * len(names), names, SamplingParams(temperature=0, max_tokens=96))
    assert len({o[0].text for o in outs}) >= 2


def test_unknown_member_is_refused(engine):
    from vllm import SamplingParams

    with pytest.raises(KeyError, match="unknown member 'nobody'"):
        engine.generate(["x"], ["nobody"], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="1 prompts but 2 members"):
        engine.generate(["x"], [None, None], SamplingParams(max_tokens=1))


def test_ensemble_train_eval_cli_runs_vllm_over_a_fresh_population(tiny_population: Path, tmp_path: Path):
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.cli",
            "eval",
            "--population",
            str(tiny_population),
            "--per-domain",
            "2",
            "--max-tokens",
            "24",
            "--gpu-memory-utilization",
            "0.1",
            "--out",
            str(out),
            "--update-manifest",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["problems"] == 12
    assert set(result["accuracy"]) == {"(base)", "m00", "m01", "m02"}
    for row in result["accuracy"].values():
        assert set(row) == {"add", "sub", "expr", "sort", "mod", "lookup", "all"}
        assert all(0 <= v <= 1 for v in row.values())
    assert "m00" in proc.stdout and "(base)" in proc.stdout
    pop = load_population(tiny_population)  # the recorded scores keep the manifest valid
    for m in pop.manifest.members:
        assert m.fitness == pytest.approx(result["accuracy"][m.name]["all"])
        assert m.domain_scores["add"] == pytest.approx(result["accuracy"][m.name]["add"])
