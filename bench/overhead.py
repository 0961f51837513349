"""Server overhead: ensemble-serve's ensemble request vs doing the same by hand against vLLM's own server.

Two servers run at the same time on this machine, each with a small KV cache
(`--gpu-memory-utilization 0.1` of NUMA node 0): `ensemble-serve up` (the embedded default, model
`sandbox-ensemble`) and vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`) with
the same base model, the same eight LoRA adapters, the same engine settings (float32, eager, max-loras 8,
max-lora-rank 16, max-num-seqs 64, seed 0). Only one request (or request group) is in flight at a time,
and each starts after --gap (1.5 s) idle: after its last engine step a vLLM worker process busy-loops on
its shared-memory queue for 1 s (`busy_loop_s` in vllm/distributed/device_communicators/shm_broadcast.py),
which on 2 cores takes a core from the other server. The idle server's CPU use while the other works is
recorded to show that it does not interfere.

Per round, interleaved in shuffled order (fixed seed):
* `ensemble-serve: ensemble 8x1` - ONE request to the ensemble (8 members x 1 chain, majority vote);
* `vLLM: 8 x n=1 +logprobs, client vote` - the same work by hand: 8 concurrent requests (one per
  member, n=1) to vLLM's server with `logprobs` (the ensemble asks vLLM for the sampled tokens' logprobs
  too: the chain's mean logprob breaks ties for the winner), then answer extraction and majority voting
  in the client with `ensemble_serve.shared.voting.answers` + `ensemble_serve.shared.voting` (the same code the server runs);
* diagnostics: `vLLM: 8 x n=1, client vote` (no logprobs: less work than the ensemble does) and
  `ensemble-serve: 8 x n=1 +logprobs, client vote` (the same hand-made fan-out against our server's member
  models).

Same prompt, fixed output length (`ignore_eos`, same `max_tokens`), temperature 1.0. The ratio is
paired per round (variant wall / baseline wall in the same round); the table shows median [min, max].

    .venv/bin/python bench/overhead.py [--max-tokens 64 128] [--repeats 15]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

import openai
from _common import (
    ENSEMBLE_NAME,
    ForeignLoad,
    ServerSet,
    add_common_args,
    chat,
    fmt_spread,
    interleaved,
    md_table,
    member_names,
    others_running,
    paired_ratios,
    spread,
    timed_rows,
    wait_quiet,
    write_results,
)
from tqdm import tqdm

from ensemble_serve.shared.voting import candidate_from_text, vote

TARGET = "ensemble-serve: ensemble 8x1"
BASELINE = "vLLM: 8 x n=1 +logprobs, client vote"
DIAG = ["vLLM: 8 x n=1, client vote", "ensemble-serve: 8 x n=1 +logprobs, client vote"]


def client_vote(responses: list, members: list[str]) -> tuple[str | None, str]:
    """Extract every chain's answer and vote by majority, exactly as the server does for the ensemble."""
    candidates = []
    for m, r in zip(members, responses):
        choice = r.choices[0]
        tokens = r.usage.completion_tokens
        mean_lp = None
        if choice.logprobs is not None and choice.logprobs.content:
            lps = [t.logprob for t in choice.logprobs.content]
            mean_lp = sum(lps) / len(lps)
        candidates.append(candidate_from_text(m, 0, choice.message.content or "", tokens, "auto", mean_lp))
    result = vote(candidates, "majority")
    winner = candidates[result.winner].text if result.winner is not None else candidates[0].text
    return result.answer, winner


async def run_variant(
    variant: str,
    clients: dict[str, openai.AsyncOpenAI],
    members: list[str],
    prompt: str,
    max_tokens: int,
    temperature: float,
) -> dict:
    common = dict(
        messages=chat(prompt), max_tokens=max_tokens, temperature=temperature, extra_body={"ignore_eos": True}
    )
    vote_s = 0.0
    t0 = time.perf_counter()
    if variant == TARGET:
        r = await clients["ours"].chat.completions.create(model=ENSEMBLE_NAME, **common)
        tokens = r.usage.completion_tokens
    else:
        client = clients["vllm"] if variant.startswith("vLLM") else clients["ours"]
        extra = dict(logprobs=True, top_logprobs=0) if "+logprobs" in variant else {}
        rs = await asyncio.gather(*(client.chat.completions.create(model=m, **extra, **common) for m in members))
        v0 = time.perf_counter()
        client_vote(list(rs), members)
        vote_s = time.perf_counter() - v0
        tokens = sum(r.usage.completion_tokens for r in rs)
    return {"wall_s": time.perf_counter() - t0, "client_vote_s": vote_s, "completion_tokens": tokens}


