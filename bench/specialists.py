"""Does the ensemble beat its best member? Specialists, routed and calibrated votes, against honest baselines.

The embedded default (12 LoRA specialists, two per sandbox family, trained on that family's harder
levels 3-4 over a substrate trained on levels 1-2 only; a sigmoid_floor router; a reliability table)
is served by one real `ensemble-serve up`, the baselines' generalist adapters by vLLM's own OpenAI
server; every request goes through the real `openai` client.

Phases:

1. CHOOSE (one validation set, its own seed): every member answers greedily (the best member is the
   one with the best validation accuracy), and each candidate ensemble configuration (at most 8 chains a
   problem, the self-consistency budget) answers; the best on validation is "the chosen configuration".
   The population's `ensemble_defaults` should hold it (`make embedded` writes them); the script says
   whether they do.
2. TEST, for each of --seeds problem sets (held-out split, levels 1-4, the six families balanced; prompts
   that are also in the validation set are dropped):
   - the default request: no `ensemble` options at all (whatever the manifest's defaults say),
     and the same request with a system message (the system-message target);
   - (i) the best member with self-consistency (n=8, majority over extracted answers);
   - (ii) one generalist LoRA trained on the union of the specialists' data (the same 12 data streams,
     interleaved) for the same total steps, at rank r and at rank N*r (the population's parameter
     count), each with self-consistency; trained once and cached under runs/bench-generalists/;
   - (iii) the base with self-consistency;
   - (iv) the oracle: any member right, greedy;
   - every member greedy (the per-member, per-family table and plot).

Sampled arms use temperature --temperature (0.7), no request seeds (seeded requests must be few in
flight on vLLM's CPU engine, see _common.py, and the seeds of this benchmark are the problem sets).
Accuracy gets a 95% bootstrap interval over the pooled problems (scipy.stats.bootstrap); the
default request against the best member's self-consistency gets a paired interval for the
difference and for the error ratio. Completion tokens per problem come from the responses' `usage`.

    .venv/bin/python bench/specialists.py [--seeds 3] [--n 96] [--val 144]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
from _common import (
    EMBEDDED_POPULATION,
    ENSEMBLE_NAME,
    RESULTS,
    ServerSet,
    add_common_args,
    ask_greedy,
    ask_self_consistency,
    chat,
    md_table,
    member_names,
    rel,
    wait_quiet,
    write_results,
)
from scipy import stats
from tqdm import tqdm

from ensemble_serve.shared.cliutil import load_config
from ensemble_serve.shared.embedded import EMBEDDED_SUBSTRATE
from ensemble_serve.testing.servers import ROOT
from trainer.models.config import InitConfig
from trainer.models.init_population import member_plan, spec_stream, warm_up_member
from trainer.plotting import new_figure, to_png
from trainer.tasks.sandbox import DOMAINS, Problem, generate_problems, verify

LEVELS = (1, 2, 3, 4)
SYSTEM = "You are a helpful assistant. Answer the question."
# candidate configurations for the default request: each spends at most 8 chains a problem
CANDIDATES: dict[str, dict] = {
    "router top-1 x 8, calibrated": {"members": 1, "samples_per_member": 8, "vote": "calibrated"},
    "router top-2 x 4, calibrated": {"members": 2, "samples_per_member": 4, "vote": "calibrated"},
    "router top-4 x 2, calibrated": {"members": 4, "samples_per_member": 2, "vote": "calibrated"},
    "router top-8 x 1, calibrated": {"members": 8, "samples_per_member": 1, "vote": "calibrated"},
    "router top-2 x 4, majority": {"members": 2, "samples_per_member": 4, "vote": "majority"},
    "no router, 8 x 1, calibrated": {"members": 8, "samples_per_member": 1, "vote": "calibrated", "route": False},
}


# ------------------------------------------------------------------ the generalist baselines


def generalist_streams(init_cfg, members: list[dict], seed: str = "generalist") -> Iterator[Problem]:
    """The union of the specialists' data: their own streams, interleaved at random (equal shares)."""
    streams = [spec_stream(init_cfg, m, None) for m in members]
    rng = random.Random(seed)
    while True:
        yield next(rng.choice(streams))


def generalist_lr(members: list[dict], rank: int) -> float:
    """The members' median lr, scaled by sqrt(r / rank): at rank N*r the specialists' lr diverged (loss 0.1 -> 2.8
    within 1400 steps at 0.004), since the update's size grows with the rank at a fixed alpha/rank."""
    r = max(m["rank"] for m in members)
    return float(np.median([m["lr"] for m in members])) * math.sqrt(r / rank)


