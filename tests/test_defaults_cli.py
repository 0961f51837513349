"""`ensemble-serve defaults`: the population's `ensemble_defaults`, checked like a request's options."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ensemble_serve.cli import main
from ensemble_serve.shared.population import load_population


@pytest.fixture
def pop(tiny_population: Path, tmp_path: Path) -> Path:
    out = tmp_path / "pop"
    shutil.copytree(tiny_population, out, symlinks=True)
    return out


def _run(*args: str):
    return CliRunner().invoke(main, ["defaults", *args])


def test_set_show_and_clear(pop: Path) -> None:
    r = _run(str(pop), "--set", '{"vote": "calibrated", "samples_per_member": 2}')
    assert r.exit_code == 0, r.output
    assert load_population(pop).manifest.ensemble_defaults == {"vote": "calibrated", "samples_per_member": 2}
    shown = _run(str(pop))
    assert shown.exit_code == 0 and json.loads(shown.output) == {"vote": "calibrated", "samples_per_member": 2}
    assert _run(str(pop), "--clear").exit_code == 0
    assert load_population(pop).manifest.ensemble_defaults is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('{"vote": "no-such-rule"}', "not usable"),
        ('{"samples_per_member": 0}', "not usable"),
        ('{"vote": ', "not JSON"),
        ("[1, 2]", "non-empty JSON object"),
        ("{}", "non-empty JSON object"),
    ],
)
def test_bad_options_are_refused_and_the_manifest_is_untouched(pop: Path, value: str, says: str) -> None:
    before = (pop / "population.json").read_bytes()
    r = _run(str(pop), "--set", value)
    assert r.exit_code == 2 and says in r.output, r.output
    assert (pop / "population.json").read_bytes() == before


def test_set_and_clear_together_and_a_missing_population(pop: Path, tmp_path: Path) -> None:
    r = _run(str(pop), "--set", '{"vote": "majority"}', "--clear")
    assert r.exit_code == 2 and "not both" in r.output
    r = _run(str(tmp_path / "nowhere"), "--set", '{"vote": "majority"}')
    assert r.exit_code == 1 and "nowhere" in r.output


@pytest.mark.packaging
def test_the_command_also_runs_as_a_module(pop: Path) -> None:
    """`python -m ensemble_serve.cli defaults` (the form the test harness uses for `up`) knows the command."""
    r = subprocess.run(
        [sys.executable, "-m", "ensemble_serve.cli", "defaults", str(pop)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == {}
