"""`ensemble-train router`: config checks, the pieces of trainer/router/command.py, and one real run on a tiny population.

The fast tests need no engine; the one slow test starts vLLM once (about 40 s on 2 cores).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from fixtures_population import copy_population
from pydantic import ValidationError

from ensemble_serve.shared.cliutil import load_config
from ensemble_serve.shared.population import (
    BaseModelRef,
    Manifest,
    Member,
    Population,
    load_population,
    read_manifest,
    write_manifest,
)
from ensemble_serve.shared.router import ROUTER_CONFIG, ROUTER_DIR, ROUTER_WEIGHTS, Router, RouterConfig, load_router
from ensemble_serve.shared.voting import Candidate, candidate_from_text
from trainer.cli import main
from trainer.router.config import RouterCommandConfig
from trainer.tasks.sandbox import Problem

ROOT = Path(__file__).resolve().parent.parent
MEMBERS = ["m00", "m01", "m02"]
ENTRY = {
    "path": ROUTER_DIR,
    "variant": "sigmoid_floor",
    "feature": "hidden_mean",
    "members": MEMBERS,
    "top_k": 2,
    "heldout": None,
}


# --------------------------------------------------------------------------- config and CLI surface


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"variant": "mixture"}, "variant"),
        ({"top_k": 0}, "top_k"),
        ({"feature": "logits"}, "feature"),
        ({"t_start": 0.5, "t_end": 2.0}, "anneal only cools"),
        ({"domains": ("add", "poetry")}, "unknown domain"),
    ],
)
def test_config_refuses_bad_settings(settings: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RouterCommandConfig(**settings)


def test_shipped_config_file_holds_the_defaults() -> None:
    cfg = load_config(RouterCommandConfig, ROOT / "configs" / "router.yaml", {})
    assert cfg == RouterCommandConfig()
    assert (cfg.variant, cfg.top_k, cfg.per_domain, cfg.heldout_per_domain) == ("sigmoid_floor", 3, 48, 16)


def test_help_lists_the_options() -> None:
    result = CliRunner().invoke(main, ["router", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    flags = ["--" + name.replace("_", "-") for name in RouterCommandConfig.model_fields]
    assert len(flags) == 27  # 22 of its own, 5 of where it samples (RemoteSettings)
    for flag in [*flags, "--config", "--dry-run"]:
        assert flag in result.output, flag
    assert "--skip-invalid / --no-skip-invalid" in result.output


def test_cli_refuses_an_unknown_variant_as_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["router", "--population", str(tmp_path), "--variant", "mixture"])
    assert result.exit_code == 2
    assert "variant" in result.output and "sigmoid_floor" in result.output
    assert list(tmp_path.iterdir()) == []


def test_missing_population_is_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = CliRunner().invoke(
        main, ["router", "--population", str(tmp_path / "missing"), "--per-domain", "1", "--out", str(out)]
    )
    assert result.exit_code == 1
    assert "population directory not found" in result.output
    assert list(tmp_path.iterdir()) == []


def test_dataset_without_labelled_rows_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "unlabelled.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "domain": "add"}) + "\n" for i in range(4)))
    result = CliRunner().invoke(main, ["router", "--population", str(tmp_path / "missing"), "--data", str(data)])
    assert result.exit_code == 1
    assert "no rows with an `answer`" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unlabelled.jsonl"]


# --------------------------------------------------------------------------- problems and evaluation


def _problem(answer: str, domain: str, prompt: str = "q") -> Problem:
    return Problem(prompt=prompt, answer=answer, chain=None, domain=domain, difficulty=1)


def _cand(member: str, text: str) -> Candidate:
    return candidate_from_text(member, 0, text, 3, "auto")


def test_split_dataset_holds_out_at_most_half_of_each_domain_deterministically() -> None:
    from trainer.router.command import split_dataset

    rows = [_problem(str(i), "a", f"a{i}") for i in range(10)] + [_problem(str(i), "b", f"b{i}") for i in range(3)]
    rows.append(_problem("0", "c", "c0"))
    train, heldout = split_dataset(rows, per_domain=4, seed=7)
    held = [p.domain for p in heldout]
    assert (held.count("a"), held.count("b"), held.count("c")) == (4, 1, 0)
    assert len(train) + len(heldout) == len(rows) and not {p.prompt for p in train} & {p.prompt for p in heldout}
    again_train, again_heldout = split_dataset(rows, per_domain=4, seed=7)
    assert again_heldout == heldout and again_train == train


def test_routed_vote_takes_the_majority_and_breaks_ties_by_summed_gate() -> None:
    from trainer.router.evaluation import routed_vote

    cands = [_cand("m0", "#### 5"), _cand("m1", "#### 7"), _cand("m2", "#### 7"), _cand("m3", "#### 5")]
    assert routed_vote(cands, [0.4, 0.3, 0.2, 0.45]) == "5"  # 2 v 2: 0.85 beats 0.5
    assert routed_vote(cands, [0.1, 0.3, 0.2, 0.15]) == "7"  # 2 v 2: 0.5 beats 0.25
    # a majority wins whatever the gates say
    assert routed_vote(cands[:3], [0.99, 0.01, 0.01]) == "7"
    assert routed_vote([_cand("m0", "no answer here")], [1.0]) is None


def test_heldout_report_scores_every_method_per_domain() -> None:
    from trainer.router.evaluation import heldout_report

    problems = [_problem("5", "add"), _problem("3", "sort"), _problem("9", "sort")]
    answers = [
        [_cand("m00", "#### 5"), _cand("m01", "#### 7"), _cand("m02", "#### 7")],
        [_cand("m00", "#### 4"), _cand("m01", "#### 3"), _cand("m02", "#### 3")],
        [_cand("m00", "#### 1"), _cand("m01", "#### 2"), _cand("m02", "nothing")],
    ]
    gates = torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.5, 0.6], [0.1, 0.9, 0.3]])
    report = heldout_report(problems, answers, gates, MEMBERS, k=2)
    acc = report["accuracy"]
    third = round(1 / 3, 4)
    assert acc["routed_top1"] == {"add": 1.0, "sort": 0.0, "all": third}
    # problem 0: m00's 5 and m01's 7 tie 1-1, m00's larger gate decides; problem 1: m00's 4 beats m02's 3 the same way
    assert acc["routed_top_k"] == {"add": 1.0, "sort": 0.0, "all": third}
    assert acc["all_vote"] == {"add": 0.0, "sort": 0.5, "all": third}
    assert acc["oracle"] == {"add": 1.0, "sort": 0.5, "all": round(2 / 3, 4)}
    assert report["best_member"] == "m00" and acc["best_member"] == report["members"]["m00"]
    assert report["routed_top1_choice"] == {"m00": 2, "m01": 1, "m02": 0}
    assert report["problems"] == 3 and report["top_k"] == 2


# --------------------------------------------------------------------------- install


def _population_manifest(root: Path) -> Path:
    """A manifest on disk (install_router reads only the manifest, never the member folders)."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(
        base_model=BaseModelRef(name="tiny-base", hub_id="org/tiny"),
        generation=0,
        members=[Member(name=n, rank=4, alpha=8.0) for n in MEMBERS],
    )
    write_manifest(root, manifest)
    return root


