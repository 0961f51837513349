"""`ensemble-train ablate`'s loop: every (cell, seed) without a result, each recorded as it finishes, then the report.

Resumable and interruptible: a finished cell is one JSON file written atomically, so a later run
of the same config (same folder) skips it; a cell that raises is recorded with its error in
``<cell>/seed-<s>.failed.json`` and the next one runs; Ctrl-C stops after writing the report of
what is finished, then re-raises. The runner is closed whatever happens.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from tqdm import tqdm

from ensemble_serve.shared.fsutil import atomic_write_text
from trainer.study.ablate.cells import CellRunner
from trainer.study.ablate.config import AblateConfig
from trainer.study.ablate.design import Cell, plan
from trainer.study.ablate.folder import failed_path, prepare_out, read_results, result_path
from trainer.study.ablate.summary import report

__all__ = ["Runner", "run_ablation"]


class Runner(Protocol):
    """What runs one cell: ``run(cell, seed)`` returns the cell's result (see :class:`CellRunner`)."""

    def run(self, cell: Cell, seed: int, note: Callable[[str], None]) -> dict[str, Any]: ...

    def close(self) -> None: ...


def run_ablation(cfg: AblateConfig, runner: Runner | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every (cell, seed) that has no result yet, then write and return the report.

    A cell that raises is recorded in ``<cell>/seed-<s>.failed.json`` and the next one runs;
    Ctrl-C (``KeyboardInterrupt``) stops after writing the report of what is finished, then
    re-raises. A later run of the same config retries failed and unfinished cells only.
    """
    prepare_out(cfg)
    cells = plan(cfg)
    todo = [(c, s) for s in cfg.seeds for c in cells if not result_path(cfg.out, c, s).exists()]
    runner = runner if runner is not None else CellRunner(cfg, progress=False)
    bar = tqdm(total=len(todo), desc="ablation cells", unit="cell", disable=not progress)
    try:
        for cell, seed in todo:
            bar.set_description(f"{cell.id} seed {seed}")
            _run_cell(cfg, runner, cell, seed, lambda what: bar.set_postfix_str(what))
            bar.update(1)
    finally:
        bar.close()
        runner.close()
        summary = report(cfg) if any(read_results(cfg, cells)) else None
    return summary if summary is not None else {}


def _run_cell(cfg: AblateConfig, runner: Runner, cell: Cell, seed: int, note: Callable[[str], None]) -> None:
    """Run one (cell, seed) and write its result, or its failure record when it raises (not on Ctrl-C)."""
    failed = failed_path(cfg.out, cell, seed)
    started = time.perf_counter()
    try:
        result = runner.run(cell, seed, note)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 (a crashed cell is recorded; the rest go on)
        record = {
            "cell": cell.id,
            "seed": seed,
            "levels": cell.levels,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(limit=8),
            "seconds": round(time.perf_counter() - started, 2),
        }
        failed.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(failed, json.dumps(record, indent=2))
        tqdm.write(f"cell {cell.id} seed {seed} FAILED: {record['error']}")
        return
    result = {"cell": cell.id, "seed": seed, "levels": cell.levels, **result}
    result["seconds"] = {**result.get("seconds", {}), "total": round(time.perf_counter() - started, 2)}
    path = result_path(cfg.out, cell, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2))
    failed.unlink(missing_ok=True)
