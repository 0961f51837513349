"""Scoring cost of evolve: evaluating 8 members in one multi-LoRA batch vs evaluating 1 member.

One vLLM engine (the engine layer evolve and the server use) over the embedded population. Each
round, interleaved so that machine noise hits all arms alike, times greedy chains on the same
held-out problems for:

* ``one``: one member;
* ``batch``: all 8 members in one `generate` call (one multi-LoRA batch);
* ``sequential``: the 8 members one call after another (what scoring without multi-LoRA costs).

Reported, for each problem count: median wall time per arm, the ratios batch/one (target <= 1.5)
and sequential/one (about 8), and tokens generated per arm. The problem counts show the two
regimes: while one member's batch leaves the hardware idle, the other seven ride along almost
free; once one member's batch fills it (on 2 CPU cores, a few dozen sequences of this model),
8 members cost about 8x whether batched or not.

    python bench/scoring_cost.py [--problems 1,8,64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import EMBEDDED_POPULATION, md_table, rel, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default="1,8,64", help="Comma-separated problem counts.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()

    from vllm import SamplingParams

    from ensemble_serve.shared.engine_config import EngineConfig
    from ensemble_serve.shared.offline_engine import OfflineEngine
    from ensemble_serve.shared.population import load_population
    from trainer.tasks.sandbox import generate_problems

    sizes = [int(x) for x in args.problems.split(",") if x.strip()]
    pop = load_population(EMBEDDED_POPULATION)
    names = pop.names
    engine = OfflineEngine(pop, EngineConfig(max_num_seqs=len(names) * max(sizes), gpu_memory_utilization=0.2))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    all_problems = generate_problems(max(sizes), seed=4321, split="heldout")

    def timed(members: list[str], prompts: list[str]) -> tuple[float, int]:
        started = time.perf_counter()
        out = engine.generate([p for _ in members for p in prompts], [m for m in members for _ in prompts], params)
        return time.perf_counter() - started, sum(g[0].tokens for g in out)

    results = {}
    rows = []
    for size in sizes:
        prompts = [engine.chat_prompt(p.prompt) for p in all_problems[:size]]
        timed(names, prompts)  # warm-up: every adapter loaded once
        arms: dict[str, list[float]] = {"one": [], "batch": [], "sequential": []}
        tokens: dict[str, int] = {}
        for r in range(args.rounds):
            for arm in ("one", "batch", "sequential") if r % 2 == 0 else ("sequential", "batch", "one"):
                if arm == "one":
                    s, t = timed([names[0]], prompts)
                elif arm == "batch":
                    s, t = timed(names, prompts)
                else:
                    parts = [timed([m], prompts) for m in names]
                    s, t = sum(p[0] for p in parts), sum(p[1] for p in parts)
                arms[arm].append(round(s, 4))
                tokens[arm] = t
                print(f"{size} problems, round {r}: {arm:<10} {s:6.2f}s  {t} tokens", flush=True)
        med = {arm: statistics.median(v) for arm, v in arms.items()}
        results[str(size)] = {
            "seconds": arms,
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "tokens": tokens,
            "ratio_batch_over_one": round(med["batch"] / med["one"], 3),
            "ratio_sequential_over_one": round(med["sequential"] / med["one"], 3),
        }
        rows.append(
            [size, f"{med['one']:.2f}", f"{med['batch']:.2f}", f"{med['sequential']:.2f}",
             f"{med['batch'] / med['one']:.2f}", f"{med['sequential'] / med['one']:.2f}"]
        )  # fmt: skip
    path = write_json("scoring_cost", {"members": len(names), "rounds": args.rounds, "problems": results})
    print(
        md_table(
            ["problems", "1 member s", "8 in one batch s", "8 one by one s", "batch / one", "sequential / one"], rows
        )
    )
    print(f"results: {rel(path)}")


if __name__ == "__main__":
    main()
