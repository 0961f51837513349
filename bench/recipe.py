"""Which population recipe beats the generalist trained on the same data for the same steps? (issue 23)

For each seed and each recipe (the Branch-Train-Merge seed share s, and how the members' data is cut):

1. TRAIN (`ensemble-train init`, configs/init.yaml scaled by --members and --steps): M members on the
   sandbox substrate, a budget of M x steps optimizer steps in all. With s > 0 a shared seed trains first on
   every family for s of the budget, the members continue from it for the rest, and the seed stays a member.
   Then the population's own preparation, as `make embedded` does it: `eval --update-manifest`, the
   `sigmoid_floor` router and the ground-truth reliability table (configs/eval.yaml, configs/router.yaml).
2. CHOOSE on a validation set (its own seed): each candidate rule for the default request (routed votes,
   calibrated or majority, an unrouted calibrated vote, the routed mixture with self-consistency), every one
   at most --samples chains a problem; the best on validation is the recipe's default rule. The test never
   chooses anything.
3. TEST (held-out problems, levels 1-4, the six families balanced, validation prompts dropped): the chosen
   rule, and the best member (by the manifest's held-out accuracy) with self-consistency.

Per seed, the baselines: one generalist LoRA trained on the union of the members' data (the family cut's M
streams, interleaved) for the same M x steps, at rank r and at rank M x r, served by vLLM's own server, with
self-consistency at --samples. Every arm reports its training cost (optimizer steps, target tokens) and its
inference cost (completion tokens per problem). Accuracy: 95% percentile bootstrap intervals; against each
generalist, the paired difference and error ratio. Populations and generalists are cached under
runs/bench-recipe/ by their config.

    .venv/bin/python bench/recipe.py [--seeds 3] [--shares 0,0.25,0.5,0.75] [--cuts family,level,shard,seed]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import openai
from _common import RESULTS, ServerSet, add_common_args, ask_self_consistency, md_table, wait_quiet, write_results
from specialists import generalist_lr, generalist_streams, interval, paired
from tqdm import tqdm

from ensemble_serve.shared.cliutil import load_config
from ensemble_serve.shared.embedded import EMBEDDED_SUBSTRATE
from ensemble_serve.shared.population import load_population
from ensemble_serve.testing.servers import ROOT
from trainer.models.config import InitConfig
from trainer.models.init_population import init_population, member_plan, warm_up_member
from trainer.plotting import new_figure, to_png
from trainer.tasks.sandbox import Problem, generate_problems, verify

WORK = ROOT / "runs" / "bench-recipe"
BIN = Path(sys.executable).parent
LEVELS = [1, 2, 3, 4]


def candidates(members: int, samples: int) -> dict[str, dict[str, Any]]:
    """The default request's candidate rules, each at most `samples` chains a problem."""
    out: dict[str, dict[str, Any]] = {}
    for k in (1, 2, 4):
        if k <= members:
            out[f"router top-{k} x {samples // k}, calibrated"] = {
                "members": k,
                "samples_per_member": samples // k,
                "vote": "calibrated",
            }
    out["router top-2, majority"] = {"members": 2, "samples_per_member": samples // 2, "vote": "majority"}
    every = min(members, samples)
    out[f"no router, {every} x {samples // every}, calibrated"] = {
        "route": False,
        "members": every,
        "samples_per_member": samples // every,
        "vote": "calibrated",
    }
    out[f"routed mixture x {samples}"] = {"mode": "mixture", "samples_per_member": samples, "vote": "majority"}
    return out


# ------------------------------------------------------------------ training


def init_config(args: argparse.Namespace, seed: int, share: float, cut: str, out: Path) -> InitConfig:
    return load_config(
        InitConfig,
        ROOT / "configs" / "init.yaml",
        {
            "base": EMBEDDED_SUBSTRATE,
            "out": out,
            "members": args.members,
            "warmup_steps": args.steps,
            "seed": 1000 * seed,
            "seed_share": share,
            "cut": cut,
            "overwrite": True,
        },
    )


def run_cli(*argv: str) -> None:
    proc = subprocess.run([str(BIN / "ensemble-train"), *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ensemble-train {argv[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def population_for(args: argparse.Namespace, seed: int, share: float, cut: str) -> dict[str, Any]:
    """Train (or reuse) one recipe's population and prepare it: held-out accuracy, router, reliability table."""
    out = WORK / f"seed{seed}-s{share:g}-{cut}-m{args.members}x{args.steps}"
    cfg = init_config(args, seed, share, cut, out)
    done = out / ".prepared"
    t0 = time.perf_counter()
    if not done.is_file() or not same_recipe(json.loads(done.read_text()).get("config"), cfg):
        init_population(cfg)
        train_s = time.perf_counter() - t0
        run_cli("eval", "--config", str(ROOT / "configs/eval.yaml"), "--population", str(out), "--update-manifest")
        run_cli("router", "--config", str(ROOT / "configs/router.yaml"), "--population", str(out))
        run_cli("calibrate", "--population", str(out), "--labels", "ground_truth")
        done.write_text(json.dumps({"config": cfg.model_dump_json(), "train_s": train_s}))
    manifest = load_population(out).manifest
    best = max(manifest.members, key=lambda m: (m.fitness if m.fitness is not None else -1.0, m.name)).name
    return {
        "path": out,
        "members": [m.name for m in manifest.members],
        "best": best,
        "training_cost": manifest.training_cost,
        "train_s": json.loads(done.read_text())["train_s"],
    }


def same_recipe(stored: str | None, cfg: Any) -> bool:
    """Whether a cached population was made by this config; where the checkout lies (base, out) is no part of it."""
    if stored is None:
        return False
    where = ("base", "out")
    old = {k: v for k, v in json.loads(stored).items() if k not in where}
    return old == {k: v for k, v in json.loads(cfg.model_dump_json()).items() if k not in where}


def generalists_for(args: argparse.Namespace, seed: int) -> dict[str, dict[str, Any]]:
    """Rank r and rank M x r generalists, each M x steps on the union of the members' data; cached by config."""
    cfg0 = init_config(args, seed, 0.0, "family", WORK / "unused")
    plan = member_plan(cfg0)
    r, m = plan[0]["rank"], len(plan)
    steps = m * args.steps
    made = {}
    for rank in (r, m * r):
        rank_lr = generalist_lr(plan, rank)
        name = f"generalist-r{rank}"
        out = WORK / f"seed{seed}-{name}-{steps}-lr{rank_lr:.5f}"
        cost_file = out / "training_cost.json"
        if not cost_file.is_file():
            cfg = cfg0.model_copy(update={"warmup_steps": steps})
            spec = {"name": name, "seed": 1000 * seed + 7, "rank": rank, "alpha": 2.0 * rank, "dropout": 0.0}
            cost = {"steps": steps, "examples": 0, "tokens": 0, "target_tokens": 0}
            with tqdm(total=steps, desc=name, unit="step") as bar:
                t0 = time.perf_counter()
                loss = warm_up_member(
                    cfg,
                    {**spec, "lr": rank_lr},
                    generalist_streams(cfg, plan, f"generalist:{seed}"),
                    out,
                    "sandbox-substrate",
                    bar,
                    cost,
                )
            cost_file.write_text(json.dumps({**cost, "train_s": time.perf_counter() - t0, "final_loss": loss}))
        made[name] = {"rank": rank, "lr": rank_lr, "path": out, "training_cost": json.loads(cost_file.read_text())}
    return made


# ------------------------------------------------------------------ requests


async def ask_ensemble(
    client: openai.AsyncOpenAI, model: str, p: Problem, options: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    try:
        r = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": p.prompt}],
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            extra_body={"ensemble": options},
        )
    except openai.APIStatusError as e:  # a rule this population cannot run (said in the results, never chosen)
        return {"correct": False, "tokens": 0, "error": f"{e.status_code}: {e.message}"}
    text = r.choices[0].message.content or ""
    return {"correct": verify(p, text).correct, "tokens": r.usage.completion_tokens}


async def ask_sc(client: openai.AsyncOpenAI, model: str, p: Problem, args: argparse.Namespace) -> dict[str, Any]:
    out = await ask_self_consistency(
        client, model, p.prompt, n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens
    )
    return {"correct": verify(p, out["text"]).correct, "tokens": out["tokens"]}


async def gather(coros: Sequence[Any], concurrency: int, bar: tqdm) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(concurrency)

    async def one(c: Any) -> dict[str, Any]:
        async with sem:
            res = await c
        bar.update()
        return res

    return list(await asyncio.gather(*(one(c) for c in coros)))


async def evaluate_population(
    args: argparse.Namespace, servers: ServerSet, pop: dict[str, Any], val: list[Problem], test: list[Problem]
) -> dict[str, Any]:
    name = "recipe"
    server = servers.start_ensemble("--population", str(pop["path"]), "--served-model-name", name)
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=900)
    cands = candidates(len(pop["members"]), args.samples)
    try:
        with tqdm(total=len(val) * len(cands) + 2 * len(test), desc=pop["path"].name, unit="req") as bar:
            on_val = {}
            for label, opts in cands.items():
                recs = await gather([ask_ensemble(client, name, p, opts, args) for p in val], args.concurrency, bar)
                errors = sorted({r["error"] for r in recs if "error" in r})
                on_val[label] = {
                    "accuracy": float(np.mean([r["correct"] for r in recs])),
                    "tokens_per_problem": float(np.mean([r["tokens"] for r in recs])),
                    **({"errors": errors} if errors else {}),
                }
            usable = [k for k in cands if "errors" not in on_val[k]]
            chosen = max(usable, key=lambda k: (on_val[k]["accuracy"], -on_val[k]["tokens_per_problem"]))
            default = await gather(
                [ask_ensemble(client, name, p, cands[chosen], args) for p in test], args.concurrency, bar
            )
            best = await gather([ask_sc(client, pop["best"], p, args) for p in test], args.concurrency, bar)
    finally:
        await client.close()
        servers.stop(server)
    return {"validation": on_val, "chosen": chosen, "options": cands[chosen], "default": default, "best_sc": best}


async def evaluate_generalists(
    args: argparse.Namespace, servers: ServerSet, gens: dict[str, dict[str, Any]], test: list[Problem]
) -> dict[str, list[dict[str, Any]]]:
    max_rank = max(g["rank"] for g in gens.values())
    vllm = servers.start_vllm(
        name="vllm-generalists",
        lora_modules=[f"{n}={g['path']}" for n, g in gens.items()],
        max_lora_rank=next(x for x in (8, 16, 32, 64, 128, 256, 320, 512) if x >= max_rank),
    )
    client = openai.AsyncOpenAI(base_url=vllm.base_url, api_key="none", max_retries=0, timeout=900)
    out = {}
    try:
        with tqdm(total=len(test) * len(gens), desc="generalists", unit="req") as bar:
            for n in gens:
                out[n] = await gather([ask_sc(client, n, p, args) for p in test], args.concurrency, bar)
    finally:
        await client.close()
        servers.stop(vllm)
    return out


# ------------------------------------------------------------------ the run


def summary_row(recs: list[dict[str, Any]]) -> dict[str, Any]:
    acc, lo, hi = interval([r["correct"] for r in recs])
    return {"accuracy": [acc, lo, hi], "tokens_per_problem": float(np.mean([r["tokens"] for r in recs]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--shares", default="0,0.25,0.5,0.75", help="seed shares s (comma-separated)")
    ap.add_argument("--cuts", default="family,level,shard,seed", help="member cuts (comma-separated)")
    ap.add_argument(
        "--cuts-at",
        type=float,
        default=0.5,
        help="the seed share at which the cuts other than `family` are run (the shares sweep uses `family`)",
    )
    ap.add_argument("--members", type=int, default=6, help="members M (the seed comes on top when s > 0)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per member: a budget of M x steps")
    ap.add_argument("--val", type=int, default=96, help="validation problems (choose the default rule)")
    ap.add_argument("--n", type=int, default=96, help="test problems per seed (a multiple of 24 for balance)")
    ap.add_argument("--samples", type=int, default=8, help="chains a problem (self-consistency budget)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--name", default="recipe", help="results: bench/results/NAME.json and NAME.png")
    add_common_args(ap)
    args = ap.parse_args()
    shares = [float(x) for x in args.shares.split(",")]
    cuts = args.cuts.split(",")
    recipes = [(s, "family") for s in shares] + [(args.cuts_at, c) for c in cuts if c != "family"]
    waited = wait_quiet(args.wait_quiet)
    WORK.mkdir(parents=True, exist_ok=True)

    val = generate_problems(args.val, "recipe-val", split="heldout", difficulties=LEVELS)
    seen = {p.prompt for p in val}
    out: dict[str, Any] = {"args": vars(args), "waited_for_quiet_s": waited, "seeds": {}}
    arms: dict[str, list[dict[str, Any]]] = {}
    costs: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    with ServerSet() as servers:
        for seed in range(args.seeds):
            test = [p for p in generate_problems(args.n, 2026 + seed, split="heldout", difficulties=LEVELS)]
            test = [p for p in test if p.prompt not in seen]
            per_seed: dict[str, Any] = {"test_problems": len(test), "recipes": {}}
            gens = generalists_for(args, seed)
            for n, recs in asyncio.run(evaluate_generalists(args, servers, gens, test)).items():
                label = f"generalist rank {gens[n]['rank']} SC@{args.samples}"
                arms.setdefault(label, []).extend(recs)
                costs[label] = gens[n]["training_cost"]
            for share, cut in recipes:
                pop = population_for(args, seed, share, cut)
                res = asyncio.run(evaluate_population(args, servers, pop, val, test))
                label = f"s={share:g}, cut={cut}"
                arms.setdefault(f"{label}: default rule", []).extend(res["default"])
                arms.setdefault(f"{label}: best member SC@{args.samples}", []).extend(res["best_sc"])
                costs[f"{label}: default rule"] = pop["training_cost"]
                per_seed["recipes"][label] = {
                    "chosen": res["chosen"],
                    "options": res["options"],
                    "validation": res["validation"],
                    "best_member": pop["best"],
                    "training_cost": pop["training_cost"],
                    "train_s": pop["train_s"],
                    "default": summary_row(res["default"]),
                }
            out["seeds"][seed] = per_seed
            # written after every seed (complete: false until the last), so a long sweep cut short keeps its seeds
            summarise(args, out, arms, costs, t_start, complete=seed == args.seeds - 1)


def summarise(
    args: argparse.Namespace,
    out: dict[str, Any],
    arms: dict[str, list[dict[str, Any]]],
    costs: dict[str, dict[str, Any]],
    t_start: float,
    complete: bool,
) -> None:
    """The pooled arms, the error ratios against the generalists, the tables and the plot, written as NAME."""
    out["complete"] = complete
    out["minutes"] = (time.perf_counter() - t_start) / 60
    out["arms"] = {label: {**summary_row(recs), "training_cost": costs.get(label)} for label, recs in arms.items()}
    gen_labels = [k for k in arms if k.startswith("generalist")]
    out["against_generalists"] = {
        label: {g: paired([r["correct"] for r in arms[label]], [r["correct"] for r in arms[g]]) for g in gen_labels}
        for label in arms
        if label.endswith("default rule")
    }
    md = tables(out, gen_labels)
    if complete:
        print(md)
    out["markdown"] = md
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(out, RESULTS / f"{args.name}.png")
    write_results(args.name, json.loads(json.dumps(out, default=str)))


def fmt(x: Sequence[float]) -> str:
    return f"{x[0]:.3f} [{x[1]:.3f}, {x[2]:.3f}]"


def tables(out: dict[str, Any], gen_labels: list[str]) -> str:
    rows = []
    for label, a in out["arms"].items():
        cost = a["training_cost"] or {}
        vs = out["against_generalists"].get(label, {})
        rows.append(
            [
                label,
                fmt(a["accuracy"]),
                *(fmt(vs[g]["error_ratio"]) if g in vs else "" for g in gen_labels),
                f"{a['tokens_per_problem']:.1f}",
                cost.get("steps", ""),
                cost.get("target_tokens", ""),
            ]
        )
    head = ["arm", "accuracy [95% CI]", *(f"error ratio vs {g}" for g in gen_labels)]
    main = md_table([*head, "completion tokens / problem", "training steps", "training target tokens"], rows)
    chosen = md_table(
        ["seed", "recipe", "chosen rule (validation)", "validation accuracy", "test accuracy"],
        [
            [seed, label, r["chosen"], f"{r['validation'][r['chosen']]['accuracy']:.3f}", fmt(r["default"]["accuracy"])]
            for seed, s in out["seeds"].items()
            for label, r in s["recipes"].items()
        ],
    )
    return main + "\n\n" + chosen


def plot(out: dict[str, Any], path: Path) -> None:
    labels = list(out["arms"])
    acc = np.array([out["arms"][k]["accuracy"] for k in labels])
    fig = new_figure(7.5, 0.32 * len(labels) + 1.4)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(labels))
    colors = [
        "tab:gray" if k.startswith("generalist") else "tab:blue" if "default" in k else "tab:orange" for k in labels
    ]
    ax.barh(y, acc[:, 0], xerr=[acc[:, 0] - acc[:, 1], acc[:, 2] - acc[:, 0]], color=colors, capsize=2)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("held-out accuracy (95% bootstrap interval), equal chains a problem")
    ax.set_title("population recipes against the compute-matched generalists")
    path.write_bytes(to_png(fig))


if __name__ == "__main__":
    main()
