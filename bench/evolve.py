"""Evidence for `ensemble-train evolve`: evolution vs a compute-matched single agent, with and without labels.

Runs four evolve runs from the embedded starting population (8 members), each through the CLI
exactly as a user would, into runs/bench-evolve/:

* ``evolve``          configs/evolve.yaml: 8 members, correctness fitness (labels visible);
* ``evolve-hidden``   configs/evolve-hidden.yaml: the same with answers hidden (consensus fitness);
* ``control``         configs/evolve-control.yaml: one adapter (the best starting member), 8 samples per
                      problem and 8x the gradient steps: the same problems, labelling rule and gradient
                      budget, no population and no evolution;
* ``control-hidden``  the control with answers hidden (majority of its own samples as pseudo-labels).

Then it reads every run's history.jsonl and reports held-out accuracy per generation: best member,
mean member and majority-vote ensemble (for the control: its one adapter), plus wall time, into
bench/results/evolve.json and a markdown table. Plots: `ensemble-train report runs/bench-evolve/<run>`.

    python bench/evolve.py [--generations 6] [--runs evolve,control,...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import EMBEDDED_POPULATION, ROOT, md_table, rel, write_json

OUT = ROOT / "runs" / "bench-evolve"
RUNS = {
    "evolve": ("configs/evolve.yaml", None),
    "evolve-hidden": ("configs/evolve-hidden.yaml", None),
    "control": ("configs/evolve-control.yaml", "best"),
    "control-hidden": ("configs/evolve-control-hidden.yaml", "best"),
}


def best_member(population: Path) -> str:
    manifest = json.loads((population / "population.json").read_text())
    return max(manifest["members"], key=lambda m: (m.get("fitness") or 0.0, m["name"]))["name"]


def run_one(name: str, generations: int) -> dict:
    config, members = RUNS[name]
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "trainer.cli", "evolve", "--config", config,
        "--population", str(EMBEDDED_POPULATION), "--out", str(out), "--generations", str(generations),
    ]  # fmt: skip
    if members == "best":
        cmd += ["--members", best_member(EMBEDDED_POPULATION)]
    print(f"[bench] {name}: {' '.join(rel(Path(c)) if c.startswith('/') else c for c in cmd[1:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - started
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
    rows = []
    for rec in history:
        h = rec.get("heldout") or {}
        rows.append(
            {
                "generation": rec["generation"],
                "best_member": h.get("best_member"),
                "mean_member": h.get("mean_member"),
                "ensemble_vote": h.get("ensemble_vote"),
                "oracle": h.get("oracle"),
                "fitness_best": (rec.get("fitness") or {}).get("best"),
                "fitness_mean": (rec.get("fitness") or {}).get("mean"),
                "diversity": rec.get("diversity"),
                "verified": (rec.get("train") or {}).get("verified"),
                "seconds": rec.get("seconds"),
            }
        )
    return {"config": config, "members": members, "wall_s": round(wall, 1), "generations": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generations", type=int, default=6)
    ap.add_argument("--runs", default=",".join(RUNS), help="Comma-separated subset of: " + ", ".join(RUNS))
    args = ap.parse_args()
    results = {}
    for name in [r.strip() for r in args.runs.split(",") if r.strip()]:
        if name not in RUNS:
            raise SystemExit(f"unknown run {name!r}; known: {', '.join(RUNS)}")
        results[name] = run_one(name, args.generations)
    path = write_json("evolve", {"generations": args.generations, "runs": results})
    headers = ["run", "gen", "best member", "mean member", "ensemble vote", "oracle", "verified chains"]
    rows = []
    for name, res in results.items():
        for r in res["generations"]:
            rows.append(
                [
                    name,
                    r["generation"],
                    r["best_member"],
                    r["mean_member"],
                    r["ensemble_vote"],
                    r["oracle"],
                    r["verified"],
                ]
            )
    print(md_table(headers, rows))
    print("wall time: " + ", ".join(f"{n} {r['wall_s']:.0f}s" for n, r in results.items()))
    print(f"results: {rel(path)}")


if __name__ == "__main__":
    main()
