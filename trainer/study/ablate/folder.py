"""The ablation folder: where each (cell, seed) result lives, and the guard that keeps one config per folder.

Layout under ``cfg.out``::

    ablate-run.json                      the config and its hash (written once, checked on every run)
    cells/<cell>/seed-<s>.json           a finished cell (written atomically: present means complete)
    cells/<cell>/seed-<s>.failed.json    a cell that raised, with its error (removed once it succeeds)
    stages/<stage>/seed-<s>/             the evolve runs (see :mod:`trainer.study.ablate.stages`)
    starts/random-seed-<s>/              the re-initialised starting populations
    ablation.json, ablation.md, *.png    the report
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ensemble_serve.shared.fsutil import atomic_write_text
from trainer.study.ablate.config import AblateConfig
from trainer.study.ablate.design import AblationError, Cell, config_hash

__all__ = [
    "REPORT_JSON",
    "REPORT_MD",
    "RUN_FILE",
    "check_run_file",
    "failed_path",
    "prepare_out",
    "read_results",
    "result_path",
]

RUN_FILE = "ablate-run.json"
REPORT_JSON = "ablation.json"
REPORT_MD = "ablation.md"


def result_path(out: Path, cell: Cell, seed: int) -> Path:
    return out / "cells" / cell.id / f"seed-{seed}.json"


def failed_path(out: Path, cell: Cell, seed: int) -> Path:
    return out / "cells" / cell.id / f"seed-{seed}.failed.json"


def prepare_out(cfg: AblateConfig) -> None:
    """Create the folder with its run file, or check that it holds an ablation of this same config."""
    out = cfg.out
    run_file = out / RUN_FILE
    digest = config_hash(cfg)
    if run_file.exists():
        try:
            have = json.loads(run_file.read_text())
        except (OSError, ValueError) as e:
            raise AblationError(f"{run_file}: unreadable ({e}); use a new --out") from None
        if have.get("config_hash") != digest:
            raise AblationError(
                f"{out} holds an ablation of another config (hash {have.get('config_hash')}, this one {digest}); "
                "use a new --out, or the config it was started with (only seeds, interactions, threads and "
                "gpu_memory_utilization may change)"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise AblationError(f"{out} exists and is not an ablation folder; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_file, json.dumps({"config_hash": digest, "config": cfg.model_dump(mode="json")}, indent=2))


def check_run_file(cfg: AblateConfig) -> None:
    """Refuse to report a folder whose run file names another config (a folder without one is reported as is)."""
    run_file = cfg.out / RUN_FILE
    if not run_file.exists():
        return
    try:
        have = json.loads(run_file.read_text()).get("config_hash")
    except (OSError, ValueError) as e:
        raise AblationError(f"{run_file}: unreadable ({e})") from None
    if have != config_hash(cfg):
        raise AblationError(
            f"{cfg.out} holds an ablation of another config (hash {have}, this one {config_hash(cfg)}); "
            "report it with the config it was run with"
        )


def read_results(cfg: AblateConfig, cells: Sequence[Cell]) -> list[tuple[Cell, int, dict[str, Any]]]:
    """The finished (cell, seed, result) of the design, in plan order."""
    found = []
    for cell in cells:
        for seed in cfg.seeds:
            path = result_path(cfg.out, cell, seed)
            if path.exists():
                found.append((cell, seed, json.loads(path.read_text())))
    return found
