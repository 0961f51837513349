"""The `ensemble-train` command line: every option explained, bad input refused with the file named."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from ensemble_serve.shared.population import load_population
from trainer.cli import main
from trainer.evaluate import EvalConfig
from trainer.models.config import InitConfig, SubstrateConfig


@pytest.mark.parametrize("command, model", [("substrate", SubstrateConfig), ("init", InitConfig), ("eval", EvalConfig)])
def test_help_explains_every_option(command: str, model):
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "--config" in result.output
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in result.output, flag
        assert field.description and field.description.split()[0] in result.output


def test_flags_override_the_config_file(tmp_path: Path, monkeypatch):
    seen = {}

    def fake_train(cfg, progress=True):  # only the option plumbing is under test here
        seen["cfg"] = cfg
        return {"parameters": 1, "steps": cfg.steps, "train_seconds": 0.0, "final_loss": 0.0, "heldout_accuracy": {}}

    monkeypatch.setattr("trainer.models.substrate.train_substrate", fake_train)
    cfg_file = tmp_path / "s.yaml"
    cfg_file.write_text("steps: 11\nlr: 0.01\ndomains: [add, sub]\n")
    result = CliRunner().invoke(main, ["substrate", "--config", str(cfg_file), "--steps", "3", "--difficulties", "1,2"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.lr, cfg.domains, cfg.difficulties) == (3, 0.01, ("add", "sub"), (1, 2))
    # a list flag may also repeat, as `--remote A --remote B` (the last one alone would drop A silently)
    result = CliRunner().invoke(main, ["substrate", "--difficulties", "1", "--difficulties", "2,3", "--domains", "mod"])
    assert result.exit_code == 0, result.output
    assert (seen["cfg"].difficulties, seen["cfg"].domains) == ((1, 2, 3), ("mod",))


@pytest.mark.parametrize(
    "args, message",
    [
        (["substrate", "--steps", "-1"], "steps"),
        (["substrate", "--domains", "add,bogus"], "unknown domain"),
        (["init", "--members", "0"], "members"),
        (["init", "--ranks", "0,4"], "ranks must be in 1..64"),
        (["eval", "--per-domain", "0"], "per_domain"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], message: str):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output


def test_bad_config_file_is_named(tmp_path: Path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("members: [\n")
    result = CliRunner().invoke(main, ["init", "--config", str(bad)])
    assert result.exit_code == 2 and "broken.yaml is not valid YAML" in result.output


def test_eval_on_a_missing_population_is_a_clear_error(tmp_path: Path):
    result = CliRunner().invoke(main, ["eval", "--population", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "nope: population directory not found" in result.output


def test_tasks_writes_problems_a_command_can_read(tmp_path: Path):
    from trainer.tasks.sandbox import load_jsonl, verify

    out = tmp_path / "natural.jsonl"
    result = CliRunner().invoke(main, ["tasks", "-n", "16", "--split", "heldout", "--seed", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    problems = load_jsonl(out)
    assert len(problems) == 16 and all(verify(p, p.chain, "natural").correct for p in problems)
    again = tmp_path / "again.jsonl"
    CliRunner().invoke(main, ["tasks", "-n", "16", "--split", "heldout", "--seed", "4", "--out", str(again)])
    assert again.read_bytes() == out.read_bytes()  # seeded


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--families", "nope"], "unknown family 'nope'"),
        (["--levels", "9"], "levels must be distinct values"),
        (["--levels", "x"], "invalid literal"),
        (["-n", "0"], "0 is not in the range"),
        (["--kind", "sandbox", "--families", "word_add"], "unknown domain 'word_add'"),
    ],
)
def test_tasks_refuses_bad_settings(tmp_path: Path, args: list[str], words: str):
    out = tmp_path / "x.jsonl"
    result = CliRunner().invoke(main, ["tasks", *args, "--out", str(out)])
    assert result.exit_code == 2 and words in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "give one of --from-gguf FILE or --embedded-real"),
        (["--from-gguf", "x.gguf", "--embedded-real"], "give one of"),
    ],
)
def test_base_needs_one_source(args: list[str], words: str):
    result = CliRunner().invoke(main, ["base", *args])
    assert result.exit_code == 2 and words in result.output


def test_base_refuses_a_file_that_is_not_a_gguf_and_writes_nothing(tmp_path: Path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a model at all")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["base", "--from-gguf", str(bad), "--out", str(out)])
    assert result.exit_code == 1 and "not a GGUF file" in result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_export_ships_a_population_without_this_machines_base_path(tiny_population: Path, tmp_path: Path):
    out = tmp_path / "shipped"
    before = (tiny_population / "population.json").read_bytes()
    result = CliRunner().invoke(main, ["export", "--population", str(tiny_population), "--out", str(out)])
    assert result.exit_code == 0, result.output
    shipped = load_population(out)
    original = load_population(tiny_population)
    assert shipped.manifest.base_model.path is None and shipped.base_model_path is None
    assert shipped.manifest.base_model.sha256 == original.manifest.base_model.sha256
    assert shipped.names == original.names
    for name in shipped.names:
        a = shipped.member_dir(name) / "adapter_model.safetensors"
        assert a.read_bytes() == (original.member_dir(name) / "adapter_model.safetensors").read_bytes()
    assert (tiny_population / "population.json").read_bytes() == before  # the source is untouched
    # an existing --out is kept unless --overwrite; a bad population is named and leaves nothing
    again = CliRunner().invoke(main, ["export", "--population", str(tiny_population), "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    missing = CliRunner().invoke(main, ["export", "--population", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "nope" in missing.output and not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shipped"]
    replaced = CliRunner().invoke(
        main, ["export", "--population", str(tiny_population), "--out", str(out), "--overwrite"]
    )
    assert replaced.exit_code == 0, replaced.output


def test_base_path_only_prints_the_folder(monkeypatch, tmp_path: Path):
    folder = tmp_path / "converted"
    monkeypatch.setattr("trainer.cli.cached_conversion", lambda src: folder)
    monkeypatch.setattr("trainer.cli.embedded_real_gguf", lambda: tmp_path / "m.gguf")
    result = CliRunner().invoke(main, ["base", "--embedded-real", "--path-only"])
    assert result.exit_code == 0 and result.output == f"{folder}\n"