def train_generalists(out_root: Path) -> dict[str, dict]:
    """Rank r and rank N*r generalists, each trained for N x the specialists' steps; cached by config."""
    init_cfg = load_config(InitConfig, ROOT / "configs" / "init.yaml", {"base": EMBEDDED_SUBSTRATE})
    plan = member_plan(init_cfg)
    r = max(m["rank"] for m in plan)
    steps = init_cfg.warmup_steps * len(plan)
    made = {}
    for rank in (r, r * len(plan)):
        name = f"generalist-r{rank}"
        rank_lr = generalist_lr(plan, rank)
        out = out_root / f"{name}-{steps}-lr{rank_lr:.5f}"
        made[name] = {"rank": rank, "steps": steps, "lr": rank_lr, "path": out}
        if (out / "adapter_model.safetensors").is_file():
            continue
        cfg = init_cfg.model_copy(update={"warmup_steps": steps})
        spec = {"name": name, "seed": 7, "rank": rank, "alpha": 2.0 * rank, "dropout": 0.0, "lr": rank_lr}
        with tqdm(total=steps, desc=name, unit="step") as bar:
            t0 = time.perf_counter()
            loss = warm_up_member(cfg, spec, generalist_streams(cfg, plan), out, "sandbox-substrate", bar)
        made[name]["train_s"] = time.perf_counter() - t0
        made[name]["final_loss"] = loss
    return made


# ------------------------------------------------------------------ requests


class Runner:
    def __init__(self, args: argparse.Namespace, bar: tqdm):
        self.args, self.bar = args, bar
        self.sem = asyncio.Semaphore(args.concurrency)

    async def greedy(self, client: openai.AsyncOpenAI, model: str, p: Problem) -> dict:
        async with self.sem:
            text, tokens = await ask_greedy(client, model, p.prompt, self.args.max_tokens)
        self.bar.update()
        return {"text": text, "tokens": tokens, "correct": verify(p, text).correct}

    async def self_consistency(self, client: openai.AsyncOpenAI, model: str, p: Problem) -> dict:
        async with self.sem:
            out = await ask_self_consistency(
                client,
                model,
                p.prompt,
                n=self.args.samples,
                temperature=self.args.temperature,
                max_tokens=self.args.max_tokens,
            )
        self.bar.update()
        return {**out, "correct": verify(p, out["text"]).correct}

    async def ensemble(
        self, client: openai.AsyncOpenAI, p: Problem, options: dict | None, system: str | None = None
    ) -> dict:
        messages = ([{"role": "system", "content": system}] if system else []) + chat(p.prompt)
        kw = {} if options is None else {"extra_body": {"ensemble": options}}
        async with self.sem:
            t0 = time.perf_counter()
            r = await client.chat.completions.create(
                model=ENSEMBLE_NAME,
                messages=messages,
                max_tokens=self.args.max_tokens,
                temperature=self.args.temperature,
                **kw,
            )
            wall = time.perf_counter() - t0
        self.bar.update()
        text = r.choices[0].message.content or ""
        ens = r.model_extra.get("ensemble") or {}
        return {
            "text": text,
            "tokens": r.usage.completion_tokens,
            "answer": ens.get("answer"),
            "members": ens.get("members"),
            "adaptive": ens.get("adaptive"),
            "wall_s": wall,
            "correct": verify(p, text).correct,
        }


# ------------------------------------------------------------------ statistics


def interval(correct: list[bool]) -> tuple[float, float, float]:
    x = np.asarray(correct, dtype=float)
    ci = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=0).confidence_interval
    return float(x.mean()), float(ci.low), float(ci.high)


def paired(test: list[bool], ref: list[bool]) -> dict:
    """Difference in accuracy and error ratio (test's error / ref's error), paired bootstrap intervals."""
    a, b = np.asarray(test, dtype=float), np.asarray(ref, dtype=float)

    def diff(x, y, axis=-1):
        return x.mean(axis=axis) - y.mean(axis=axis)

    def ratio(x, y, axis=-1):
        return (1 - x.mean(axis=axis)) / np.maximum(1 - y.mean(axis=axis), 1e-9)

    out = {}
    for name, f in (("difference", diff), ("error_ratio", ratio)):
        res = stats.bootstrap(
            (a, b), f, paired=True, vectorized=True, n_resamples=4000, method="percentile", random_state=0
        )
        out[name] = [float(f(a, b)), float(res.confidence_interval.low), float(res.confidence_interval.high)]
    return out


# ------------------------------------------------------------------ the run


def balanced(n: int, seed: int) -> list[Problem]:
    return generate_problems(n, seed, split="heldout", difficulties=list(LEVELS))