def _router(seed: int, members: list[str] = MEMBERS) -> Router:
    torch.manual_seed(seed)
    return Router(RouterConfig(variant="sigmoid_floor", members=members, input_dim=4, base_model="tiny-base"))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_install_writes_router_folder_and_manifest_entry(tmp_path: Path) -> None:
    from trainer.router.command import install_router

    root = _population_manifest(tmp_path / "pop")
    install_router(root, _router(0), ENTRY)
    assert (root / ROUTER_DIR / ROUTER_CONFIG).is_file() and (root / ROUTER_DIR / ROUTER_WEIGHTS).is_file()
    assert read_manifest(root).router == ENTRY
    loaded = load_router(root / ROUTER_DIR, expected_members=MEMBERS, base_model="tiny-base")
    torch.testing.assert_close(loaded.out.weight, _router(0).out.weight)
    # a second install replaces the first
    install_router(root, _router(1), {**ENTRY, "top_k": 3})
    assert read_manifest(root).router["top_k"] == 3
    torch.testing.assert_close(load_router(root / ROUTER_DIR).out.weight, _router(1).out.weight)
    assert sorted(p.name for p in root.iterdir()) == ["population.json", ROUTER_DIR]


def test_failed_manifest_write_keeps_the_previous_router_and_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.router.command as route

    root = _population_manifest(tmp_path / "pop")
    route.install_router(root, _router(0), ENTRY)
    before = _snapshot(root)

    def disk_full(*_args: object, **_kw: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(route, "write_manifest", disk_full)
    with pytest.raises(route.RouteError, match="No space left on device.*previous router and manifest are intact"):
        route.install_router(root, _router(1), {**ENTRY, "top_k": 3})
    assert _snapshot(root) == before
    assert sorted(p.name for p in root.iterdir()) == ["population.json", ROUTER_DIR]  # no temp folders left


def test_failed_router_write_leaves_no_router_and_the_manifest_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.router.command as route

    root = _population_manifest(tmp_path / "pop")
    before = _snapshot(root)

    def broken(*_args: object, **_kw: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(route, "save_router", broken)
    with pytest.raises(route.RouteError, match="Input/output error"):
        route.install_router(root, _router(0), ENTRY)
    assert _snapshot(root) == before and not (root / ROUTER_DIR).exists()


def test_install_refuses_a_router_for_other_members(tmp_path: Path) -> None:
    from trainer.router.command import RouteError, install_router

    root = _population_manifest(tmp_path / "pop")
    with pytest.raises(RouteError, match="population changed while the router trained"):
        install_router(root, _router(0, ["m00", "m01"]), {**ENTRY, "members": ["m00", "m01"]})
    assert not (root / ROUTER_DIR).exists() and read_manifest(root).router is None


# --------------------------------------------------------------------------- one real run


@pytest.mark.engine
def test_router_command_trains_evaluates_and_installs(
    tiny_population: Path, tiny_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.router.command as route

    pop = copy_population(tiny_population, tmp_path / "pop")
    names = read_manifest(pop).names
    assert names == MEMBERS
    small = ["--per-domain", "4", "--heldout-per-domain", "2", "--domains", "add,sort", "--steps", "20"]
    small += ["--max-tokens", "48", "--gpu-memory-utilization", "0.1"]
    runner = CliRunner()

    # top_k larger than the population: refused before the engine starts, nothing written
    manifest_bytes = (pop / "population.json").read_bytes()
    bad = runner.invoke(
        main, ["router", "--population", str(pop), *small, "--top-k", "5", "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code == 1
    assert "top_k 5 is larger than the population" in bad.output and "3 member(s)" in bad.output
    assert not (pop / ROUTER_DIR).exists() and not (tmp_path / "x").exists()
    assert (pop / "population.json").read_bytes() == manifest_bytes

    # the real run: vLLM answers, the router trains, is evaluated and installed
    recorded: dict[str, Any] = {}
    real_generate = route.generate_answers

    def spy(
        population: Population,
        problems: Sequence[Problem],
        cfg: RouterCommandConfig,
        progress: bool = False,
        engine: Any = None,
    ) -> list[list[Candidate]]:
        recorded["problems"] = list(problems)
        recorded["answers"] = real_generate(population, problems, cfg, progress, engine)
        return recorded["answers"]

    monkeypatch.setattr(route, "generate_answers", spy)
    cfg = RouterCommandConfig(
        population=pop,
        per_domain=4,
        heldout_per_domain=2,
        domains=("add", "sort"),
        steps=20,
        max_tokens=48,
        gpu_memory_utilization=0.1,
        out=tmp_path / "real.json",
    )
    result = route.run_router(cfg, progress=False, engine=tiny_engine)  # the session's engine (tests/conftest.py)
    table = route.format_report(result)
    print(table)  # the figures of this run (pytest -s shows them)

    assert result["problems"] == {"train": 8, "heldout": 4}
    assert len(recorded["problems"]) == 12 and all(len(row) == 3 for row in recorded["answers"])
    assert (pop / ROUTER_DIR / ROUTER_CONFIG).is_file() and (pop / ROUTER_DIR / ROUTER_WEIGHTS).is_file()
    entry = read_manifest(pop).router
    assert entry is not None and entry["members"] == MEMBERS and entry["path"] == ROUTER_DIR
    assert (entry["variant"], entry["feature"], entry["top_k"]) == ("sigmoid_floor", "hidden_mean", 3)
    assert set(entry["heldout"]) == {"problems", *route.METHODS} and entry["heldout"]["problems"] == 4
    acc = entry["heldout"]
    assert all(0.0 <= acc[m] <= 1.0 for m in route.METHODS)
    assert acc["oracle"] >= max(acc["best_member"], acc["routed_top1"], acc["all_vote"], acc["routed_top_k"])
    loaded = load_router(pop / ROUTER_DIR, expected_members=names, base_model=read_manifest(pop).base_model.name)
    assert loaded.cfg.trained_steps == 20 and loaded.members == MEMBERS
    assert load_population(pop).names == MEMBERS  # the population still loads with its router
    for label in ("routed top-1", "routed top-3 vote", "all-member vote", "best member (", "oracle", "mean gate"):
        assert label in table, label
    assert json.loads((tmp_path / "real.json").read_text())["manifest_router"] == entry

    # --dry-run through the CLI on a fresh copy, replaying the recorded answers instead of a second engine start
    fresh = copy_population(tiny_population, tmp_path / "fresh")
    fresh_manifest = (fresh / "population.json").read_bytes()

    def replay(
        population: Population,
        problems: Sequence[Problem],
        cfg: RouterCommandConfig,
        progress: bool = False,
        engine: Any = None,
    ) -> list[list[Candidate]]:
        assert list(problems) == recorded["problems"]
        return recorded["answers"]

    monkeypatch.setattr(route, "generate_answers", replay)
    dry = runner.invoke(main, ["router", "--population", str(fresh), *small, "--dry-run", "--out", str(tmp_path / "d")])
    assert dry.exit_code == 0, dry.output
    assert "dry run: nothing installed" in dry.output and "routed top-3 vote" in dry.output
    assert not (fresh / ROUTER_DIR).exists()
    assert (fresh / "population.json").read_bytes() == fresh_manifest
    dry_result = json.loads((tmp_path / "d").read_text())
    assert dry_result["installed"] is False
    # the gate heat map is written beside the JSON results
    assert (tmp_path / "d-specialisation.png").read_bytes().startswith(b"\x89PNG")
    # same answers, same seed: the dry run trains the same router and gets the same held-out figures
    assert dry_result["manifest_router"]["heldout"] == entry["heldout"]
