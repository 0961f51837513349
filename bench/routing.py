"""Routing-only evolution (issue 23): does evolving the reliability table, members frozen, beat the labelled one?

For each population (the branched specialists bench/recipe.py caches per seed, and the embedded
sandbox ensemble), on one vLLM engine over the shared substrate:

1. every member's greedy chains on the calibration problems (`ensemble-train calibrate`'s: the
   held-out split, seed 4321, levels 1-4) give the labelled table (p = (right + 1) / (n + 2));
2. the routing channel evolves from it (trainer/calibration/routing.py: fitness on one half of the
   calibration problems, the check half decides whether `calibrate` would keep it);
3. every member's greedy chains on test problems no step above saw (the held-out split with the
   test seed 2026 + seed, levels 1-4) are voted with each table: calibrated vote of every member,
   plus the plain majority for reference.

Equal inference tokens: the same chains are voted three ways. Intervals: 95% t over seeds of the
paired difference (evolved minus labelled) on the same test problems.

With ``--gates`` (``calibrate --routing-gates``) the router's per-member offsets evolve with the table and
every vote is the routed calibrated vote of the default request's k members (the population's default
``members``, else its router's ``top_k``): labelled table with the trained router against the evolved
table with the evolved offsets, on the same chains.

    python bench/routing.py [--seeds 0,1,2] [--generations 20] [--per-domain 16] [--test 192] [--gates --name N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import EMBEDDED_POPULATION, ROOT, fmt_interval, md_table, rel, seed_interval, write_json

from ensemble_serve.shared.engine_config import EngineConfig
from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.population import load_population
from ensemble_serve.shared.voting import vote
from trainer.calibration.command import CalibrateConfig, calibration_problems, gate_choice, labelled_estimates
from trainer.calibration.routing import GateChoice, evolve_routing, vote_accuracy
from trainer.scoring import answer_is_right, greedy_candidates
from trainer.tasks.sandbox import generate_problems

BRANCHED = "runs/bench-recipe/seed{seed}-s0.5-family-m6x200"
LEVELS = (1, 2, 3, 4)


def majority_accuracy(problems, cands, chosen=None) -> float:
    right = sum(
        answer_is_right(vote([cands[m][i] for m in (cands if chosen is None else chosen[i])], "majority").answer, p)
        for i, p in enumerate(problems)
    )
    return right / len(problems)


def measure(engine: OfflineEngine, pop_dir: Path, seed: int, args: argparse.Namespace) -> dict:
    pop = load_population(pop_dir)
    engine.sync(pop)
    names = pop.names
    cal = calibration_problems(CalibrateConfig(population=pop_dir, per_domain=args.per_domain, difficulties=LEVELS))
    cands = {m: row for m, row in greedy_candidates(engine, names, cal, args.max_tokens, "auto").items()}
    per_domain, _ = labelled_estimates(cal, cands)
    start = {d: {m: e.p for m, e in row.items()} for d, row in per_domain.items()}
    test = generate_problems(args.test, 2026 + seed, split="heldout", difficulties=list(LEVELS))
    router = test_router = None
    if args.gates:  # the router's logits on both sets at once (one copy of the base for the features)
        both = gate_choice(pop, [*cal, *test])[0]
        router = GateChoice(logits=both.logits[: len(cal)], gates=both.gates, k=both.k)
        test_router = GateChoice(logits=both.logits[len(cal) :], gates=both.gates, k=both.k)
    t0 = time.perf_counter()
    result = evolve_routing(cal, cands, start, args.generations, args.size, args.sigma, seed=4321 + seed, router=router)
    search_s = time.perf_counter() - t0
    tc = {m: row for m, row in greedy_candidates(engine, names, test, args.max_tokens, "auto").items()}
    every = list(range(len(test)))
    if test_router is not None:  # the routed vote: the trained router's top-k, then the evolved offsets' top-k
        trained, moved = test_router.chosen(names), test_router.chosen(names, np.array(result.offsets))
        test_votes = {
            "majority": round(majority_accuracy(test, tc, trained), 4),
            "labelled": round(vote_accuracy(test, tc, start, every, trained), 4),
            "evolved": round(vote_accuracy(test, tc, result.p, every, moved), 4),
            "voters_changed": round(sum(a != b for a, b in zip(trained, moved, strict=True)) / len(test), 4),
            "k": test_router.k,
            "offsets": dict(zip(names, result.offsets, strict=True)),
        }
    else:
        test_votes = {
            "majority": round(majority_accuracy(test, tc), 4),
            "labelled": round(vote_accuracy(test, tc, start, every), 4),
            "evolved": round(vote_accuracy(test, tc, result.p, every), 4),
        }
    return {
        "population": rel(pop_dir),
        "seed": seed,
        "members": len(names),
        "calibration_problems": len(cal),
        "test_problems": len(test),
        "fit_accuracy": result.fit_accuracy,
        "check_accuracy": result.check_accuracy,
        "kept": result.kept,
        "best_per_generation": result.best_per_generation,
        "search_s": round(search_s, 1),
        "test": test_votes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--size", type=int, default=12)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--per-domain", type=int, default=16, help="calibration problems per domain and level")
    ap.add_argument("--test", type=int, default=192, help="test problems per seed (a multiple of 24)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--gates", action="store_true", help="evolve the router's offsets too; routed votes")
    ap.add_argument("--name", default="routing", help="results file name under bench/results/")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    started = time.perf_counter()
    engine = OfflineEngine(load_population(EMBEDDED_POPULATION), EngineConfig(gpu_memory_utilization=0.2, max_loras=12))
    runs = [{**measure(engine, (ROOT / BRANCHED.format(seed=s)).resolve(), s, args), "branched": True} for s in seeds]
    runs.append({**measure(engine, EMBEDDED_POPULATION, 0, args), "branched": False})
    total = time.perf_counter() - started
    rows = [
        [
            r["population"],
            r["seed"],
            r["test"]["majority"],
            r["test"]["labelled"],
            r["test"]["evolved"],
            f"{r['check_accuracy']['start']:.3f} -> {r['check_accuracy']['evolved']:.3f}",
            "yes" if r["kept"] else "no",
        ]
        for r in runs
    ]
    branched = [r for r in runs if r["branched"]]
    diff = [r["test"]["evolved"] - r["test"]["labelled"] for r in branched]
    summary = {"evolved_minus_labelled_branched": diff}
    path = write_json(args.name, {"args": vars(args), "wall_s": round(total, 1), "summary": summary, "runs": runs})
    print(
        md_table(
            [
                "population",
                "seed",
                "test majority",
                "test calibrated (labelled)",
                "test calibrated (evolved)",
                "check half",
                "kept",
            ],
            rows,
        )
    )
    print(f"branched, evolved minus labelled on test: {fmt_interval(seed_interval(diff))}")
    print(f"wall time: {total / 60:.1f} min; results: {rel(path)}")


if __name__ == "__main__":
    main()
