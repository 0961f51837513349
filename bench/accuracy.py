"""Accuracy on held-out sandbox problems: single members, self-consistency, and the ensemble's vote rules.

One real `ensemble-serve up` server (the embedded default: 8 LoRA members m00..m07), the real `openai`
client, many requests in flight. Problems come from `trainer.tasks.sandbox.generate_problems(..., split="heldout")`,
balanced over the 6 domains x 4 difficulties:

* a VALIDATION set (its own seed) on which every member answers greedily; the member with the best
  validation accuracy is "the best member" (ties: manifest order);
* a TEST set (another seed; prompts that also occur in the validation set are dropped) on which every
  method is reported:
  - every member, greedy (temperature 0);
  - the best member with self-consistency: n=8 samples at temperature 0.7, majority over the extracted
    answers (`ensemble_serve.shared.voting`); sent with `stream: true`, because the non-streaming member path
    returns fewer than n choices for n > 1 (see BENCHMARKS.md);
  - the ensemble, 8 members x 1 chain at temperature 0.7 with `vote` = majority, weighted, cross;
  - the ensemble, 8 members x 1 chain, greedy, majority.
  Sampled methods send `seed` = seed + problem index, the same for every rule, so the vote rules see
  (nearly: batch composition can change float rounding) the same chains. At most --seeded-concurrency (3)
  seeded requests are in flight, so that no seeded prefill is ever chunked: that kills vLLM's CPU engine
  (see `_common.py`).

Correctness is `trainer.tasks.sandbox.verify(problem, returned text)`. Completion tokens per problem come from
the responses' `usage` (for the ensemble: every chain of every member; cross-vote scoring prefills are not
completion tokens and are not counted).

    .venv/bin/python bench/accuracy.py [--n 192] [--val 144] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict

import openai
from _common import (
    EMBEDDED_POPULATION,
    ENSEMBLE_NAME,
    ForeignLoad,
    PromptLength,
    ServerSet,
    add_common_args,
    ask_greedy,
    ask_self_consistency,
    chat,
    md_table,
    member_names,
    others_running,
    seed_is_safe,
    wait_quiet,
    write_results,
)
from tqdm import tqdm

from ensemble_serve.shared.voting import candidate_from_text, vote
from trainer.tasks.sandbox import DOMAINS, Problem, generate_problems, verify


class Runner:
    def __init__(self, client: openai.AsyncOpenAI, args: argparse.Namespace, bar: tqdm):
        self.client, self.args, self.bar = client, args, bar
        self.member_sem = asyncio.Semaphore(args.concurrency)
        self.ensemble_sem = asyncio.Semaphore(max(1, args.concurrency // 8))
        # seeded requests: few enough in flight that no seeded prefill can be chunked (see _common.seed_is_safe)
        self.seeded_sem = asyncio.Semaphore(args.seeded_concurrency)

    async def member(self, model: str, p: Problem) -> dict:
        async with self.member_sem:
            text, tokens = await ask_greedy(self.client, model, p.prompt, self.args.max_tokens)
        self.bar.update()
        return {"text": text, "tokens": tokens, "correct": verify(p, text).correct}

    async def self_consistency(self, model: str, p: Problem, seed: int) -> dict:
        async with self.seeded_sem:
            out = await ask_self_consistency(
                self.client,
                model,
                p.prompt,
                n=self.args.samples,
                temperature=self.args.temperature,
                max_tokens=self.args.max_tokens,
                seed=seed,
            )
        self.bar.update()
        return {**out, "correct": verify(p, out["text"]).correct}

    async def ensemble(self, p: Problem, rule: str, temperature: float, seed: int | None) -> dict:
        extra = {"ensemble": {"vote": rule, "samples_per_member": 1}}
        kw = {} if seed is None else {"seed": seed}
        async with self.ensemble_sem if seed is None else self.seeded_sem:
            r = await self.client.chat.completions.create(
                model=ENSEMBLE_NAME,
                messages=chat(p.prompt),
                max_tokens=self.args.max_tokens,
                temperature=temperature,
                extra_body=extra,
                **kw,
            )
        self.bar.update()
        text = r.choices[0].message.content or ""
        ens = r.model_extra.get("ensemble") or {}
        return {
            "text": text,
            "tokens": r.usage.completion_tokens,
            "answer": ens.get("answer"),
            "agreement": ens.get("agreement"),
            "rule": ens.get("rule"),
            "correct": verify(p, text).correct,
        }


def by_domain(problems: list[Problem], recs: list[dict]) -> dict:
    acc: dict[str, list[bool]] = defaultdict(list)
    for p, r in zip(problems, recs):
        acc[p.domain].append(r["correct"])
        acc["all"].append(r["correct"])
    out = {d: sum(v) / len(v) for d, v in acc.items()}
    tokens = [r["tokens"] for r in recs if r["tokens"] is not None]
    out["tokens_per_problem"] = sum(tokens) / len(tokens) if tokens else float("nan")
    return out


async def bench(args: argparse.Namespace) -> dict:
    val = generate_problems(args.val, args.val_seed, split="heldout")
    val_prompts = {p.prompt for p in val}
    test_all = generate_problems(args.n, args.seed, split="heldout")
    test = [p for p in test_all if p.prompt not in val_prompts]
    members = member_names()
    longest = max(map(PromptLength(), (p.prompt for p in test)))
    if not seed_is_safe(longest, 8 * args.seeded_concurrency):
        raise SystemExit(
            f"--seeded-concurrency {args.seeded_concurrency} is unsafe for {longest}-token prompts: seeded prefills "
            "could be chunked, which kills vLLM's CPU engine (see bench/_common.py)"
        )
    n_sampled = 4  # self-consistency + 3 sampled ensemble rules
    total = len(val) * len(members) + len(test) * len(members) + len(test) * (n_sampled + 1)
    out: dict = {
        "val_problems": len(val),
        "test_problems": len(test),
        "test_dropped_overlap": len(test_all) - len(test),
        "phases_s": {},
    }
    manifest = json.loads((EMBEDDED_POPULATION / "population.json").read_text())
    out["manifest_fitness"] = {m["name"]: m["fitness"] for m in manifest["members"]}
    out["manifest_voting_weights"] = manifest.get("voting_weights")
    with ServerSet() as servers:
        server = servers.start_ensemble(gpu_memory_utilization=args.gpu_memory_utilization)
        print(f"ensemble-serve up in {server.started_s:.0f}s", file=sys.stderr)
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=900)
        load = ForeignLoad([server])
        out["other_benchmark_processes_at_start"] = others_running([server])
        with tqdm(total=total, desc="accuracy", unit="req") as bar:
            run = Runner(client, args, bar)

            async def phase(name: str, coros: list) -> list:
                bar.set_postfix(phase=name)
                t0 = time.perf_counter()
                res = await asyncio.gather(*coros)
                out["phases_s"][name] = time.perf_counter() - t0
                return list(res)

            val_recs = {m: await phase(f"val {m}", [run.member(m, p) for p in val]) for m in members}
            val_acc = {m: sum(r["correct"] for r in recs) / len(recs) for m, recs in val_recs.items()}
            best = max(members, key=lambda m: (val_acc[m], -members.index(m)))
            out["val_accuracy"], out["best_member"] = val_acc, best

            methods: dict[str, list[dict]] = {}
            for m in members:
                methods[f"{m} greedy"] = await phase(f"test {m}", [run.member(m, p) for p in test])
            seeds = [args.sample_seed + i for i in range(len(test))]
            methods[f"best ({best}) self-consistency n={args.samples}, T={args.temperature}"] = await phase(
                "self-consistency", [run.self_consistency(best, p, s) for p, s in zip(test, seeds)]
            )
            for rule in ("majority", "weighted", "cross"):
                methods[f"ensemble 8x1 {rule}, T={args.temperature}"] = await phase(
                    f"ensemble {rule}", [run.ensemble(p, rule, args.temperature, s) for p, s in zip(test, seeds)]
                )
            methods["ensemble 8x1 majority, greedy"] = await phase(
                "ensemble greedy", [run.ensemble(p, "majority", 0.0, None) for p in test]
            )
        out["foreign_cpu_s_total"] = load.foreign_s()
        await client.close()

    # consistency check: the greedy ensemble's answer vs a client-side majority over the members' greedy chains
    agree = 0
    for i, _p in enumerate(test):
        cands = [candidate_from_text(m, 0, methods[f"{m} greedy"][i]["text"], 0, "auto") for m in members]
        agree += vote(cands, "majority").answer == methods["ensemble 8x1 majority, greedy"][i]["answer"]
    out["greedy_ensemble_matches_client_majority"] = agree / len(test)
    out["diversity"] = diversity(test, members, methods)
    base = methods[f"{best} greedy"]
    for recs in methods.values():  # paired against the best member's greedy answers
        for r, b in zip(recs, base):
            r["vs_best_greedy"] = int(r["correct"]) - int(b["correct"])
    out["methods"] = {k: {"summary": by_domain(test, v), "records": v} for k, v in methods.items()}
    out["test_domains"] = {d: sum(p.domain == d for p in test) for d in DOMAINS}
    return out


def diversity(test: list[Problem], members: list[str], methods: dict[str, list[dict]]) -> dict:
    """How different the members' greedy answers are: an ensemble can only help where they differ."""
    answers = {
        m: [candidate_from_text(m, 0, r["text"], 0, "auto").answer for r in methods[f"{m} greedy"]] for m in members
    }
    correct = {m: [r["correct"] for r in methods[f"{m} greedy"]] for m in members}
    pairs = [(a, b) for i, a in enumerate(members) for b in members[i + 1 :]]
    same = [sum(x == y for x, y in zip(answers[a], answers[b])) / len(test) for a, b in pairs]
    n = len(test)
    return {
        "mean_pairwise_same_answer": sum(same) / len(same),
        "all_8_same_answer": sum(len({answers[m][i] for m in members}) == 1 for i in range(n)) / n,
        "oracle_any_member_correct": sum(any(correct[m][i] for m in members) for i in range(n)) / n,
        "all_members_correct": sum(all(correct[m][i] for m in members) for i in range(n)) / n,
    }


