"""Early stop: ensemble requests with `early_stop: true` vs `false` on held-out sandbox problems.

One real `ensemble-serve up` server (the embedded default, 8 members), the real `openai` client. For
each `samples_per_member` value and each problem, the same request (same prompt, temperature 0.7,
`seed` = seed + problem index, majority vote) is sent twice, once with `early_stop` off and once on,
in alternating order, one request at a time (so latency is the request's own). With the same seed the
chains are the same up to the point where the early-stopped request aborts the rest (up to float
rounding from different batch compositions). A pair goes without a seed when its 8 x samples_per_member
seeded prefills could exceed vLLM's 2048-token step budget: a seeded request whose prefill is chunked
kills vLLM's CPU engine (see `_common.py` and BENCHMARKS.md); the table says how many pairs were seeded.

Reported per samples_per_member: total completion tokens (`usage`), tokens saved measured as the
difference in usage (off - on) and as the sum of the server's own estimate `ensemble.tokens_saved`,
the share of requests that stopped early, accuracy (`trainer.tasks.sandbox.verify` on the returned chain) for
both, how often the answers differ, and latency (median and paired on/off ratio).

    .venv/bin/python bench/early_stop.py [--n 96] [--samples-per-member 2 3 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import openai
from _common import (
    ENSEMBLE_NAME,
    RESULTS,
    ForeignLoad,
    PromptLength,
    ServerSet,
    add_common_args,
    chat,
    fmt_spread,
    md_table,
    others_running,
    seed_is_safe,
    spread,
    wait_quiet,
    write_results,
)
from tqdm import tqdm

from trainer.tasks.sandbox import Problem, generate_problems, verify


async def ask(
    client: openai.AsyncOpenAI,
    p: Problem,
    spm: int,
    early: bool,
    seed: int | None,
    args: argparse.Namespace,
    load: ForeignLoad | None = None,
) -> dict:
    if load is not None:
        load.mark()
    t0 = time.perf_counter()
    r = await client.chat.completions.create(
        model=ENSEMBLE_NAME,
        messages=chat(p.prompt),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        **({} if seed is None else {"seed": seed}),
        extra_body={
            "ensemble": {"samples_per_member": spm, "early_stop": early, "vote": args.vote, "return_chains": True}
        },
    )
    wall = time.perf_counter() - t0
    text = r.choices[0].message.content or ""
    ens = r.model_extra.get("ensemble") or {}
    chains = ens.get("chains") or []
    return {
        "wall_s": wall,
        "tokens": r.usage.completion_tokens,
        "tokens_saved": ens.get("tokens_saved") or 0,
        "early_stopped": bool(ens.get("early_stopped")),
        "failed": len(ens.get("failed") or []),
        "answer": ens.get("answer"),
        "agreement": ens.get("agreement"),
        "correct": verify(p, text).correct,
        "foreign_cpu_s": load.foreign_s() if load is not None else None,
        "chain_tokens": [c.get("tokens") for c in chains],
        "chain_status": [c.get("status") for c in chains],
    }


async def bench(args: argparse.Namespace) -> dict:
    problems = generate_problems(args.n, args.seed, split="heldout")
    lengths = [PromptLength()(p.prompt) for p in problems]
    out: dict = {"problems": len(problems), "spm": {}}
    with ServerSet() as servers:
        server = servers.start_ensemble(gpu_memory_utilization=args.gpu_memory_utilization)
        print(f"ensemble-serve up in {server.started_s:.0f}s", file=sys.stderr)
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)
        for w in range(args.warmup):  # untimed: loads every adapter, warms the engine
            for early in (False, True):
                await ask(client, problems[w % len(problems)], min(args.samples_per_member), early, None, args)
        load = ForeignLoad([server])
        out["other_benchmark_processes_at_start"] = others_running([server])
        total = len(args.samples_per_member) * len(problems) * 2
        with tqdm(total=total, desc="early_stop", unit="req") as bar:
            for spm in args.samples_per_member:
                recs: list[dict] = []
                for i, p in enumerate(problems):
                    order = (False, True) if i % 2 == 0 else (True, False)
                    # same seed for on and off, unless a seeded request could crash vLLM's CPU engine
                    seed = args.sample_seed + i if seed_is_safe(lengths[i], 8 * spm) else None
                    pair = {"seeded": seed is not None, "prompt_tokens": lengths[i]}
                    for early in order:
                        pair["on" if early else "off"] = await ask(client, p, spm, early, seed, args, load)
                        bar.set_postfix(spm=spm)
                        bar.update()
                    recs.append({"prompt": p.prompt, "domain": p.domain, **pair})
                out["spm"][str(spm)] = recs
        await client.close()
    return out


def summarize(out: dict) -> tuple[str, dict]:
    rows, summary = [], {}
    for spm, recs in out["spm"].items():
        off = [r["off"] for r in recs]
        on = [r["on"] for r in recs]
        tok_off, tok_on = sum(r["tokens"] for r in off), sum(r["tokens"] for r in on)
        s = {
            "requests": len(recs),
            "seeded_pairs": sum(r["seeded"] for r in recs),
            "tokens_off": tok_off,
            "tokens_on": tok_on,
            "saved_measured": tok_off - tok_on,
            "saved_measured_pct": 100 * (tok_off - tok_on) / tok_off,
            "saved_reported": sum(r["tokens_saved"] for r in on),
            "early_stopped_share": sum(r["early_stopped"] for r in on) / len(on),
            "stopped_chains_per_request": statistics.mean(r["failed"] for r in on),
            "acc_off": sum(r["correct"] for r in off) / len(off),
            "acc_on": sum(r["correct"] for r in on) / len(on),
            "answers_differ": sum(a["answer"] != b["answer"] for a, b in zip(off, on)),
            "correct_differs": sum(a["correct"] != b["correct"] for a, b in zip(off, on)),
            "latency_off_s": spread([r["wall_s"] for r in off]),
            "latency_on_s": spread([r["wall_s"] for r in on]),
            "latency_ratio_on_off": spread([b["wall_s"] / a["wall_s"] for a, b in zip(off, on)]),
            "foreign_cpu_s_per_request": spread([r["foreign_cpu_s"] for r in off + on]),
            "zero_token_chains_off": sum(t == 0 for r in off for t in r["chain_tokens"]),
            # what any early stop could save at most: tokens generated after the first chain of a request finished
            "headroom_tokens_off": sum(t - min(r["chain_tokens"]) for r in off for t in r["chain_tokens"]),
            "all_chains_same_length_share": sum(len(set(r["chain_tokens"])) == 1 for r in off) / len(off),
        }
        summary[spm] = s
        rows.append(
            [
                spm,
                f"{len(recs)} ({s['seeded_pairs']} seeded)",
                tok_off,
                tok_on,
                f"{100 * s['all_chains_same_length_share']:.0f}%",
                f"{s['headroom_tokens_off']} ({100 * s['headroom_tokens_off'] / tok_off:.1f}%)",
                f"{s['saved_measured']} ({s['saved_measured_pct']:.1f}%)",
                s["saved_reported"],
                f"{100 * s['early_stopped_share']:.0f}%",
                f"{s['stopped_chains_per_request']:.1f}",
                f"{s['acc_off']:.3f} -> {s['acc_on']:.3f}",
                f"{s['answers_differ']} / {s['correct_differs']}",
                f"{s['latency_off_s']['median']:.3f} -> {s['latency_on_s']['median']:.3f}",
                fmt_spread(s["latency_ratio_on_off"]),
                f"{s['foreign_cpu_s_per_request']['median']:.2f} / {s['foreign_cpu_s_per_request']['max']:.2f}",
            ]
        )
    headers = [
        "samples/member",
        "problems",
        "tokens off",
        "tokens on",
        "requests whose chains all have one length",
        "headroom: tokens after the first chain finished (off)",
        "saved (usage off-on)",
        "saved (sum of tokens_saved)",
        "stopped early",
        "stopped chains/request",
        "accuracy off -> on",
        "answers differ / verdicts differ",
        "latency s median off -> on",
        "latency on/off: median [min, max]",
        "other processes' CPU s/request: median / max",
    ]
    return md_table(headers, rows), summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=96, help="problems (multiple of 24 for balance)")
    p.add_argument("--seed", type=int, default=31, help="seed of the problems")
    p.add_argument("--sample-seed", type=int, default=5000, help="request seed of problem 0")
    p.add_argument("--samples-per-member", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--vote", default="majority", choices=["majority", "weighted"])
    p.add_argument("--warmup", type=int, default=2, help="untimed request pairs first")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.1)
    p.add_argument(
        "--summarize-only", action="store_true", help="recompute the table from bench/results/early_stop.json"
    )
    add_common_args(p)
    args = p.parse_args()
    if args.summarize_only:
        path = RESULTS / "early_stop.json"
        saved = json.loads(path.read_text())
        md, saved["summary"] = summarize(saved)
        saved["markdown"] = md
        path.write_text(json.dumps(saved, indent=2) + "\n")
        print(md)
        return
    waited = wait_quiet(args.wait_quiet)
    out = asyncio.run(bench(args))
    md, summary = summarize(out)
    print(md)
    write_results(
        "early_stop", {"args": vars(args), "waited_for_quiet_s": waited, "summary": summary, **out, "markdown": md}
    )


if __name__ == "__main__":
    main()