async def bench(args: argparse.Namespace) -> dict:
    names = [TARGET, BASELINE] + (DIAG if args.diagnostics else [])
    members = member_names()[:8]
    rng = random.Random(args.seed)
    out: dict = {"max_tokens": {}, "startup_s": {}}
    with ServerSet() as servers:
        ours = servers.start_ensemble(gpu_memory_utilization=args.gpu_memory_utilization)
        vllm_server = servers.start_vllm(gpu_memory_utilization=args.gpu_memory_utilization)
        out["startup_s"] = {"ensemble-serve": ours.started_s, "vllm": vllm_server.started_s}
        print(
            f"ensemble-serve up in {ours.started_s:.0f}s, vLLM server in {vllm_server.started_s:.0f}s", file=sys.stderr
        )
        idle = {}
        for s in (ours, vllm_server):  # CPU of each server when nobody asks anything
            c0 = s.cpu_seconds()
            time.sleep(5)
            idle[s.name] = (s.cpu_seconds() - c0) / 5
        out["idle_cpu_s_per_s"] = idle
        load = ForeignLoad([ours, vllm_server])
        out["other_benchmark_processes_at_start"] = others_running([ours, vllm_server])
        clients = {
            "ours": openai.AsyncOpenAI(base_url=ours.base_url, api_key="none", max_retries=0, timeout=600),
            "vllm": openai.AsyncOpenAI(base_url=vllm_server.base_url, api_key="none", max_retries=0, timeout=600),
        }
        total = len(args.max_tokens) * (args.warmup + args.repeats) * len(names)
        with tqdm(total=total, desc="overhead", unit="req") as bar:
            for mt in args.max_tokens:
                rows: dict[str, list[dict]] = {v: [] for v in names}
                for rnd, v in interleaved(names, args.warmup + args.repeats, rng):
                    await asyncio.sleep(args.gap)  # let the last server's worker leave its busy loop
                    c_ours, c_vllm = ours.cpu_seconds(), vllm_server.cpu_seconds()
                    load.mark()
                    rec = await run_variant(v, clients, members, args.prompt, mt, args.temperature)
                    rec["foreign_cpu_s"] = load.foreign_s()
                    rec["cpu_s"] = {
                        "ensemble-serve": ours.cpu_seconds() - c_ours,
                        "vllm": vllm_server.cpu_seconds() - c_vllm,
                    }
                    rec["round"], rec["warmup"] = rnd, rnd < args.warmup
                    rows[v].append(rec)
                    bar.set_postfix(max_tokens=mt, variant=v[:20])
                    bar.update()
                out["max_tokens"][str(mt)] = rows
        for c in clients.values():
            await c.close()
    return out


def summarize(results: dict, names: list[str]) -> tuple[str, dict]:
    summary: dict = {}
    rows_md = []
    for mt, rows in results["max_tokens"].items():
        timed = timed_rows(rows, names)
        summary[mt] = {}
        for v in names:
            walls = [r["wall_s"] for r in timed[v]]
            ratios = paired_ratios(timed[v], timed[BASELINE])
            busy = "ensemble-serve" if v.startswith("ensemble-serve") else "vllm"
            other = "vllm" if busy == "ensemble-serve" else "ensemble-serve"
            s = {
                "wall_s": spread(walls),
                "ratio_to_baseline": spread(ratios),
                "ensemble_over_this": spread([t["wall_s"] / r["wall_s"] for t, r in zip(timed[TARGET], timed[v])]),
                "client_vote_ms": spread([1000 * r["client_vote_s"] for r in timed[v]]),
                "busy_server_cpu_s": spread([r["cpu_s"][busy] for r in timed[v]]),
                "idle_server_cpu_s": spread([r["cpu_s"][other] for r in timed[v]]),
                "foreign_cpu_s": spread([r["foreign_cpu_s"] for r in timed[v]]),
                "completion_tokens": sorted({r["completion_tokens"] for r in timed[v]}),
            }
            summary[mt][v] = s
            rows_md.append(
                [
                    mt,
                    v,
                    fmt_spread(s["wall_s"]),
                    "1 (baseline)" if v == BASELINE else fmt_spread(s["ratio_to_baseline"]),
                    "" if v == TARGET else fmt_spread(s["ensemble_over_this"]),
                    f"{s['client_vote_ms']['median']:.2f}",
                    f"{s['busy_server_cpu_s']['median']:.2f}",
                    f"{s['idle_server_cpu_s']['median']:.2f}",
                    f"{s['foreign_cpu_s']['median']:.2f} / {s['foreign_cpu_s']['max']:.2f}",
                    "/".join(map(str, s["completion_tokens"])),
                ]
            )
    headers = [
        "max_tokens",
        "variant",
        "wall s: median [min, max]",
        "ratio to vLLM+client vote: median [min, max]",
        "ensemble 8x1 / this: median [min, max]",
        "client vote ms",
        "CPU s of the serving server",
        "CPU s of the idle server",
        "other processes' CPU s: median / max",
        "completion tokens",
    ]
    return md_table(headers, rows_md), summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, nargs="+", default=[64, 128])
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per length (every variant once per round)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--prompt", default="add 478+365")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.1, help="for both servers")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled variant order")
    p.add_argument(
        "--gap",
        type=float,
        default=1.5,
        help="idle seconds before each request: after its last step a vLLM worker spins for 1 s (shm_broadcast "
        "busy_loop_s), taking a core from the other server",
    )
    p.add_argument("--no-diagnostics", dest="diagnostics", action="store_false")
    add_common_args(p)
    args = p.parse_args()
    waited = wait_quiet(args.wait_quiet)
    names = [TARGET, BASELINE] + (DIAG if args.diagnostics else [])
    results = asyncio.run(bench(args))
    table, summary = summarize(results, names)
    print(table)
    print(f"\nidle CPU (s per s, nothing asked): {results['idle_cpu_s_per_s']}")
    print(
        "ensemble / vLLM+client vote (median paired ratio): "
        + ", ".join(f"{mt} tokens: {s[TARGET]['ratio_to_baseline']['median']:.3f}" for mt, s in summary.items())
    )
    write_results(
        "overhead",
        {
            "args": vars(args),
            "waited_for_quiet_s": waited,
            "variants": names,
            "summary": summary,
            "raw": results,
            "markdown": table,
        },
    )


if __name__ == "__main__":
    main()
