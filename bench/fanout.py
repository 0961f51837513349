"""Fan-out cost through the HTTP API.

Wall time of ONE ensemble request (8 members x 1 chain, model `sandbox-ensemble`) divided by the wall
time of ONE member request with n=8 (model `m00`): same prompt, same fixed output length
(`ignore_eos`, same `max_tokens`), temperature 1.0, one real `ensemble-serve up` server (the embedded
default), the real `openai` client. The variants are interleaved in every round (order shuffled with a
fixed seed), each round gives one paired ratio; the table reports the median and the spread. Every
request starts after --gap (1.5 s) idle, so that it never meets the 1 s busy loop a vLLM worker process
runs after its last engine step (`busy_loop_s` in vllm's shm_broadcast.py); --gap 0 sends back to back.

Diagnostic variants (off with --no-diagnostics) split the gap into its parts:
`m00 n=8 +logprobs` (the ensemble asks vLLM for the sampled tokens' logprobs), `m00 x8 (n=1)` (eight
requests instead of one with n=8), `m00..m07 x8 (n=1)` (eight different adapters in the batch).

    .venv/bin/python bench/fanout.py [--max-tokens 64 128] [--repeats 15]
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

BASELINE = "m00 n=8"
TARGET = "ensemble 8x1"


def variants(diagnostics: bool) -> list[str]:
    names = [TARGET, BASELINE]
    if diagnostics:
        names += ["m00 n=8 +logprobs", "m00 x8 (n=1)", "m00..m07 x8 (n=1)"]
    return names


async def run_variant(
    client: openai.AsyncOpenAI, variant: str, prompt: str, max_tokens: int, temperature: float, members: list[str]
) -> dict:
    common = dict(
        messages=chat(prompt), max_tokens=max_tokens, temperature=temperature, extra_body={"ignore_eos": True}
    )
    t0 = time.perf_counter()
    if variant == TARGET:
        r = await client.chat.completions.create(model=ENSEMBLE_NAME, **common)
        responses = [r]
    elif variant == BASELINE:
        responses = [await client.chat.completions.create(model="m00", n=8, **common)]
    elif variant == "m00 n=8 +logprobs":
        responses = [await client.chat.completions.create(model="m00", n=8, logprobs=True, top_logprobs=0, **common)]
    elif variant == "m00 x8 (n=1)":
        responses = await asyncio.gather(*(client.chat.completions.create(model="m00", **common) for _ in range(8)))
    elif variant == "m00..m07 x8 (n=1)":
        responses = await asyncio.gather(*(client.chat.completions.create(model=m, **common) for m in members[:8]))
    else:
        raise ValueError(variant)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "completion_tokens": sum(r.usage.completion_tokens for r in responses),
        "choices": sum(len(r.choices) for r in responses),
    }


async def bench(args: argparse.Namespace) -> dict:
    names = variants(args.diagnostics)
    members = member_names()
    rng = random.Random(args.seed)
    results: dict = {"max_tokens": {}}
    with ServerSet() as servers:
        server = servers.start_ensemble()
        print(f"ensemble-serve up in {server.started_s:.0f}s", file=sys.stderr)
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)
        load = ForeignLoad([server])
        results["other_benchmark_processes_at_start"] = others_running([server])
        total = len(args.max_tokens) * (args.warmup + args.repeats) * len(names)
        with tqdm(total=total, desc="fanout", unit="req") as bar:
            for mt in args.max_tokens:
                rows: dict[str, list[dict]] = {v: [] for v in names}
                for rnd, v in interleaved(names, args.warmup + args.repeats, rng):
                    await asyncio.sleep(args.gap)  # every request starts on an idle engine
                    cpu0 = server.cpu_seconds()
                    load.mark()
                    rec = await run_variant(client, v, args.prompt, mt, args.temperature, members)
                    rec["foreign_cpu_s"] = load.foreign_s()
                    rec["server_cpu_s"] = server.cpu_seconds() - cpu0
                    rec["round"] = rnd
                    rec["warmup"] = rnd < args.warmup
                    rows[v].append(rec)
                    bar.set_postfix(max_tokens=mt, variant=v)
                    bar.update()
                results["max_tokens"][str(mt)] = rows
        await client.close()
    return results


def summarize(results: dict, names: list[str], warmup: int) -> tuple[str, dict]:
    summary: dict = {}
    table_rows = []
    for mt, rows in results["max_tokens"].items():
        timed = timed_rows(rows, names)
        base = timed[BASELINE]
        summary[mt] = {}
        for v in names:
            walls = [r["wall_s"] for r in timed[v]]
            ratios = paired_ratios(timed[v], base)
            s_wall, s_ratio = spread(walls), spread(ratios)
            cpu = spread([r["server_cpu_s"] for r in timed[v]])
            foreign = spread([r["foreign_cpu_s"] for r in timed[v]])
            summary[mt][v] = {
                "wall_s": s_wall,
                "ratio_to_baseline": s_ratio,
                "server_cpu_s": cpu,
                "foreign_cpu_s": foreign,
                "completion_tokens": sorted({r["completion_tokens"] for r in timed[v]}),
                "choices": sorted({r["choices"] for r in timed[v]}),
            }
            table_rows.append(
                [
                    mt,
                    v,
                    fmt_spread(s_wall),
                    "1 (baseline)" if v == BASELINE else fmt_spread(s_ratio),
                    f"{cpu['median']:.2f}",
                    f"{foreign['median']:.2f} / {foreign['max']:.2f}",
                    "/".join(map(str, summary[mt][v]["choices"])),
                    "/".join(map(str, summary[mt][v]["completion_tokens"])),
                ]
            )
    headers = [
        "max_tokens",
        "variant",
        "wall s: median [min, max]",
        "ratio to m00 n=8: median [min, max]",
        "server CPU s (median)",
        "other processes' CPU s: median / max",
        "choices returned",
        "usage completion_tokens",
    ]
    return md_table(headers, table_rows), summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, nargs="+", default=[64, 128], help="fixed output lengths to test")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per length (every variant once per round)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--prompt", default="add 478+365")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled variant order")
    p.add_argument(
        "--gap",
        type=float,
        default=1.5,
        help="idle seconds before each request (a vLLM worker busy-loops for 1 s after its last step); 0: back to back",
    )
    p.add_argument("--no-diagnostics", dest="diagnostics", action="store_false", help="only the two main variants")
    add_common_args(p)
    args = p.parse_args()
    waited = wait_quiet(args.wait_quiet)
    names = variants(args.diagnostics)
    results = asyncio.run(bench(args))
    table, summary = summarize(results, names, args.warmup)
    print(table)
    ratio = {mt: s[TARGET]["ratio_to_baseline"]["median"] for mt, s in summary.items()}
    print(
        "\nensemble 8x1 / m00 n=8 (median paired ratio): "
        + ", ".join(f"{mt} tokens: {r:.3f}" for mt, r in ratio.items())
    )
    write_results(
        "fanout",
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