async def run(args: argparse.Namespace, generalists: dict[str, dict]) -> dict:
    members = member_names()
    base_name = json.loads((EMBEDDED_POPULATION / "population.json").read_text())["base_model"]["name"]
    val = balanced(args.val, args.val_seed)
    val_prompts = {p.prompt for p in val}
    tests = [[p for p in balanced(args.n, args.seed + s) if p.prompt not in val_prompts] for s in range(args.seeds)]
    n_test = sum(map(len, tests))
    total = len(val) * (len(members) + len(CANDIDATES)) + n_test * (len(members) + 4) + n_test * len(generalists)
    out: dict = {"val_problems": len(val), "test_problems": [len(t) for t in tests], "phases_s": {}}
    manifest = json.loads((EMBEDDED_POPULATION / "population.json").read_text())
    out["ensemble_defaults"] = manifest.get("ensemble_defaults")
    out["router"] = manifest.get("router")
    arms: dict[str, list[dict]] = defaultdict(list)  # arm -> records over all seeds, test problems in order
    with ServerSet() as servers, tqdm(total=total, desc="specialists", unit="req") as bar:
        runner = Runner(args, bar)

        async def phase(name: str, coros: list) -> list:
            bar.set_postfix(phase=name)
            t0 = time.perf_counter()
            res = list(await asyncio.gather(*coros))
            out["phases_s"][name] = out["phases_s"].get(name, 0.0) + time.perf_counter() - t0
            return res

        server = servers.start_ensemble(gpu_memory_utilization=args.gpu_memory_utilization)
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=900)
        # 1. choose
        val_acc = {}
        for m in members:
            recs = await phase("val members", [runner.greedy(client, m, p) for p in val])
            val_acc[m] = sum(r["correct"] for r in recs) / len(recs)
        best = max(members, key=lambda m: (val_acc[m], -members.index(m)))
        cand_val = {}
        for name, opts in CANDIDATES.items():
            recs = await phase("val candidates", [runner.ensemble(client, p, opts) for p in val])
            cand_val[name] = {
                "accuracy": sum(r["correct"] for r in recs) / len(recs),
                "tokens_per_problem": sum(r["tokens"] for r in recs) / len(recs),
            }
        chosen = max(CANDIDATES, key=lambda k: (cand_val[k]["accuracy"], -cand_val[k]["tokens_per_problem"]))
        out.update(val_accuracy=val_acc, best_member=best, candidates_val=cand_val, chosen=chosen)
        out["defaults_hold_chosen"] = all(
            (out["ensemble_defaults"] or {}).get(k) == v for k, v in CANDIDATES[chosen].items()
        )
        # 2. test, per seed
        for test in tests:
            arms["default request"] += await phase("default", [runner.ensemble(client, p, None) for p in test])
            arms["default request + system message"] += await phase(
                "default+system", [runner.ensemble(client, p, None, SYSTEM) for p in test]
            )
            arms[f"best member ({best}) SC@{args.samples}"] += await phase(
                "best SC", [runner.self_consistency(client, best, p) for p in test]
            )
            arms[f"base SC@{args.samples}"] += await phase(
                "base SC", [runner.self_consistency(client, base_name, p) for p in test]
            )
            for m in members:
                arms[f"{m} greedy"] += await phase("members greedy", [runner.greedy(client, m, p) for p in test])
        await client.close()
        servers.stop(server)

        max_rank = max(g["rank"] for g in generalists.values())
        vllm = servers.start_vllm(
            name="vllm-generalists",
            gpu_memory_utilization=args.gpu_memory_utilization,
            lora_modules=[f"{name}={g['path']}" for name, g in generalists.items()],
            max_lora_rank=next(x for x in (8, 16, 32, 64, 128, 256, 320, 512) if x >= max_rank),
        )
        client = openai.AsyncOpenAI(base_url=vllm.base_url, api_key="none", max_retries=0, timeout=900)
        for name, g in generalists.items():
            for test in tests:
                arms[f"generalist rank {g['rank']} SC@{args.samples}"] += await phase(
                    name, [runner.self_consistency(client, name, p) for p in test]
                )
        await client.close()

    problems = [p for t in tests for p in t]
    correct = {m: [r["correct"] for r in arms[f"{m} greedy"]] for m in members}
    arms["oracle (any member right, greedy)"] = [
        {"correct": any(correct[m][i] for m in members), "tokens": None} for i in range(len(problems))
    ]
    out["arms"] = {}
    for name, recs in arms.items():
        acc, lo, hi = interval([r["correct"] for r in recs])
        toks = [r["tokens"] for r in recs if r["tokens"] is not None]
        per_family = {
            d: float(np.mean([r["correct"] for r, p in zip(recs, problems) if p.domain == d])) for d in DOMAINS
        }
        per_seed, i = [], 0
        for t in tests:
            per_seed.append(float(np.mean([r["correct"] for r in recs[i : i + len(t)]])))
            i += len(t)
        out["arms"][name] = {
            "accuracy": [acc, lo, hi],
            "per_seed": per_seed,
            "tokens_per_problem": float(np.mean(toks)) if toks else None,
            "per_family": per_family,
        }
    best_sc = f"best member ({best}) SC@{args.samples}"
    default = [r["correct"] for r in arms["default request"]]
    out["default_vs_best_sc"] = paired(default, [r["correct"] for r in arms[best_sc]])
    out["system_message_effect"] = paired([r["correct"] for r in arms["default request + system message"]], default)
    for name in arms:
        if name.startswith("generalist rank"):
            out[f"default_vs_{name}"] = paired(default, [r["correct"] for r in arms[name]])
    out["member_family_accuracy"] = {
        m: {d: float(np.mean([c for c, p in zip(correct[m], problems) if p.domain == d])) for d in DOMAINS}
        for m in members
    }
    out["generalists"] = {k: {**v, "path": rel(v["path"])} for k, v in generalists.items()}
    return out


