"""Evidence for curriculum self-play (issue 15): does the population lift itself on harder levels?

Three arms, each from the embedded population through the CLI exactly as a user would run it, for
every seed, into runs/bench-curriculum/<arm>-s<seed>/:

* ``hidden``    configs/evolve-curriculum.yaml: answers hidden; frontier curriculum, leave-self-out
                niche peer labels, niche sharing and selection, evolution on;
* ``verifier``  configs/evolve-curriculum-verifier.yaml: the same with the answers visible;
* ``control``   configs/evolve-curriculum-control.yaml --members m07: one adapter (the best member
                on validation, BENCHMARKS section 10) on the same curriculum, self-consistency labels
                over the population's chain count, the population's gradient budget;
* ``retained``  configs/evolve-curriculum-retained.yaml: ``hidden`` plus each member's replay of its
                own warm-up slice and the forgetting guard (issue 23, trainer/evolve/retention.py);
* ``teachers``  configs/evolve-curriculum-teachers.yaml: ``retained`` with frozen teachers labelling
                their families;
* ``distill``   configs/evolve-curriculum-distill.yaml: ``hidden`` with the routed ensemble as the
                teacher (each problem labelled by the consensus of the members the population's router
                sends it to, trainer/evolve/routed.py).

``--population`` starts every run from another population instead of the embedded default; a
``{seed}`` in it is replaced by the run's seed (e.g. the branched populations that bench/recipe.py
caches, one per seed). For the retention arms the bench also reports each surviving member's change
on its own family (held-out, all levels) and the guard's rollbacks.

Measured from each run's history.jsonl: held-out accuracy per level and generation (greedy chains,
the same problems for every run) of the population vote (majority of every member), the niche vote
(majority of the members whose focus domain is the problem's), the best and the mean member; label
precision and recall per generation (against the hidden answers, recorded, never used); how the
label-free signals of each practised cell tracked its label precision (Spearman); the back-offs.
The target levels are the two above the substrate's `trained_difficulties`. Intervals are 95%
t-intervals over the seeds (the held-out problems are the same, so differences are paired by seed).

    python bench/curriculum.py [--seeds 0,1,2] [--generations 3] [--arms hidden,verifier,control]
        [--population PATH_WITH_{seed}] [--name curriculum] [--reuse] [--control PATH_WITH_{seed}]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import EMBEDDED_POPULATION, ROOT, fmt_interval, md_table, rel, seed_interval, write_json
from scipy import stats

from ensemble_serve.shared.population import load_population

OUT = ROOT / "runs" / "bench-curriculum"
ARMS = {
    "hidden": ("configs/evolve-curriculum.yaml", None),
    "verifier": ("configs/evolve-curriculum-verifier.yaml", None),
    "control": ("configs/evolve-curriculum-control.yaml", "m07"),
    "retained": ("configs/evolve-curriculum-retained.yaml", None),
    "teachers": ("configs/evolve-curriculum-teachers.yaml", None),
    "distill": ("configs/evolve-curriculum-distill.yaml", None),
}
FIGURES = ("ensemble_vote", "niche_vote", "best_member", "mean_member")


def trained_levels(population: Path) -> list[int]:
    info = json.loads((load_population(population).base_model_path / "substrate.json").read_text())
    return list(info["trained_difficulties"])


def population_of(pattern: str, seed: int) -> Path:
    return Path(pattern.replace("{seed}", str(seed))).resolve()


def finished(out: Path, generations: int, cmd: list[str]) -> float | None:
    """The wall time of an earlier run of the same command that reached `generations`, or None."""
    mark = out / ".bench-run.json"
    if not mark.is_file():
        return None
    done = json.loads(mark.read_text())
    return done["wall_s"] if done.get("cmd") == cmd[1:] and done.get("generations") == generations else None


def run_one(
    arm: str, seed: int, generations: int, population: Path, name: str, reuse: bool = False, control: Path | None = None
) -> dict:
    config, members = ARMS[arm]
    out = OUT / (f"{arm}-s{seed}" if name == "curriculum" else f"{name}-{arm}-s{seed}")
    cmd = [
        sys.executable, "-m", "trainer.cli", "evolve", "--config", config, "--seed", str(seed),
        "--population", str(population), "--out", str(out), "--generations", str(generations),
    ]  # fmt: skip
    if members:
        cmd += ["--members", members]
    if control is not None and arm != "control":
        cmd += ["--control", str(control)]
    print(
        f"[bench] {arm} seed {seed}: {' '.join(rel(Path(c)) if c.startswith('/') else c for c in cmd[1:])}", flush=True
    )
    wall = finished(out, generations, cmd) if reuse else None
    if wall is None:
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        (out / ".bench-run.json").write_text(json.dumps({"cmd": cmd[1:], "generations": generations, "wall_s": wall}))
    else:
        print(f"[bench] {arm} seed {seed}: reused the finished run in {rel(out)}", flush=True)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
    focus = {m.name: m.info.get("focus_domain") for m in load_population(population).manifest.members}
    return {
        "arm": arm,
        "seed": seed,
        "wall_s": round(wall, 1),
        "history": [slim(r) for r in history],
        "own_family": own_family(history, focus),
        "control": [(r.get("control") or {}) for r in history],
    }


def own_family(history: list[dict], focus: dict[str, str | None]) -> dict[str, float]:
    """Each starting member still present at the end: its held-out change on its own family (every
    family, "all", for a member without one), last generation minus the first."""
    first = {m["name"]: m.get("heldout") or {} for m in history[0].get("members", [])}
    last = {m["name"]: m.get("heldout") or {} for m in history[-1].get("members", [])}
    out = {}
    for name, fam in focus.items():
        key = fam or "all"
        if name in first and name in last and key in first[name] and key in last[name]:
            out[name] = round(last[name][key] - first[name][key], 4)
    return out


def slim(rec: dict) -> dict:
    """What the bench keeps of a history line."""
    h = rec.get("heldout") or {}
    cur = rec.get("curriculum") or {}
    return {
        "generation": rec["generation"],
        "skipped": rec.get("skipped"),
        "seconds": rec.get("seconds"),
        "levels": h.get("levels", {}),
        "oracle": h.get("oracle"),
        "disagreement": h.get("disagreement"),
        "labels_audit": rec.get("labels_audit"),
        "cells": cur.get("cells"),
        "signals": cur.get("signals"),
        "events": cur.get("events"),
        "train_steps": [m.get("train_steps") for m in rec.get("members", [])],
        "examples": (rec.get("train") or {}).get("examples"),
        "guard": rec.get("guard"),
        "teachers": rec.get("teachers"),
    }


def pooled(levels: dict, wanted: list[int], figure: str) -> float | None:
    """A figure over several levels, weighted by their problem counts."""
    rows = [levels[str(lv)] for lv in wanted if str(lv) in levels and figure in levels[str(lv)]]
    n = sum(r["problems"] for r in rows)
    return sum(r[figure] * r["problems"] for r in rows) / n if n else None


def pooled_levels(levels: dict, wanted: list[int]) -> float:
    """The control's accuracy over several levels (equal problems per level in the sandbox's held-out set)."""
    return statistics.fmean(levels[str(lv)] for lv in wanted if str(lv) in levels)


def signal_tracking(runs: list[dict]) -> dict:
    """Spearman correlation of each label-free signal with the label precision of the same cell and generation."""
    pairs: dict[str, list[tuple[float, float]]] = {"agreement": [], "margin": [], "length": []}
    for run in runs:
        for rec in run["history"]:
            audit = (rec.get("labels_audit") or {}).get("cells", {})
            for cell, sig in (rec.get("signals") or {}).items():
                precision = (audit.get(cell) or {}).get("precision")
                if precision is None:
                    continue
                for k in pairs:
                    pairs[k].append((sig[k], precision))
    out = {}
    for k, xy in pairs.items():
        if len(xy) >= 3:
            rho, p = stats.spearmanr([x for x, _ in xy], [y for _, y in xy])
            out[k] = {"rho": round(float(rho), 3), "p": round(float(p), 4), "cells": len(xy)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument(
        "--control",
        help="A compute-matched control adapter trained beside every population arm ({seed}: the run's seed); "
        "reported as `control` (its held-out accuracy on the target levels, its steps and examples).",
    )
    ap.add_argument("--reuse", action="store_true", help="Reuse a finished run of the same command (its wall time).")
    ap.add_argument("--arms", default="hidden,verifier,control", help="Comma-separated subset of: " + ", ".join(ARMS))
    ap.add_argument(
        "--population", default=str(EMBEDDED_POPULATION), help="Starting population ({seed}: the run's seed)."
    )
    ap.add_argument(
        "--name", default="curriculum", help="Results: bench/results/NAME.json, runs/bench-curriculum/NAME-*."
    )
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in arms:
        if a not in ARMS:
            raise SystemExit(f"unknown arm {a!r}; known: {', '.join(ARMS)}")
    trained = trained_levels(population_of(args.population, seeds[0]))
    target = [max(trained) + 1, max(trained) + 2]
    started = time.perf_counter()
    runs = [
        run_one(
            a,
            s,
            args.generations,
            population_of(args.population, s),
            args.name,
            args.reuse,
            population_of(args.control, s) if args.control else None,
        )
        for s in seeds
        for a in arms
    ]
    total = time.perf_counter() - started

    levels = sorted({int(lv) for r in runs for rec in r["history"] for lv in rec["levels"]})
    summary: dict = {"target_levels": target, "arms": {}}
    for a in arms:
        mine = [r for r in runs if r["arm"] == a]
        entry: dict = {"wall_s": [r["wall_s"] for r in mine]}
        for fig in FIGURES:
            start = [pooled(r["history"][0]["levels"], target, fig) for r in mine]
            end = [pooled(r["history"][-1]["levels"], target, fig) for r in mine]
            if None in start or None in end:
                continue
            entry[fig] = {
                "start": seed_interval(start),
                "end": seed_interval(end),
                "gain": seed_interval([e - s for s, e in zip(start, end)]),
            }
        entry["per_level"] = {
            fig: {
                str(lv): [
                    round(statistics.fmean(r["history"][g]["levels"].get(str(lv), {}).get(fig, 0.0) for r in mine), 4)
                    for g in range(len(mine[0]["history"]))
                ]
                for lv in levels
            }
            for fig in FIGURES
            if all(fig in r["history"][0]["levels"].get(str(levels[0]), {}) for r in mine)
        }
        entry["precision"] = [
            [(rec.get("labels_audit") or {}).get("precision") for rec in r["history"][1:]] for r in mine
        ]
        entry["recall"] = [[(rec.get("labels_audit") or {}).get("recall") for rec in r["history"][1:]] for r in mine]
        entry["backoffs"] = sum(
            sum("back off" in e for e in (rec.get("events") or [])) for r in mine for rec in r["history"]
        )
        entry["signal_tracking"] = signal_tracking(mine)
        changes = [d for r in mine for d in r["own_family"].values()]
        entry["own_family"] = {
            "members": len(changes),
            "mean_change": round(statistics.fmean(changes), 4) if changes else None,
            "lost_over_2_points": sum(d < -0.02 for d in changes),
            "worst": round(min(changes), 4) if changes else None,
        }
        entry["rolled_back"] = [
            [len((rec.get("guard") or {}).get("rolled_back", [])) for rec in r["history"][1:]] for r in mine
        ]
        summary["arms"][a] = entry
    for a in arms:
        mine = [r for r in runs if r["arm"] == a]
        if not all(r["control"] and "heldout" in r["control"][-1] for r in mine):
            continue
        ctl_start = [pooled_levels(r["control"][0]["heldout"]["levels"], target) for r in mine]
        ctl_end = [pooled_levels(r["control"][-1]["heldout"]["levels"], target) for r in mine]
        vote_end = [pooled(r["history"][-1]["levels"], target, "ensemble_vote") for r in mine]
        vote_start = [pooled(r["history"][0]["levels"], target, "ensemble_vote") for r in mine]
        summary["arms"][a]["control"] = {
            "start": seed_interval(ctl_start),
            "end": seed_interval(ctl_end),
            "gain": seed_interval([e - s for s, e in zip(ctl_start, ctl_end)]),
            "steps": [sum(c.get("steps", 0) for c in r["control"]) for r in mine],
            "vote_gain_minus_control_gain": seed_interval(
                [(ve - vs) - (ce - cs) for vs, ve, cs, ce in zip(vote_start, vote_end, ctl_start, ctl_end)]
            ),
            "vote_minus_control_at_the_end": seed_interval([v - c for v, c in zip(vote_end, ctl_end)]),
        }
    for a in ("retained", "teachers"):
        if "hidden" in arms and a in arms:
            h = [r for r in runs if r["arm"] == "hidden"]
            x = [r for r in runs if r["arm"] == a]
            summary[f"{a}_minus_hidden"] = {
                fig: seed_interval(
                    [
                        pooled(u["history"][-1]["levels"], target, fig)
                        - pooled(v["history"][-1]["levels"], target, fig)
                        for u, v in zip(x, h)
                    ]
                )
                for fig in ("ensemble_vote", "niche_vote", "best_member", "mean_member")
            }
    if "hidden" in arms and "control" in arms:
        h = [r for r in runs if r["arm"] == "hidden"]
        c = [r for r in runs if r["arm"] == "control"]
        summary["hidden_vote_minus_control"] = seed_interval(
            [
                pooled(x["history"][-1]["levels"], target, "ensemble_vote")
                - pooled(y["history"][-1]["levels"], target, "best_member")
                for x, y in zip(h, c)
            ]
        )
        summary["hidden_niche_vote_minus_control"] = seed_interval(
            [
                pooled(x["history"][-1]["levels"], target, "niche_vote")
                - pooled(y["history"][-1]["levels"], target, "best_member")
                for x, y in zip(h, c)
            ]
        )
    path = write_json(
        args.name,
        {
            "seeds": seeds,
            "generations": args.generations,
            "population": rel(Path(args.population)),
            "wall_s": round(total, 1),
            "summary": summary,
            "runs": runs,
        },
    )
    rows = []
    for a, e in summary["arms"].items():
        for fig in FIGURES:
            if fig in e:
                rows.append(
                    [
                        a,
                        fig,
                        f"{e[fig]['start']['mean']:.3f}",
                        f"{e[fig]['end']['mean']:.3f}",
                        fmt_interval(e[fig]["gain"]),
                    ]
                )
    print(md_table(["arm", "figure", f"levels {target} start", "end", "gain [95% CI over seeds]"], rows))
    for k in ("hidden_vote_minus_control", "hidden_niche_vote_minus_control"):
        if k in summary:
            print(f"{k}: {fmt_interval(summary[k])}")
    for a in ("retained", "teachers"):
        for fig, ci in summary.get(f"{a}_minus_hidden", {}).items():
            print(f"{a} minus hidden, {fig} at the end: {fmt_interval(ci)}")
    for a, e in summary["arms"].items():
        print(f"{a}: own family {e['own_family']}; rolled back per generation {e['rolled_back']}")
        if "control" in e:
            c = e["control"]
            print(
                f"{a}: control on levels {target} {c['start']['mean']:.3f} -> {c['end']['mean']:.3f} "
                f"(gain {fmt_interval(c['gain'])}, steps {c['steps']}); vote gain minus control gain "
                f"{fmt_interval(c['vote_gain_minus_control_gain'])}; vote minus control at the end {fmt_interval(c['vote_minus_control_at_the_end'])}"
            )
    print(f"wall time: {total / 60:.1f} min; results: {rel(path)}")


if __name__ == "__main__":
    main()
