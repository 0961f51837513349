"""Where the fan-out cost comes from, below HTTP: the same work straight on vLLM's AsyncLLM, in-process.

A diagnostic for `bench/fanout.py`. One `ensemble_serve.engine.inprocess.AsyncEngine` (the engine the server runs,
with the embedded default population and the same engine settings) receives, interleaved per round in
shuffled order (fixed seed):

* `m00 n=8` - one request, one adapter, 8 samples (what a member request with n=8 is);
* `m00 n=8 +logprobs` - the same with `logprobs=0` (the sampled token's logprob; the ensemble asks for it
  to rank chains by mean logprob);
* `m00..m07 x1` - eight requests, one per adapter, n=1 (the ensemble's fan-out without logprobs);
* `m00..m07 x1 +logprobs` - the ensemble's fan-out exactly as the server sends it.

Same prompt, fixed output length (`ignore_eos`, same `max_tokens`), temperature 1.0. Ratios are paired
per round; the table shows median [min, max].

    .venv/bin/python bench/fanout_engine.py [--max-tokens 64 128] [--repeats 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time

from _common import (
    EMBEDDED_POPULATION,
    add_common_args,
    fmt_spread,
    interleaved,
    md_table,
    paired_ratios,
    spread,
    system_busy_s,
    timed_rows,
    wait_quiet,
    write_results,
)
from tqdm import tqdm

BASELINE = "m00 n=8"
VARIANTS = [BASELINE, "m00 n=8 +logprobs", "m00..m07 x1", "m00..m07 x1 +logprobs"]


async def bench(args: argparse.Namespace) -> dict:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import SamplingParams

    from ensemble_serve.engine.inprocess import AsyncEngine
    from ensemble_serve.shared.engine_config import EngineConfig
    from ensemble_serve.shared.population import load_population

    population = load_population(EMBEDDED_POPULATION)
    engine = AsyncEngine(population, EngineConfig(gpu_memory_utilization=args.gpu_memory_utilization))
    members = population.names[:8]
    tok = engine.tokenizer
    prompt_ids = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    rng = random.Random(args.seed)
    out: dict = {"max_tokens": {}}

    async def one(member: str, params: SamplingParams) -> int:
        tokens: dict[int, int] = {}
        async for o in engine.generate(prompt_ids, params, member, engine.next_id("bench")):
            for c in o.outputs:
                tokens[c.index] = len(c.token_ids)
        return sum(tokens.values())

    async def run(variant: str, mt: int) -> dict:
        kw = dict(max_tokens=mt, temperature=1.0, ignore_eos=True)
        if variant.endswith("+logprobs"):
            kw["logprobs"] = 0
        t0 = time.perf_counter()
        if variant.startswith("m00 n=8"):
            tokens = await one("m00", SamplingParams(n=8, **kw))
        else:
            tokens = sum(await asyncio.gather(*(one(m, SamplingParams(n=1, **kw)) for m in members)))
        return {"wall_s": time.perf_counter() - t0, "tokens": tokens}

    try:
        total = len(args.max_tokens) * (args.warmup + args.repeats) * len(VARIANTS)
        with tqdm(total=total, desc="fanout_engine", unit="req") as bar:
            for mt in args.max_tokens:
                rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
                for rnd, v in interleaved(VARIANTS, args.warmup + args.repeats, rng):
                    b0, c0 = system_busy_s(), time.perf_counter()
                    rec = await run(v, mt)
                    rec["machine_busy_cores"] = (system_busy_s() - b0) / (time.perf_counter() - c0)
                    rec["warmup"] = rnd < args.warmup
                    rows[v].append(rec)
                    bar.update()
                out["max_tokens"][str(mt)] = rows
    finally:
        engine.shutdown()
    return out


def summarize(out: dict) -> tuple[str, dict]:
    summary: dict = {}
    rows_md = []
    for mt, rows in out["max_tokens"].items():
        timed = timed_rows(rows, VARIANTS)
        summary[mt] = {}
        for v in VARIANTS:
            s = {
                "wall_s": spread([r["wall_s"] for r in timed[v]]),
                "ratio_to_baseline": spread(paired_ratios(timed[v], timed[BASELINE])),
                "tokens": sorted({r["tokens"] for r in timed[v]}),
                "machine_busy_cores": spread([r["machine_busy_cores"] for r in timed[v]]),
            }
            summary[mt][v] = s
            rows_md.append(
                [
                    mt,
                    v,
                    fmt_spread(s["wall_s"]),
                    "1 (baseline)" if v == BASELINE else fmt_spread(s["ratio_to_baseline"]),
                    f"{s['machine_busy_cores']['median']:.2f}",
                    "/".join(map(str, s["tokens"])),
                ]
            )
    headers = [
        "max_tokens",
        "variant",
        "wall s: median [min, max]",
        "ratio to m00 n=8: median [min, max]",
        "busy cores (whole machine)",
        "tokens",
    ]
    return md_table(headers, rows_md), summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, nargs="+", default=[64, 128])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prompt", default="add 478+365")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled variant order")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.1)
    add_common_args(p)
    args = p.parse_args()
    waited = wait_quiet(args.wait_quiet)
    out = asyncio.run(bench(args))
    md, summary = summarize(out)
    print(md)
    write_results(
        "fanout_engine",
        {"args": vars(args), "waited_for_quiet_s": waited, "summary": summary, "raw": out, "markdown": md},
    )


if __name__ == "__main__":
    main()
