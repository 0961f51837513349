"""The factorial ablation on the sandbox: router, evaluation scope, lifecycle, and the regime-boundary probe.

Runs ``ensemble-train ablate`` (the same code, in this process) on two configs, one after the other:

* ``configs/ablate.yaml``: full 2^3 over router variant x evaluation scope x lifecycle (evolution on,
  pre-aligned adapters), 3 seeds per cell;
* ``configs/ablate-regime.yaml``: full 2^2 over evolution x initial adapters (pre-aligned vs PEFT's
  random initialisation), 3 seeds per cell, with the evolution x init interaction;
* ``configs/ablate-router-mixture.yaml``: the router variants trained end to end through the
  mixture (the study's way of training its router), 3 seeds.

Results: ``bench/results/ablation.json`` (effects, interactions, cell tables, timings, machine) and
the two reports' plots as ``bench/results/ablation-*.png``. The ablation folders (evolved
populations, per-cell JSON) go under ``--out-root``; a rerun with the same folders resumes and
recomputes nothing that finished.

    python bench/ablate.py [--out-root runs/bench-ablate] [--seeds 0,1,2]

The probes on a branched population (issue 23; the populations come from bench/recipe.py):

    python bench/ablate.py --name ablation-branched \
        --configs configs/ablate-branched-regime.yaml,configs/ablate-branched-inheritance.yaml
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from _common import RESULTS, ROOT, rel, write_json

CONFIGS = ("configs/ablate.yaml", "configs/ablate-regime.yaml", "configs/ablate-router-mixture.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-root", type=Path, default=ROOT / "runs" / "bench-ablate", help="Folder of the ablations."
    )
    parser.add_argument("--seeds", default=None, help="Comma-separated seeds (default: the configs' own, 0,1,2).")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="Comma-separated ablation configs to run.")
    parser.add_argument(
        "--name", default="ablation", help="Results file bench/results/NAME.json (e.g. ablation-branched)."
    )
    args = parser.parse_args()

    from ensemble_serve.shared.cliutil import load_config
    from trainer.study.ablate import format_report, run_ablation
    from trainer.study.ablate.config import AblateConfig

    runs = {}
    started = time.perf_counter()
    for path in [c.strip() for c in args.configs.split(",") if c.strip()]:
        name = Path(path).stem
        overrides = {"out": args.out_root / name}
        if args.seeds:
            overrides["seeds"] = tuple(int(s) for s in args.seeds.split(","))
        cfg = load_config(AblateConfig, ROOT / path, overrides)
        t = time.perf_counter()
        summary = run_ablation(cfg, progress=True)
        seconds = round(time.perf_counter() - t, 1)
        print(format_report(summary))
        print(f"{name}: {seconds} s")
        for plot in ("effects", "domains"):
            src = cfg.out / f"{plot}.png"
            if src.exists():
                shutil.copyfile(src, RESULTS / f"{name}-{plot}.png")
        # compute time of the cells, whether they ran now or in an earlier (resumed) invocation
        cell_seconds = round(sum(row["seconds"]["mean"] * len(row["seeds"]) for row in summary["cells"]), 1)
        runs[name] = {
            "config": path,
            "out": rel(cfg.out),
            "seconds": seconds,
            "cell_seconds": cell_seconds,
            "summary": summary,
        }
    total = round(time.perf_counter() - started, 1)
    print(f"total: {total} s")
    write_json(args.name, {"seconds": total, "runs": runs})


if __name__ == "__main__":
    main()