def fmt(x: list[float], digits: int = 3) -> str:
    return f"{x[0]:.{digits}f} [{x[1]:.{digits}f}, {x[2]:.{digits}f}]"


def tables(out: dict) -> str:
    arms = out["arms"]
    rows = [
        [
            name,
            fmt(a["accuracy"]),
            " / ".join(f"{s:.3f}" for s in a["per_seed"]),
            "" if a["tokens_per_problem"] is None else f"{a['tokens_per_problem']:.1f}",
        ]
        for name, a in arms.items()
        if not name.endswith(" greedy") or name.startswith("oracle")
    ]
    main = md_table(["arm", "accuracy [95% CI]", "per seed", "completion tokens / problem"], rows)
    fam = md_table(
        ["arm", *DOMAINS],
        [[name, *(f"{a['per_family'][d]:.3f}" for d in DOMAINS)] for name, a in arms.items()],
    )
    cand = md_table(
        ["configuration (validation)", "accuracy", "tokens / problem"],
        [[k, f"{v['accuracy']:.3f}", f"{v['tokens_per_problem']:.1f}"] for k, v in out["candidates_val"].items()],
    )
    lines = [main, "", fam, "", cand, ""]
    d = out["default_vs_best_sc"]
    lines.append(f"default request - best member SC: {fmt(d['difference'])}; error ratio {fmt(d['error_ratio'])}")
    s = out["system_message_effect"]["difference"]
    lines.append(f"system message effect on the default request: {fmt(s)}")
    for k, v in out.items():
        if k.startswith("default_vs_generalist"):
            lines.append(f"{k}: difference {fmt(v['difference'])}")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    members = list(out["member_family_accuracy"])
    grid = np.array([[out["member_family_accuracy"][m][d] for d in DOMAINS] for m in members])
    fig = new_figure(6.5, 0.35 * len(members) + 1.5)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(DOMAINS)), DOMAINS)
    ax.set_yticks(range(len(members)), members)
    for i in range(len(members)):
        for j in range(len(DOMAINS)):
            ax.text(
                j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if grid[i, j] < 0.5 else "k"
            )
    ax.set_title("held-out accuracy per member and family (greedy, levels 1-4)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    path.write_bytes(to_png(fig))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="test problem sets")
    p.add_argument("--n", type=int, default=96, help="test problems per set (multiple of 24 for balance)")
    p.add_argument("--seed", type=int, default=2026, help="seed of the first test set")
    p.add_argument("--val", type=int, default=144, help="validation problems (best member, chosen configuration)")
    p.add_argument("--val-seed", type=int, default=7)
    p.add_argument("--samples", type=int, default=8, help="self-consistency samples")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.1)
    add_common_args(p)
    args = p.parse_args()
    waited = wait_quiet(args.wait_quiet)
    generalists = train_generalists(ROOT / "runs" / "bench-generalists")
    out = asyncio.run(run(args, generalists))
    md = tables(out)
    print(md)
    print(
        f"\nbest member on validation: {out['best_member']}; chosen configuration: {out['chosen']} "
        f"(population defaults hold it: {out['defaults_hold_chosen']})"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(out, RESULTS / "specialists-members.png")
    write_results("specialists", {"args": vars(args), "waited_for_quiet_s": waited, **out, "markdown": md})


if __name__ == "__main__":
    main()