def table(out: dict) -> str:
    domains = list(DOMAINS)
    headers = ["method", "val acc", *domains, "all", "tokens/problem", "vs best greedy: +right / -wrong"]
    rows = []
    best = out["best_member"]
    for name, m in out["methods"].items():
        s = m["summary"]
        member = name.split()[0]
        val = f"{out['val_accuracy'][member]:.3f}" if member in out["val_accuracy"] else ""
        label = f"**{name}** (best on val)" if member == best and name.endswith("greedy") else name
        rows.append(
            [
                label,
                val,
                *(f"{s.get(d, float('nan')):.3f}" for d in domains),
                f"{s['all']:.3f}",
                f"{s['tokens_per_problem']:.1f}",
                "+{} / -{}".format(*(sum(r["vs_best_greedy"] == k for r in m["records"]) for k in (1, -1))),
            ]
        )
    return md_table(headers, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=192, help="test problems (multiple of 24 for balance)")
    p.add_argument("--seed", type=int, default=2026, help="seed of the test problems")
    p.add_argument("--val", type=int, default=144, help="validation problems (to choose the best member)")
    p.add_argument("--val-seed", type=int, default=7, help="seed of the validation problems")
    p.add_argument("--sample-seed", type=int, default=1000, help="request seed of problem 0 for sampled methods")
    p.add_argument("--samples", type=int, default=8, help="self-consistency samples")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument(
        "--seeded-concurrency", type=int, default=3, help="seeded requests in flight (each 8 sequences; see _common.py)"
    )
    p.add_argument("--concurrency", type=int, default=32, help="member requests in flight (ensemble: this / 8)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.1)
    add_common_args(p)
    args = p.parse_args()
    waited = wait_quiet(args.wait_quiet)
    out = asyncio.run(bench(args))
    md = table(out)
    print(md)
    print(
        f"\nbest member on validation: {out['best_member']} ({out['val_accuracy'][out['best_member']]:.3f}); "
        f"test problems {out['test_problems']} (dropped {out['test_dropped_overlap']} overlapping validation); "
        f"greedy ensemble == client majority of greedy members: {out['greedy_ensemble_matches_client_majority']:.3f}"
    )
    print("member diversity (greedy, test): " + ", ".join(f"{k}: {v:.3f}" for k, v in out["diversity"].items()))
    print("phase seconds: " + ", ".join(f"{k}: {v:.0f}" for k, v in out["phases_s"].items()))
    write_results("accuracy", {"args": vars(args), "waited_for_quiet_s": waited, **out, "markdown": md})


if __name__ == "__main__":
    main()
