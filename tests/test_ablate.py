"""Tests of the `ensemble-train ablate` harness with a fake cell runner (no vLLM, no model).

The fake runner returns results shaped like :meth:`trainer.study.ablate.cells.CellRunner.run`'s, with a
known synthetic effect per factor (plus a per-seed offset and small seeded noise), so the
design, the resume logic, the failure handling and the statistics of the report are checked
against numbers we chose.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError

from trainer.cli import main
from trainer.study.ablate import (
    DEFAULT_LEVELS,
    AblationError,
    cell_id,
    design_cells,
    format_report,
    plan,
    report,
    run_ablation,
)
from trainer.study.ablate.config import ABLATION_FACTORS, HARNESS_EVOLVE_KEYS, AblateConfig
from trainer.study.ablate.design import Cell, config_hash, levels_of
from trainer.study.ablate.folder import failed_path, result_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DOMAIN_BASE = {"add": 1.5, "sub": 2.0}
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def is_on(cell: Cell, factor: str) -> bool:
    """Whether `factor` is at its test level in `cell` (varied, fixed or default)."""
    return cell.levels[factor] == ABLATION_FACTORS[factor][1]


def router_gain(cell: Cell, seed: int) -> dict[str, float]:
    """The synthetic truth of the main tests: the router's test level lowers `add`'s log-PPL.

    By 0.06 where evolution is off and 0.14 where it is on (mean 0.10 on `add`, so 0.05 on the
    balanced log-PPL, with a router x evolution interaction of 0.04); nothing else has an effect.
    """
    if not is_on(cell, "router"):
        return {}
    return {"add": 0.06 + (0.08 if is_on(cell, "evolution") else 0.0)}


class FakeRunner:
    """A `Runner` whose results are base + seed offset - gain(cell, seed) + seeded noise, per domain.

    `fail(cell, seed)` returning an exception makes that run raise it; every call is recorded.
    """

    def __init__(
        self,
        gain: Callable[[Cell, int], dict[str, float]] = router_gain,
        *,
        noise: float = 0.003,
        fail: Callable[[Cell, int], BaseException | None] | None = None,
    ) -> None:
        self.gain = gain
        self.noise = noise
        self.fail = fail
        self.calls: list[tuple[str, int]] = []
        self.closed = 0
        self.notes: list[str] = []

    def per_domain(self, cell: Cell, seed: int) -> dict[str, float]:
        gain = self.gain(cell, seed)
        out = {}
        for d, base in DOMAIN_BASE.items():
            rng = random.Random(f"{cell.id}|{seed}|{d}")
            out[d] = base + 0.2 * seed - gain.get(d, 0.0) + rng.gauss(0.0, self.noise)
        return out

    def run(self, cell: Cell, seed: int, note: Callable[[str], None]) -> dict[str, Any]:
        self.calls.append((cell.id, seed))
        note("evolve")
        self.notes.append("evolve")
        if self.fail is not None and (exc := self.fail(cell, seed)) is not None:
            raise exc
        per_domain = self.per_domain(cell, seed)
        balanced = sum(per_domain.values()) / len(per_domain)
        ref = {"balanced_log_ppl": balanced + 0.3, "per_domain": {d: v + 0.3 for d, v in per_domain.items()}}
        return {
            "balanced_log_ppl": balanced,
            "per_domain": per_domain,
            "tokens": {d: 100 for d in per_domain},
            "reference": {
                "uniform": ref,
                "best_member": {"name": "m0", **ref},
                "base": {"balanced_log_ppl": balanced + 1.0, "per_domain": {d: v + 1.0 for d, v in per_domain.items()}},
            },
            "router": {"variant": cell.levels["router"], "specialisation_score": 0.25, "final_loss": 0.1},
            "seconds": {"evolve": 0.0, "score": 0.0, "router": 0.0, "evaluate": 0.0},
        }

    def close(self) -> None:
        self.closed += 1


def make_cfg(out: Path, **kw: Any) -> AblateConfig:
    settings: dict[str, Any] = {"factors": ("router", "scope"), "seeds": (0, 1), "generations": 1}
    settings.update(kw)
    return AblateConfig(out=out, **settings)


def cell_named(cfg: AblateConfig, **levels: str) -> Cell:
    """The cell of `cfg` whose levels include `levels`."""
    (cell,) = [c for c in plan(cfg) if all(c.levels[f] == lv for f, lv in levels.items())]
    return cell


# --------------------------------------------------------------------------- 1. the design


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_full_design_has_every_combination_once_and_is_balanced(k: int):
    factors = list(ABLATION_FACTORS)[:k]
    cells = design_cells(factors, "full")
    assert len(cells) == 2**k
    assert len({tuple(sorted(c.items())) for c in cells}) == 2**k
    for f in factors:
        assert sum(c[f] for c in cells) == 2 ** (k - 1)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_half_fraction_is_the_balanced_principal_fraction(k: int):
    factors = list(ABLATION_FACTORS)[:k]
    cells = design_cells(factors, "half")
    assert len(cells) == 2 ** (k - 1)
    assert len({tuple(sorted(c.items())) for c in cells}) == len(cells)
    for c in cells:
        assert set(c) == set(factors)
        assert math.prod(1 if on else -1 for on in c.values()) == 1
    for f in factors:
        assert sum(c[f] for c in cells) == 2 ** (k - 2), f  # half on, half off
    # every pair of factors is balanced too (the fraction has resolution >= III for k >= 3)
    for a in factors:
        for b in factors:
            if a < b:
                assert sum(c[a] and c[b] for c in cells) == 2 ** (k - 3), (a, b)


def test_unknown_design_is_refused():
    with pytest.raises(AblationError, match="unknown design 'quarter'"):
        design_cells(["router", "scope"], "quarter")


def test_plan_ids_are_unique_folder_safe_and_stages_are_adjacent(tmp_path: Path):
    cfg = AblateConfig(
        out=tmp_path / "a",
        factors=("router", "scope", "evolution", "init"),
        design="full",
        fixed={"lifecycle": "off"},
    )
    cells = plan(cfg)
    assert len(cells) == 16
    ids = [c.id for c in cells]
    assert len(set(ids)) == len(ids)
    for c in cells:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", c.id), c.id
        assert c.id == cell_id(c.levels, cfg.factors)
        assert c.id.startswith("router-")  # the factors' order
        assert dict(c.coded) == {f: is_on(c, f) for f in cfg.factors}
        assert "router" not in c.stage and f"init-{c.levels['init']}" in c.stage
    # cells that share an evolve stage (they differ only in the router) come one after the other
    stages = [c.stage for c in cells]
    seen: list[str] = []
    for s in stages:
        if not seen or seen[-1] != s:
            assert s not in seen, f"stage {s} split: {stages}"
            seen.append(s)
    assert len(seen) == 8 and all(stages.count(s) == 2 for s in seen)


def test_levels_hold_fixed_and_default_levels(tmp_path: Path):
    cfg = make_cfg(tmp_path / "a", factors=("router", "scope"), fixed={"init": "random", "evolution": "off"})
    cell = {"router": True, "scope": False}
    assert levels_of(cfg, cell) == {
        "router": "sigmoid_floor",
        "scope": "global",
        "lifecycle": DEFAULT_LEVELS["lifecycle"],
        "evolution": "off",
        "init": "random",
        "inheritance": "blend",
        "alignment": "aligned",
    }
    for c in plan(cfg):
        assert set(c.levels) == set(ABLATION_FACTORS)
        assert (c.levels["init"], c.levels["evolution"], c.levels["lifecycle"]) == ("random", "off", "off")
    assert levels_of(cfg, {}) == {**DEFAULT_LEVELS, "init": "random", "evolution": "off"}


def test_config_hash_ignores_seeds_out_and_machine_settings_only(tmp_path: Path):
    cfg = make_cfg(tmp_path / "a")
    same = make_cfg(tmp_path / "b", seeds=(0, 1, 2, 3), threads=7, gpu_memory_utilization=0.5)
    assert config_hash(cfg) == config_hash(same)
    assert config_hash(cfg) != config_hash(make_cfg(tmp_path / "a", generations=2))
    assert config_hash(cfg) != config_hash(make_cfg(tmp_path / "a", fixed={"init": "random"}))
    assert config_hash(cfg) != config_hash(make_cfg(tmp_path / "a", evolve={"train_steps": 3}))


@pytest.mark.parametrize(
    "name, cells",
    [
        ("ablate.yaml", 8),
        ("ablate-regime.yaml", 4),
        ("ablate-branched-regime.yaml", 4),
        ("ablate-branched-inheritance.yaml", 2),
        ("ablate-branched-niche.yaml", 2),
    ],
)
def test_shipped_configs_are_valid(name: str, cells: int, tmp_path: Path):
    data = yaml.safe_load((CONFIGS / name).read_text())
    cfg = AblateConfig(**{**data, "out": tmp_path / "x"})
    assert len(plan(cfg)) == cells
    assert all(len(pair) == 2 for pair in cfg.interactions)


# --------------------------------------------------------------------------- 2. a known effect is found


@pytest.fixture(scope="module")
def known_effect(tmp_path_factory: pytest.TempPathFactory) -> tuple[AblateConfig, dict[str, Any], FakeRunner]:
    out = tmp_path_factory.mktemp("ablate") / "known"
    cfg = AblateConfig(
        out=out,
        factors=("router", "scope", "evolution"),
        seeds=(0, 1, 2, 3, 4),
        generations=1,
        interactions=(("router", "evolution"), ("router", "scope")),
    )
    runner = FakeRunner()
    summary = run_ablation(cfg, runner, progress=False)
    return cfg, summary, runner


def test_every_cell_runs_once_per_seed_and_the_runner_is_closed(known_effect):
    cfg, summary, runner = known_effect
    cells = plan(cfg)
    assert sorted(runner.calls) == sorted((c.id, s) for c in cells for s in cfg.seeds)
    assert runner.closed == 1
    assert summary["complete"] is True and summary["missing"] == []
    for c in cells:
        for s in cfg.seeds:
            saved = json.loads(result_path(cfg.out, c, s).read_text())
            assert (saved["cell"], saved["seed"], saved["levels"]) == (c.id, s, c.levels)
            assert saved["seconds"]["total"] >= 0 and "evolve" in saved["seconds"]
            assert saved["balanced_log_ppl"] == pytest.approx(sum(saved["per_domain"].values()) / 2)


def test_a_known_effect_is_detected_with_the_right_sign_and_size(known_effect):
    _, summary, _ = known_effect
    router, scope, evolution = (summary["effects"][f] for f in ("router", "scope", "evolution"))
    # the test level (sigmoid_floor) lowers log-PPL by 0.05 on average: delta = ref - test = +0.05
    assert router["n"] == 5 and len(router["deltas"]) == 5
    assert router["mean"] == pytest.approx(0.05, abs=0.003)
    assert router["p"] < 0.01 and router["t"] > 0
    assert all(d > 0 for d in router["deltas"])
    # scope does nothing
    assert abs(scope["mean"]) < 0.003
    assert scope["p"] > 0.05
    # evolution's own main effect is the half of the interaction: (0.14 - 0.06) / 2 / 2 = 0.02
    assert evolution["mean"] == pytest.approx(0.02, abs=0.003)


def test_per_domain_effects_locate_the_effect(known_effect):
    _, summary, _ = known_effect
    per = summary["domain_effects"]
    assert set(per) == {"router", "scope", "evolution"}
    assert set(per["router"]) == set(DOMAIN_BASE)
    assert per["router"]["add"]["mean"] == pytest.approx(0.10, abs=0.005)
    assert per["router"]["add"]["p"] < 0.01
    assert abs(per["router"]["sub"]["mean"]) < 0.005
    assert abs(per["scope"]["add"]["mean"]) < 0.005 and abs(per["scope"]["sub"]["mean"]) < 0.005


def test_interactions_are_reported_per_level_with_their_difference(known_effect):
    _, summary, _ = known_effect
    by_evolution, by_scope = summary["interactions"]
    assert (by_evolution["factor"], by_evolution["by"]) == ("router", "evolution")
    assert set(by_evolution["effect_at"]) == {"off", "on"}
    assert by_evolution["effect_at"]["off"]["mean"] == pytest.approx(0.03, abs=0.003)
    assert by_evolution["effect_at"]["on"]["mean"] == pytest.approx(0.07, abs=0.003)
    assert by_evolution["difference"]["mean"] == pytest.approx(0.04, abs=0.004)
    assert by_evolution["difference"]["p"] < 0.01
    assert (by_scope["factor"], by_scope["by"]) == ("router", "scope")
    assert set(by_scope["effect_at"]) == {"global", "domain_loo"}
    assert by_scope["effect_at"]["global"]["mean"] == pytest.approx(0.05, abs=0.004)
    assert by_scope["effect_at"]["domain_loo"]["mean"] == pytest.approx(0.05, abs=0.004)
    assert abs(by_scope["difference"]["mean"]) < 0.004 and by_scope["difference"]["p"] > 0.05


def test_cell_table_and_summary_header(known_effect):
    cfg, summary, _ = known_effect
    assert summary["config_hash"] == config_hash(cfg)
    assert summary["factors"] == {f: list(ABLATION_FACTORS[f]) for f in cfg.factors}
    assert summary["fixed"] == {"lifecycle": "off", "init": "pre_aligned"}
    assert summary["design"] == "full" and summary["seeds"] == [0, 1, 2, 3, 4]
    rows = {r["cell"]: r for r in summary["cells"]}
    assert set(rows) == {c.id for c in plan(cfg)}
    for row in rows.values():
        assert row["seeds"] == [0, 1, 2, 3, 4]
        assert set(row["levels"]) == set(cfg.factors)
        assert row["balanced_log_ppl"]["n"] == 5 and row["balanced_log_ppl"]["se"] > 0
        assert row["uniform_mixture"]["mean"] == pytest.approx(row["balanced_log_ppl"]["mean"] + 0.3)
        assert row["base"]["mean"] == pytest.approx(row["balanced_log_ppl"]["mean"] + 1.0)
        assert row["specialisation"]["mean"] == pytest.approx(0.25)
    # mean over seeds of base + 0.2 * seed: 1.75 + 0.4 in the reference cell
    ref = rows["router-softmax__scope-global__evolution-off"]["balanced_log_ppl"]["mean"]
    assert ref == pytest.approx(1.75 + 0.4, abs=0.005)


def test_report_files_are_written(known_effect):
    cfg, summary, _ = known_effect
    assert json.loads((cfg.out / "ablation.json").read_text()) == json.loads(json.dumps(summary))
    md = (cfg.out / "ablation.md").read_text()
    assert md == format_report(summary)
    assert "router (softmax -> sigmoid_floor)" in md
    assert "## Interactions" in md and "router | evolution=on" in md
    assert "## Effects per domain" in md and "| add | sub |" in md
    assert "None: every cell finished for every seed." in md
    for name in ("effects.png", "domains.png"):
        data = (cfg.out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name


def test_report_alone_reproduces_the_run_summary(known_effect):
    cfg, summary, _ = known_effect
    again = report(cfg)
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(summary))


# --------------------------------------------------------------------------- 3. resume


def test_resume_reruns_only_what_is_missing(tmp_path: Path):
    cfg = make_cfg(tmp_path / "a")
    first = FakeRunner()
    run_ablation(cfg, first, progress=False)
    assert len(first.calls) == 4 * 2
    hash_file = json.loads((cfg.out / "ablate-run.json").read_text())
    assert hash_file["config_hash"] == config_hash(cfg)

    again = FakeRunner()
    summary = run_ablation(cfg, again, progress=False)
    assert again.calls == [] and summary["complete"]

    victim = cell_named(cfg, router="sigmoid_floor", scope="domain_loo")
    before = result_path(cfg.out, victim, 1).read_text()
    result_path(cfg.out, victim, 1).unlink()
    third = FakeRunner()
    run_ablation(cfg, third, progress=False)
    assert third.calls == [(victim.id, 1)]
    redone = json.loads(result_path(cfg.out, victim, 1).read_text())
    assert redone["balanced_log_ppl"] == json.loads(before)["balanced_log_ppl"]


def test_a_new_seed_reuses_the_old_cells(tmp_path: Path):
    run_ablation(make_cfg(tmp_path / "a"), FakeRunner(), progress=False)
    more = make_cfg(tmp_path / "a", seeds=(0, 1, 2))
    runner = FakeRunner()
    summary = run_ablation(more, runner, progress=False)
    assert sorted(runner.calls) == sorted((c.id, 2) for c in plan(more))
    assert summary["effects"]["router"]["n"] == 3 and summary["complete"]


def test_another_config_in_the_same_folder_is_refused(tmp_path: Path):
    run_ablation(make_cfg(tmp_path / "a"), FakeRunner(), progress=False)
    runner = FakeRunner()
    with pytest.raises(AblationError, match="another config"):
        run_ablation(make_cfg(tmp_path / "a", generations=2), runner, progress=False)
    assert runner.calls == []


def test_a_folder_that_is_not_an_ablation_is_refused(tmp_path: Path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    runner = FakeRunner()
    with pytest.raises(AblationError, match="not an ablation folder"):
        run_ablation(make_cfg(out), runner, progress=False)
    assert runner.calls == [] and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_an_empty_existing_folder_is_used(tmp_path: Path):
    out = tmp_path / "empty"
    out.mkdir()
    summary = run_ablation(make_cfg(out), FakeRunner(), progress=False)
    assert summary["complete"] and (out / "ablate-run.json").exists()


def test_an_unreadable_run_file_is_refused(tmp_path: Path):
    out = tmp_path / "a"
    out.mkdir()
    (out / "ablate-run.json").write_text("{not json")
    with pytest.raises(AblationError, match="unreadable"):
        run_ablation(make_cfg(out), FakeRunner(), progress=False)


# --------------------------------------------------------------------------- 4. a crashing cell


def test_a_crashing_cell_is_recorded_and_retried(tmp_path: Path):
    cfg = make_cfg(tmp_path / "a", seeds=(0, 1, 2))
    bad = cell_named(cfg, router="softmax", scope="domain_loo")

    def fail(cell: Cell, seed: int) -> BaseException | None:
        return RuntimeError("CUDA out of memory (fake)") if (cell.id, seed) == (bad.id, 1) else None

    runner = FakeRunner(fail=fail)
    summary = run_ablation(cfg, runner, progress=False)
    assert len(runner.calls) == 4 * 3 and runner.closed == 1  # the others still ran
    assert not result_path(cfg.out, bad, 1).exists()
    record = json.loads(failed_path(cfg.out, bad, 1).read_text())
    assert record["error"] == "RuntimeError: CUDA out of memory (fake)"
    assert (record["cell"], record["seed"]) == (bad.id, 1)
    assert "RuntimeError" in record["traceback"]
    assert failed_path(cfg.out, bad, 1) == cfg.out / "cells" / bad.id / "seed-1.failed.json"

    assert summary["complete"] is False
    assert summary["missing"] == [{"cell": bad.id, "seed": 1, "reason": "RuntimeError: CUDA out of memory (fake)"}]
    # the comparisons that use the failed cell pair only the seeds present everywhere
    assert summary["effects"]["router"]["n"] == 2
    row = next(r for r in summary["cells"] if r["cell"] == bad.id)
    assert row["seeds"] == [0, 2]
    md = (cfg.out / "ablation.md").read_text()
    missing_part = md.split("## Missing cells", 1)[1]
    assert f"- {bad.id} seed 1: RuntimeError: CUDA out of memory (fake)" in missing_part

    healthy = FakeRunner()
    summary = run_ablation(cfg, healthy, progress=False)
    assert healthy.calls == [(bad.id, 1)]
    assert not failed_path(cfg.out, bad, 1).exists() and result_path(cfg.out, bad, 1).exists()
    assert summary["complete"] is True and summary["effects"]["router"]["n"] == 3
    assert "None: every cell finished" in (cfg.out / "ablation.md").read_text()


def test_a_cell_that_fails_again_keeps_its_latest_error(tmp_path: Path):
    cfg = make_cfg(tmp_path / "a")
    bad = cell_named(cfg, router="softmax", scope="global")
    run_ablation(cfg, FakeRunner(fail=lambda c, s: ValueError("first") if c.id == bad.id else None), progress=False)
    runner = FakeRunner(fail=lambda c, s: ValueError("second") if c.id == bad.id else None)
    summary = run_ablation(cfg, runner, progress=False)
    assert sorted(runner.calls) == [(bad.id, 0), (bad.id, 1)]
    assert {m["reason"] for m in summary["missing"]} == {"ValueError: second"}
    assert json.loads(failed_path(cfg.out, bad, 0).read_text())["error"] == "ValueError: second"


def test_every_cell_failing_gives_an_empty_summary_and_no_report(tmp_path: Path):
    cfg = make_cfg(tmp_path / "a")
    runner = FakeRunner(fail=lambda c, s: RuntimeError("dead"))
    assert run_ablation(cfg, runner, progress=False) == {}
    assert len(runner.calls) == 8 and runner.closed == 1
    assert not (cfg.out / "ablation.json").exists()
    assert len(list((cfg.out / "cells").glob("*/seed-*.failed.json"))) == 8
    with pytest.raises(AblationError, match="no finished cell"):
        report(cfg)


# --------------------------------------------------------------------------- 5. Ctrl-C


def test_keyboard_interrupt_propagates_and_keeps_the_finished_cells(tmp_path: Path):
    cfg = make_cfg(tmp_path / "a")
    runner = FakeRunner()
    runner.fail = lambda c, s: KeyboardInterrupt() if len(runner.calls) == 3 else None
    with pytest.raises(KeyboardInterrupt):
        run_ablation(cfg, runner, progress=False)
    assert runner.closed == 1
    done = sorted(cfg.out.glob("cells/*/seed-*.json"))
    assert len(done) == 2 and not list(cfg.out.glob("cells/*/*.failed.json"))
    summary = json.loads((cfg.out / "ablation.json").read_text())
    assert summary["complete"] is False
    assert sum(len(r["seeds"]) for r in summary["cells"]) == 2
    assert len(summary["missing"]) == 6 and {m["reason"] for m in summary["missing"]} == {"not run"}
    assert (cfg.out / "ablation.md").exists()

    rest = FakeRunner()
    summary = run_ablation(cfg, rest, progress=False)
    assert len(rest.calls) == 6 and summary["complete"]


# --------------------------------------------------------------------------- 6. the report


def test_report_without_any_finished_cell_is_refused(tmp_path: Path):
    with pytest.raises(AblationError, match="no finished cell"):
        report(make_cfg(tmp_path / "nothing"))


def test_a_factor_missing_a_level_is_not_estimable(tmp_path: Path):
    cfg = make_cfg(tmp_path / "a", seeds=(0, 1, 2), interactions=(("router", "scope"),))
    runner = FakeRunner(fail=lambda c, s: RuntimeError("router broke") if is_on(c, "router") else None)
    summary = run_ablation(cfg, runner, progress=False)
    router = summary["effects"]["router"]
    assert router["n"] == 0 and router["mean"] is None
    assert "router" in router["missing"] and "on" in router["missing"]
    assert all(e.get("missing") for e in summary["domain_effects"]["router"].values())
    # scope is still estimable from the router-off cells
    assert summary["effects"]["scope"]["n"] == 3 and "missing" not in summary["effects"]["scope"]
    assert abs(summary["effects"]["scope"]["mean"]) < 0.01
    (inter,) = summary["interactions"]
    assert all(e.get("missing") for e in inter["effect_at"].values()) and "difference" not in inter
    assert len(summary["missing"]) == 6
    md = (cfg.out / "ablation.md").read_text()
    assert "not estimable: factor 'router' has no cell at its on level" in md
    assert (cfg.out / "effects.png").read_bytes().startswith(PNG_MAGIC)
    assert (cfg.out / "domains.png").read_bytes().startswith(PNG_MAGIC)


def test_a_factor_without_a_common_seed_is_not_estimable(tmp_path: Path):
    cfg = make_cfg(tmp_path / "a")
    off = cell_named(cfg, router="softmax", scope="global")
    on = cell_named(cfg, router="sigmoid_floor", scope="global")
    # seed 0 only in `off`, seed 1 only in `on`: no seed is present in every cell
    runner = FakeRunner(
        fail=lambda c, s: RuntimeError("x") if (c.id, s) in {(off.id, 1), (on.id, 0)} else None,
    )
    summary = run_ablation(cfg, runner, progress=False)
    assert "no seed is present in every cell" in summary["effects"]["router"]["missing"]
    assert "not estimable" in (cfg.out / "ablation.md").read_text()


def test_one_common_seed_gives_an_effect_without_a_test(tmp_path: Path):
    cfg = make_cfg(tmp_path / "a")
    bad = cell_named(cfg, router="sigmoid_floor", scope="domain_loo")
    summary = run_ablation(
        cfg, FakeRunner(fail=lambda c, s: RuntimeError("x") if (c.id, s) == (bad.id, 1) else None), progress=False
    )
    router = summary["effects"]["router"]
    assert router["n"] == 1 and router["p"] is None and router["se"] is None
    # evolution is at its default level (on), where the router lowers `add` by 0.14: 0.07 balanced
    assert router["mean"] == pytest.approx(0.07, abs=0.01)
    assert (cfg.out / "effects.png").read_bytes().startswith(PNG_MAGIC)


def test_interaction_difference_pairs_by_seed(tmp_path: Path):
    cfg = make_cfg(tmp_path / "a", seeds=(0, 1, 2), interactions=(("router", "scope"),))

    def gain(cell: Cell, seed: int) -> dict[str, float]:
        # the router's effect depends on the seed only (0, 0.1, 0.2 on `add`): no interaction with scope
        return {"add": 0.1 * seed} if is_on(cell, "router") else {}

    lost = {
        (cell_named(cfg, router="softmax", scope="global").id, 2),
        (cell_named(cfg, router="softmax", scope="domain_loo").id, 0),
    }
    runner = FakeRunner(gain, noise=0.0, fail=lambda c, s: RuntimeError("x") if (c.id, s) in lost else None)
    summary = run_ablation(cfg, runner, progress=False)
    (inter,) = summary["interactions"]
    assert inter["effect_at"]["global"]["n"] == 2 and inter["effect_at"]["domain_loo"]["n"] == 2
    # only seed 1 has the router effect at both scope levels, and there it is the same: difference 0
    assert inter["difference"]["seeds"] == [1]
    assert inter["difference"]["mean"] == pytest.approx(0.0, abs=1e-9)


def test_report_of_another_config_is_refused(tmp_path: Path):
    run_ablation(make_cfg(tmp_path / "a"), FakeRunner(), progress=False)
    with pytest.raises(AblationError, match="another config"):
        report(make_cfg(tmp_path / "a", generations=5))
    # interactions are read by the report only: asking for another one is not another config
    again = report(make_cfg(tmp_path / "a", interactions=(("router", "scope"),)))
    assert again["interactions"][0]["factor"] == "router"


# --------------------------------------------------------------------------- 7. bad configs


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"factors": ("router", "temperature")}, "unknown factor.*temperature"),
        ({"factors": ("router", "router")}, "listed twice"),
        ({"factors": ()}, "at least one factor"),
        ({"seeds": (0,)}, "at least 2 seeds"),
        ({"seeds": (1, 1)}, "seed is listed twice"),
        ({"fixed": {"temperature": "hot"}}, "fixed: unknown factor 'temperature'"),
        ({"fixed": {"init": "warm"}}, "fixed: init has levels.*'warm'"),
        ({"fixed": {"router": "softmax"}}, r"\['router'\] cannot be both varied"),
        ({"design": "half"}, "half fraction of 2 factor.*impossible"),
        ({"design": "third"}, "design"),
        ({"interactions": (("router", "init"),)}, "interactions.*two different varied factors"),
        ({"interactions": (("router", "router"),)}, "interactions.*two different varied factors"),
        (
            {"factors": ("router", "scope", "evolution"), "design": "half", "interactions": (("router", "scope"),)},
            "aliased",
        ),
        ({"evolve": {"seed": 3}}, r"evolve: \['seed'\] are set by the harness"),
        ({"evolve": {"generations": 3}}, r"evolve: \['generations'\] are set by the harness"),
        ({"evolve": {"fitness_scope": "global"}}, "set by the harness"),
        ({"evolve": {"train_stepz": 3}}, "train_stepz"),
        ({"evolve": {"train_steps": -1}}, "train_steps"),
        ({"router": {"variant": "softmax"}}, r"router: \['variant'\] are set by the harness"),
        ({"router": {"seed": 1}}, r"router: \['seed'\] are set by the harness"),
        ({"router": {"t_start": 0.5, "t_end": 1.0}}, "t_end"),
        ({"router": {"bogus": 1}}, "bogus"),
        ({"factors": ("router", "lifecycle"), "evolve": {}}, "lifecycle 'on' would do nothing"),
        ({"fixed": {"lifecycle": "on"}, "evolve": {"lifecycle": {"max_deaths": 2}}}, "lifecycle 'on' would do nothing"),
        ({"generations": 0}, "generations"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_configs_are_refused_naming_the_problem(settings: dict[str, Any], message: str, tmp_path: Path):
    with pytest.raises(ValidationError, match=message):
        make_cfg(tmp_path / "a", **settings)


def test_every_harness_key_is_refused_in_evolve(tmp_path: Path):
    for key in HARNESS_EVOLVE_KEYS:
        with pytest.raises(ValidationError, match=f"evolve: \\['{key}'\\] are set by the harness"):
            make_cfg(tmp_path / "a", evolve={key: None})


@pytest.mark.parametrize(
    "lifecycle",
    [{"death_fitness": 0.3}, {"max_age": 2}, {"inherit_alpha": 0.5}, {"svd_mutation": 0.01}],
)
def test_lifecycle_is_accepted_when_it_does_something(lifecycle: dict[str, Any], tmp_path: Path):
    cfg = make_cfg(tmp_path / "a", factors=("router", "lifecycle"), evolve={"lifecycle": lifecycle})
    assert {c.levels["lifecycle"] for c in plan(cfg)} == {"off", "on"}
    fixed = make_cfg(tmp_path / "a", fixed={"lifecycle": "on"}, evolve={"lifecycle": lifecycle})
    assert {c.levels["lifecycle"] for c in plan(fixed)} == {"on"}


def test_good_configs_are_accepted(tmp_path: Path):
    half = make_cfg(tmp_path / "a", factors=("router", "scope", "evolution", "init"), design="half")
    assert len(plan(half)) == 8
    # with 4 factors a two-factor interaction is aliased only with another interaction: allowed
    assert make_cfg(tmp_path / "a", factors=half.factors, design="half", interactions=(("router", "init"),))
    assert make_cfg(tmp_path / "a", factors=("router",)).factors == ("router",)
    assert make_cfg(tmp_path / "a", fixed={"lifecycle": "off", "init": "random"}).fixed["init"] == "random"


# --------------------------------------------------------------------------- 8. the command line


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


BASE_YAML = {"factors": ["router", "scope"], "seeds": [0, 1], "generations": 1}


def test_cli_report_only_without_results_fails_clearly(tmp_path: Path):
    cfg_file = write_yaml(tmp_path / "a.yaml", {**BASE_YAML, "out": str(tmp_path / "runs")})
    result = CliRunner().invoke(main, ["ablate", "--config", str(cfg_file), "--report-only"])
    assert result.exit_code == 1, result.output
    assert "no finished cell to report on" in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, AblationError)


def test_cli_unknown_factor_is_a_usage_error(tmp_path: Path):
    cfg_file = write_yaml(
        tmp_path / "a.yaml", {**BASE_YAML, "factors": ["router", "temperature"], "out": str(tmp_path / "r")}
    )
    result = CliRunner().invoke(main, ["ablate", "--config", str(cfg_file), "--report-only"])
    assert result.exit_code == 2, result.output
    assert "temperature" in result.output and "unknown factor" in result.output
    assert str(cfg_file) in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_cli_report_only_prints_the_report_of_a_finished_run(tmp_path: Path):
    out = tmp_path / "runs"
    run_ablation(make_cfg(out), FakeRunner(), progress=False)
    cfg_file = write_yaml(tmp_path / "a.yaml", {**BASE_YAML, "out": str(out)})
    result = CliRunner().invoke(main, ["ablate", "--config", str(cfg_file), "--report-only"])
    assert result.exit_code == 0, result.output
    assert "# Ablation report" in result.output and "router (softmax -> sigmoid_floor)" in result.output
    assert f"report: {out / 'ablation.md'}" in result.output


@pytest.mark.parametrize(
    "fail, code, message",
    [
        (None, 0, "None: every cell finished"),
        (lambda c, s: RuntimeError("boom") if s == 1 and is_on(c, "scope") else None, 1, "2 cell run(s) missing"),
        (lambda c, s: KeyboardInterrupt() if s == 1 else None, 130, "stopped; finished cells are kept"),
        (lambda c, s: RuntimeError("boom"), 1, "no cell finished"),
    ],
)
def test_cli_run_with_a_fake_cell_runner(fail, code: int, message: str, tmp_path: Path, monkeypatch):
    made: list[FakeRunner] = []

    def fake_cell_runner(cfg: AblateConfig, progress: bool = False) -> FakeRunner:
        made.append(FakeRunner(fail=fail))
        return made[-1]

    # no vLLM: only the command is under test
    monkeypatch.setattr("trainer.study.ablate.run.CellRunner", fake_cell_runner)
    cfg_file = write_yaml(tmp_path / "a.yaml", {**BASE_YAML, "out": str(tmp_path / "runs")})
    result = CliRunner().invoke(main, ["ablate", "--config", str(cfg_file), "--quiet"])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert len(made) == 1 and made[0].closed == 1 and len(made[0].calls) >= 1


@pytest.mark.filterwarnings("ignore:Precision loss occurred")  # scipy says what the test is about
def test_identical_deltas_give_a_degenerate_test_written_as_strict_json(tmp_path: Path):
    # every seed shows exactly the same router gain: t would be infinite; the report stays strict JSON
    cfg = make_cfg(tmp_path / "a", seeds=(0, 1, 2))
    summary = run_ablation(
        cfg, FakeRunner(lambda c, s: {"add": 0.12} if is_on(c, "router") else {}, noise=0.0), progress=False
    )
    router = summary["effects"]["router"]
    assert router["mean"] == pytest.approx(0.12 / len(DOMAIN_BASE)) and router["se"] == pytest.approx(0.0, abs=1e-12)
    # zero spread (or float rounding's): p is 0 and t is infinite, written as None, or huge but finite
    assert router["p"] == pytest.approx(0.0, abs=1e-12)
    assert router["t"] is None or math.isfinite(router["t"])

    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    json.loads((cfg.out / "ablation.json").read_text(), parse_constant=refuse)
