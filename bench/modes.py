"""Answer modes of the ensemble: unrouted vote, routed vote and the routed mixture, on accuracy and cost.

A copy of the embedded sandbox population (8 LoRA members m00..m07 plus its substrate) gets a mixture
router trained and installed with the real CLI (`ensemble-train router --config configs/router.yaml`:
sigmoid_floor gates, top_k 3), then ONE real `ensemble-serve up` serves the copy and the official `openai`
AsyncOpenAI client sends every held-out prompt through each way the server can answer an ensemble request:

* `vote unrouted`  -- `ensemble: {"route": false}`: all 8 members' chains, majority vote;
* `vote routed`    -- the router's top-3 members by gate, the vote weighted by their gates
                      (`ensemble: {"vote": "weighted"}`; `--routed-vote majority` for a plain majority);
* `mixture cold`   -- `ensemble: {"mode": "mixture"}`: ONE adapter mixed from the routed members' updates
                      (gate-weighted), first pass: mixed adapters are created and loaded by vLLM;
* `mixture warm`   -- the same requests again: the server's mixture cache should hit
                      (`ensemble.routing.mixture.cached`).

Prompts: `trainer.tasks.sandbox.generate_problems(per_domain * 6, seed=1234, split="heldout")` (the router CLI's
own held-out problems with configs/router.yaml, so the router never trained on them), checked with
`trainer.tasks.sandbox.verify`. Every request is greedy (temperature 0, one chain per member), max_tokens 128,
`--concurrency` requests in flight; the modes run one after the other on the same server.

Per mode: accuracy (+- its standard error, a failed request counts as wrong), the pass's wall time, mean /
p50 / p90 request latency (client side), total prompt and completion tokens from `usage`, routing
fallbacks (`routing.used` false), and for the mixture the cached responses and how many routes had to be
truncated (summed member rank above the engine's max LoRA rank, so the mix is an SVD truncation rather than
exact). Before the first pass, `--warmup` unmeasured vote requests on training-split prompts take the server's
one-off first-request costs (about 6 s each for the first batch on 2 cores) out of the table. Also recorded:
the router training time and its own offline held-out report (from `--out`), the server's start time, the
router's status in `/v1/models`, the warm-up time and the server's `ensemble_route_fallbacks` counter.

The server's mixture cache holds 32 mixed adapters by default (LRU; `ensemble-serve up --mixture-cache`) and
its key includes the gates rounded to 3
decimals, so nearly every prompt is its own route: with more than 32 prompts the warm pass finds most
entries evicted (run `--per-domain 4`, 24 prompts, to see a warm pass that hits).

    .venv/bin/python bench/modes.py [--per-domain 16] [--concurrency 4] [--max-tokens 128]

Writes bench/results/modes.json and prints a markdown table. Takes about 3-4 minutes on 2 CPU cores (half of it training the router).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai
from _common import (
    ENSEMBLE_NAME,
    LOGS,
    ROOT,
    ForeignLoad,
    ServerSet,
    add_common_args,
    chat,
    md_table,
    others_running,
    rel,
    wait_quiet,
    write_json,
)
from tqdm import tqdm

from ensemble_serve.testing.servers import copy_embedded, server_env
from trainer.tasks.sandbox import DOMAINS, Problem, generate_problems, verify

MODES = ("vote unrouted", "vote routed", "mixture cold", "mixture warm")


# --------------------------------------------------------------------------- setup


def train_router(population: Path, config: Path, out: Path) -> dict[str, Any]:
    """`ensemble-train router` on the copy (installs `router/` and the manifest entry); its results and time."""
    exe = Path(sys.executable).with_name("ensemble-train")
    cmd = [str(exe), "router", "--config", str(config), "--population", str(population), "--out", str(out)]
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / "modes-router.log"
    env = server_env()
    print(f"training the router ({rel(config)}; about 90 s on 2 cores) ...", file=sys.stderr)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"ensemble-train router exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
    result = json.loads(out.read_text())
    return {"wall_s": seconds, "result": result}


# --------------------------------------------------------------------------- requests


def request_options(mode: str, routed_vote: str) -> dict[str, Any]:
    if mode == "vote unrouted":
        return {"route": False, "vote": "majority"}
    if mode == "vote routed":
        return {"vote": routed_vote}
    return {"mode": "mixture"}


async def ask(
    client: openai.AsyncOpenAI, sem: asyncio.Semaphore, p: Problem, ensemble: dict, max_tokens: int
) -> dict[str, Any]:
    """One ensemble request; a record of its outcome (an API error is recorded, not raised)."""
    async with sem:
        t0 = time.perf_counter()
        try:
            r = await client.chat.completions.create(
                model=ENSEMBLE_NAME,
                messages=chat(p.prompt),
                temperature=0.0,
                max_tokens=max_tokens,
                extra_body={"ensemble": {"samples_per_member": 1, **ensemble}},
            )
        except openai.APIError as e:
            status = getattr(e, "status_code", None)
            return {"error": f"{type(e).__name__} ({status}): {e}", "latency_s": time.perf_counter() - t0}
        latency = time.perf_counter() - t0
    text = r.choices[0].message.content or ""
    ens = r.model_extra.get("ensemble") or {}
    routing = ens.get("routing")
    mixture = (routing or {}).get("mixture")
    return {
        "latency_s": latency,
        "correct": verify(p, text).correct,
        "answer": ens.get("answer"),
        "agreement": ens.get("agreement"),
        "members": ens.get("members"),
        "failed_chains": len(ens.get("failed") or []),
        "prompt_tokens": r.usage.prompt_tokens,
        "completion_tokens": r.usage.completion_tokens,
        "routing_used": None if routing is None else bool(routing.get("used")),
        "routing_reason": None if routing is None else routing.get("reason"),
        "mixture_members": None if mixture is None else mixture.get("members"),
        "mixture_adapter": None if mixture is None else mixture.get("adapter"),
        "mixture_cached": None if mixture is None else bool(mixture.get("cached")),
    }


async def run_pass(
    client: openai.AsyncOpenAI, problems: list[Problem], mode: str, args: argparse.Namespace, opts: dict | None = None
) -> tuple[list[dict], float]:
    """Every problem through one mode, `--concurrency` at a time; (records in problem order, wall seconds)."""
    sem = asyncio.Semaphore(args.concurrency)
    opts = request_options(mode, args.routed_vote) if opts is None else opts
    bar = tqdm(total=len(problems), desc=f"{mode:<14}", unit="req")

    async def one(p: Problem) -> dict:
        rec = await ask(client, sem, p, opts, args.max_tokens)
        bar.update()
        return rec

    t0 = time.perf_counter()
    try:
        recs = list(await asyncio.gather(*(one(p) for p in problems)))
    finally:
        bar.close()
    return recs, time.perf_counter() - t0


async def route_fallback_counter(url: str) -> float | None:
    """The server's `ensemble_route_fallbacks` counter (Prometheus text), or None if it is not exposed."""
    async with httpx.AsyncClient() as h:
        text = (await h.get(url + "/metrics", timeout=10)).text
    m = re.search(r"^ensemble_route_fallbacks(?:_total)?(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


# --------------------------------------------------------------------------- statistics


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(
    problems: list[Problem], recs: list[dict], wall_s: float, ranks: dict[str, int], max_rank: int | None
) -> dict[str, Any]:
    n = len(recs)
    ok = [r for r in recs if "error" not in r]
    hits = [bool(r.get("correct")) for r in recs]  # an errored request counts as wrong
    acc = sum(hits) / n
    lat = [r["latency_s"] for r in ok]
    routed = [r for r in ok if r["routing_used"] is not None]
    mixed = [r for r in ok if r["mixture_cached"] is not None]
    per_domain = {
        d: sum(h for h, p in zip(hits, problems) if p.domain == d) / max(1, sum(p.domain == d for p in problems))
        for d in DOMAINS
        if any(p.domain == d for p in problems)
    }
    out: dict[str, Any] = {
        "requests": n,
        "errors": n - len(ok),
        "accuracy": acc,
        "accuracy_se": math.sqrt(acc * (1 - acc) / n) if n else float("nan"),
        "accuracy_by_domain": per_domain,
        "wall_s": wall_s,
        "requests_per_s": n / wall_s if wall_s > 0 else float("nan"),
        "latency_mean_s": sum(lat) / len(lat) if lat else float("nan"),
        "latency_p50_s": percentile(lat, 50),
        "latency_p90_s": percentile(lat, 90),
        "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
        "completion_tokens": sum(r["completion_tokens"] for r in ok),
        "completion_tokens_per_request": sum(r["completion_tokens"] for r in ok) / len(ok) if ok else float("nan"),
        "chains_per_request": sum(len(r["members"] or []) for r in ok) / len(ok) if ok else float("nan"),
        "failed_chains": sum(r["failed_chains"] for r in ok),
        "routing_reported": len(routed),
        "route_fallbacks": sum(not r["routing_used"] for r in routed),
        "fallback_reasons": sorted({r["routing_reason"] for r in routed if not r["routing_used"]}),
        "error_messages": sorted({r["error"] for r in recs if "error" in r})[:5],
    }
    if mixed:
        sums = [sum(ranks.get(m, 0) for m in r["mixture_members"] or []) for r in mixed]
        out["mixture_cached"] = sum(r["mixture_cached"] for r in mixed)
        out["mixture_distinct_adapters"] = len({r["mixture_adapter"] for r in mixed})  # = distinct cache keys
        out["mixture_distinct_member_sets"] = len({tuple(r["mixture_members"] or []) for r in mixed})
        out["mixture_summed_rank_mean"] = sum(sums) / len(sums)
        out["mixture_truncated_routes"] = None if max_rank is None else sum(s > max_rank for s in sums)
    return out


def paired(a: list[dict], b: list[dict]) -> dict[str, int]:
    """Per-problem comparison of two modes: where a is right and b wrong, and the other way round."""
    ca = [bool(r.get("correct")) for r in a]
    cb = [bool(r.get("correct")) for r in b]
    return {
        "a_right_b_wrong": sum(x and not y for x, y in zip(ca, cb)),
        "a_wrong_b_right": sum(y and not x for x, y in zip(ca, cb)),
        "same_answer": sum(x.get("answer") == y.get("answer") for x, y in zip(a, b)),
    }


# --------------------------------------------------------------------------- the benchmark


async def serve_and_measure(args: argparse.Namespace, population: Path, problems: list[Problem]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    manifest = json.loads((population / "population.json").read_text())
    ranks = {m["name"]: m["rank"] for m in manifest["members"]}
    extra = ["--population", str(population), "--served-model-name", ENSEMBLE_NAME]
    if args.max_lora_rank is not None:
        extra += ["--max-lora-rank", str(args.max_lora_rank)]
    with ServerSet() as servers:
        server = servers.start_ensemble(*extra, name="modes", gpu_memory_utilization=args.gpu_memory_utilization)
        print(f"ensemble-serve up in {server.started_s:.0f}s", file=sys.stderr)
        out["server_start_s"] = server.started_s
        models = httpx.get(server.base_url + "/models", timeout=10).json()
        out["models"] = [m["id"] for m in models["data"]]
        out["router_status"] = next(
            (m.get("ensemble") or {}).get("router") for m in models["data"] if m["id"] == ENSEMBLE_NAME
        )
        # the engine's max LoRA rank decides whether a mixture is exact; the server's default fits the members
        max_rank = args.max_lora_rank or _default_rank(ranks)
        out["engine_max_lora_rank"] = max_rank
        out["other_benchmark_processes_at_start"] = others_running([server])
        load = ForeignLoad([server])
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=900)
        if args.warmup:
            # the server's first requests pay one-off costs (the first engine steps took ~6 s each here);
            # a few unmeasured vote requests on other (training-split) prompts keep them out of the first pass
            warm = generate_problems(args.warmup, seed=args.seed + 1, split="train")
            t0 = time.perf_counter()
            for mode in ("vote unrouted", "vote routed"):
                await run_pass(client, warm, f"warmup {mode.split()[1]}", args, request_options(mode, args.routed_vote))
            out["warmup_s"] = time.perf_counter() - t0
        fallbacks0 = await route_fallback_counter(server.url)
        records: dict[str, list[dict]] = {}
        summary: dict[str, dict] = {}
        foreign: dict[str, float] = {}
        for mode in MODES:
            load.mark()
            recs, wall = await run_pass(client, problems, mode, args)
            foreign[mode] = load.foreign_s()
            records[mode] = recs
            summary[mode] = summarise(problems, recs, wall, ranks, max_rank)
        fallbacks1 = await route_fallback_counter(server.url)
        await client.close()
        if not server.alive():
            out["server_died"] = server.log.read_text()[-4000:]
    out["server_route_fallbacks"] = None if fallbacks0 is None or fallbacks1 is None else fallbacks1 - fallbacks0
    out["foreign_cpu_s"] = foreign
    out["summary"] = summary
    out["paired"] = {
        "vote routed vs vote unrouted": paired(records["vote routed"], records["vote unrouted"]),
        "mixture cold vs vote routed": paired(records["mixture cold"], records["vote routed"]),
        "mixture warm vs mixture cold": paired(records["mixture warm"], records["mixture cold"]),
    }
    out["records"] = {
        mode: [{"domain": p.domain, "difficulty": p.difficulty, **r} for p, r in zip(problems, recs)]
        for mode, recs in records.items()
    }
    return out


def _default_rank(ranks: dict[str, int]) -> int:
    from ensemble_serve.shared.engine_config import VLLM_LORA_RANKS

    return min(r for r in VLLM_LORA_RANKS if r >= max(ranks.values()))


def table(summary: dict[str, dict]) -> str:
    headers = [
        "mode",
        "accuracy (+- se)",
        "errors",
        "wall s",
        "latency mean / p50 / p90 s",
        "chains/req",
        "completion tok",
        "prompt tok",
        "fallbacks",
        "mixture cached",
    ]
    rows = []
    for mode, s in summary.items():
        cached = f"{s['mixture_cached']}/{s['requests'] - s['errors']}" if "mixture_cached" in s else ""
        fallbacks = f"{s['route_fallbacks']}/{s['routing_reported']}" if s["routing_reported"] else "-"
        rows.append(
            [
                mode,
                f"{s['accuracy']:.3f} +- {s['accuracy_se']:.3f}",
                s["errors"],
                f"{s['wall_s']:.1f}",
                f"{s['latency_mean_s']:.2f} / {s['latency_p50_s']:.2f} / {s['latency_p90_s']:.2f}",
                f"{s['chains_per_request']:.2f}",
                s["completion_tokens"],
                s["prompt_tokens"],
                fallbacks,
                cached,
            ]
        )
    return md_table(headers, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-domain", type=int, default=16, help="held-out problems per domain (6 domains)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the held-out problems (the router's eval_seed)")
    p.add_argument("--concurrency", type=int, default=4, help="ensemble requests in flight")
    p.add_argument("--max-tokens", type=int, default=128, help="generation limit per chain")
    p.add_argument(
        "--routed-vote",
        choices=("weighted", "majority"),
        default="weighted",
        help="vote rule of the routed vote (weighted: the routed members' gates weight it)",
    )
    p.add_argument(
        "--router-config", type=Path, default=ROOT / "configs" / "router.yaml", help="config of ensemble-train router"
    )
    p.add_argument(
        "--max-lora-rank", type=int, default=None, help="the server's --max-lora-rank (default: fits the members)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="unmeasured warm-up requests (training-split prompts) per vote mode before the first pass; 0: none",
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.1, help="the server's vLLM memory fraction")
    add_common_args(p)
    args = p.parse_args()
    waited = wait_quiet(args.wait_quiet)
    problems = generate_problems(args.per_domain * len(DOMAINS), seed=args.seed, split="heldout")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ensemble-serve-modes-") as tmp:
        population = copy_embedded(Path(tmp))  # the manifest finds its substrate at ../substrate
        router = train_router(population, args.router_config, Path(tmp) / "router.json")
        res = router["result"]
        print(f"router trained and installed in {router['wall_s']:.0f}s", file=sys.stderr)
        out = asyncio.run(serve_and_measure(args, population, problems))
    heldout = res.get("heldout") or {}
    out = {
        "args": {**vars(args), "router_config": rel(args.router_config)},
        "waited_for_quiet_s": waited,
        "problems": len(problems),
        "problems_by_domain": {d: sum(p.domain == d for p in problems) for d in DOMAINS},
        "router": {
            "train_wall_s": router["wall_s"],
            "cli_seconds": res.get("seconds"),
            "variant": res.get("variant"),
            "feature": res.get("feature"),
            "top_k": res.get("top_k"),
            "problems": res.get("problems"),
            "final_loss": (res.get("router") or {}).get("final_loss"),
            "offline_heldout_accuracy": {m: a.get("all") for m, a in (heldout.get("accuracy") or {}).items()},
            "offline_best_member": heldout.get("best_member"),
            "routed_top1_choice": heldout.get("routed_top1_choice"),
        },
        **out,
        "total_wall_s": time.perf_counter() - started,
    }
    md = table(out["summary"])
    out["markdown"] = md
    print(md)
    print(
        f"\nrouter: {out['router']['variant']} top-{out['router']['top_k']}, trained in "
        f"{out['router']['train_wall_s']:.0f}s; its offline held-out accuracy: "
        + ", ".join(f"{k} {v:.3f}" for k, v in out["router"]["offline_heldout_accuracy"].items())
    )
    print(
        f"server start {out['server_start_s']:.0f}s, router {out['router_status']}, warm-up {out.get('warmup_s', 0):.0f}s; "
        f"server ensemble_route_fallbacks +{out['server_route_fallbacks']}"
    )
    for k, v in out["paired"].items():
        print(f"{k}: " + ", ".join(f"{a} {b}" for a, b in v.items()))
    if "server_died" in out:
        print("the server died during the run; see modes.json `server_died`", file=sys.stderr)
    path = write_json("modes", out)
    print(f"wrote {rel(path)} (total {out['total_wall_s']:.0f}s)", file=sys.stderr)


if __name__ == "__main__":
    main()
