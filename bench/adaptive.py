"""Adaptive fan-out against the fixed fan-out: accuracy, completion tokens, latency, waves.

The embedded default is served by one real `ensemble-serve up`; every request goes through the
real `openai` client. Each arm is the default request (the population's defaults: routed top-4
members x 2 samples, calibrated vote, 8 chains) with or without `ensemble.adaptive`:

* `fixed`: the full fan-out, 8 chains;
* `adaptive c=C w=W`: waves of W chains (the most trusted members first), stopped at confidence C.

and, as the reference at a similar token budget, the best member (m07 on section 10's validation)
with self-consistency over 4 and over 8 samples.

Accuracy and tokens: --seeds problem sets of --n held-out problems (levels 1-4, the six families
balanced), requests --concurrency at a time; 95% bootstrap intervals, paired against `fixed`.
Latency: a separate pass of --latency-n problems, one request at a time, the arms interleaved per
problem (waves add round trips, which only show without queueing).

    .venv/bin/python bench/adaptive.py [--seeds 2] [--n 96] [--latency-n 40]
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections import Counter, defaultdict

import numpy as np
import openai
from _common import ServerSet, add_common_args, md_table, wait_quiet, write_results
from specialists import Runner, balanced, interval, paired
from tqdm import tqdm

from trainer.tasks.sandbox import Problem

SETTINGS = {
    "adaptive c=0.95 w=4": {"confidence": 0.95, "wave_size": 4},
    "adaptive c=0.95 w=2": {"confidence": 0.95, "wave_size": 2},
    "adaptive c=0.85 w=2": {"confidence": 0.85, "wave_size": 2},
}


def record(r: dict) -> dict:
    """A `Runner.ensemble` record with the waves' report unpacked (a fixed fan-out has 8 chains, no waves)."""
    report = r["adaptive"] or {}
    return {**r, "waves": report.get("waves"), "chains": report.get("chains", 8), "stopped": report.get("stopped")}


async def run(args: argparse.Namespace) -> dict:
    tests = [balanced(args.n, args.seed + s) for s in range(args.seeds)]
    problems = [p for t in tests for p in t]
    arms = {"fixed": None, **SETTINGS}
    total = len(problems) * (len(arms) + 2) + args.latency_n * len(arms)
    rows: dict[str, list[dict]] = defaultdict(list)
    latency: dict[str, list[float]] = defaultdict(list)
    with ServerSet() as servers, tqdm(total=total, desc="adaptive", unit="req") as bar:
        server = servers.start_ensemble(gpu_memory_utilization=args.gpu_memory_utilization)
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=900)
        runner = Runner(args, bar)

        def ask(p: Problem, adaptive: dict | None):
            return runner.ensemble(client, p, None if adaptive is None else {"adaptive": adaptive})

        for name, adaptive in arms.items():
            rows[name] = [record(r) for r in await asyncio.gather(*[ask(p, adaptive) for p in problems])]
        for k in (4, 8):
            args.samples = k
            rows[f"best member ({args.best}) SC@{k}"] = list(
                await asyncio.gather(*[runner.self_consistency(client, args.best, p) for p in problems])
            )
        rng = random.Random(7)
        for p in balanced(args.latency_n, args.seed + 100):
            order = list(arms)
            rng.shuffle(order)
            for name in order:  # one at a time
                latency[name].append((await ask(p, arms[name]))["wall_s"])
        await client.close()

    out: dict = {"settings": {k: v for k, v in vars(args).items()}, "arms": {}}
    fixed = [r["correct"] for r in rows["fixed"]]
    fixed_tokens = float(np.mean([r["tokens"] for r in rows["fixed"]]))
    for name, recs in rows.items():
        acc = interval([r["correct"] for r in recs])
        tokens = float(np.mean([r["tokens"] for r in recs]))
        entry = {
            "accuracy": list(acc),
            "tokens_per_problem": tokens,
            "tokens_vs_fixed": tokens / fixed_tokens,
            "vs_fixed": paired([r["correct"] for r in recs], fixed),
        }
        if name in arms:
            entry["waves"] = dict(sorted(Counter(r["waves"] for r in recs if r["waves"] is not None).items()))
            entry["stopped"] = dict(Counter(r["stopped"] for r in recs if r["stopped"] is not None))
            entry["chains_per_problem"] = float(np.mean([r["chains"] for r in recs]))
            lat = np.asarray(latency[name])
            entry["latency_s"] = {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95))}
        out["arms"][name] = entry
    base = out["arms"]["fixed"]["latency_s"]["p50"]
    for name in arms:
        out["arms"][name]["latency_p50_vs_fixed"] = out["arms"][name]["latency_s"]["p50"] / base
    return out


def table(out: dict) -> str:
    rows = []
    for name, a in out["arms"].items():
        acc, diff = a["accuracy"], a["vs_fixed"]["difference"]
        lat = a.get("latency_s")
        rows.append(
            [
                name,
                f"{acc[0]:.3f} [{acc[1]:.3f}, {acc[2]:.3f}]",
                f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]",
                f"{a['tokens_per_problem']:.1f} ({a['tokens_vs_fixed']:.2f}x)",
                f"{a['chains_per_problem']:.2f}" if "chains_per_problem" in a else "",
                f"{lat['p50']:.2f} / {lat['p95']:.2f}" if lat else "",
                " ".join(f"{k}:{v}" for k, v in a.get("waves", {}).items()),
            ]
        )
    return md_table(
        ["arm", "accuracy", "vs fixed", "tokens/problem", "chains", "latency p50 / p95 s", "waves used"], rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--latency-n", type=int, default=40)
    parser.add_argument("--best", default="m07", help="the best member on section 10's validation")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.1)
    add_common_args(parser)
    args = parser.parse_args()
    wait_quiet(args.wait_quiet)
    out = asyncio.run(run(args))
    print(table(out))
    write_results("adaptive", out)


if __name__ == "__main__":
    main()
