"""The real model's population against every alternative a user has (issue 22's targets).

    python bench/real.py [--population DIR] [--per-cell 4] [--latency-prompts 16]
    python bench/real.py --population DIR --only-ensemble --baseline-rows bench/results/real_rows.json --name NAME

All on the natural tasks' held-out problems (the stream bench/real_base.py uses, minus any prompt of the
dev split the population was evaluated and routed on), one chat turn each, temperature 0.7,
max_tokens 256, through the real server (`ensemble-serve up`, vLLM CPU engine) and the openai client:

- `ensemble`: the default request, no `ensemble` options (the population's own defaults apply);
- `ensemble + system`: the same with a system message;
- `base SC@8`: the base model, n=8, majority of the extracted answers (the `natural` mode, as the server);
- `best member SC@8`: the member with the best dev accuracy (manifest fitness), n=8;
- `router top-1 SC@8`: `ensemble: {"route": true, "members": 1, "samples_per_member": 8}` (the router picks one member);
- `merge cat|ties|svd SC@8`: PEFT `add_weighted_adapter` of all members, served as one adapter, n=8;
- `generalist r|N*r SC@8`: one adapter trained on the members' data for their total steps, n=8.

The baselines' adapters are served by further servers (`--model BASE --lora-modules ...`), one per LoRA
rank: vLLM sizes its LoRA buffers by the engine's `--max-lora-rank`, and a rank-8 adapter served beside a
rank-64 one was far slower on the CPU. Rows are written to bench/results/real_rows.json as each
condition ends.

`--only-ensemble` asks only the population (its default request, its best member and router top-1); with
`--baseline-rows` the baselines' rows of an earlier run on the same problems (same `--per-cell` and
`--exclude`, checked by the problems' families) are compared with it, paired by problem: another population
against the same generalists without serving them again. `--name` names the result files.
Accuracy with 95% Wilson intervals; differences against the ensemble as paired bootstrap 95% intervals
(scipy); completion tokens per problem; the share of chains with an answer. Latency: `--latency-prompts`
prompts sent one at a time, the ensemble's default request and the base's n=8 request interleaved, p50
of each and their ratio. Results: bench/results/real.json; tables printed for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, ServerSet, machine, md_table, write_json
from scipy import stats
from specialists import paired

from ensemble_serve.shared.embedded import EMBEDDED_REAL_POPULATION, embedded_real_gguf
from ensemble_serve.shared.gguf import cached_conversion
from ensemble_serve.shared.population import load_population
from ensemble_serve.shared.voting import candidate_from_text, vote
from ensemble_serve.shared.voting.answers import answers_equal
from trainer.tasks.natural import NATURAL_FAMILIES, NATURAL_LEVELS, natural_problems
from trainer.tasks.sandbox import Problem, load_jsonl

SEED = "bench-real-heldout"  # bench/real_base.py's stream
SYSTEM = "You are a careful assistant. Answer the question."
TEMPERATURE = 0.7
MAX_TOKENS = 256
K = 8
MAX_SERVED_RANK = 16  # adapters above it are merged into the base for serving (see main)
# the request the population's defaults replaced, if they differ (issue 22's first defaults)
ALL_MEMBERS = {"route": False, "samples_per_member": 1, "vote": "majority"}


def test_problems(per_cell: int, exclude: Sequence[Path]) -> list[Problem]:
    problems = natural_problems(per_cell * len(NATURAL_FAMILIES) * len(NATURAL_LEVELS), SEED, "heldout")
    seen = {p.prompt for f in exclude if f.is_file() for p in load_jsonl(f)}
    return [p for p in problems if p.prompt not in seen]


def merge_members(base: Path, population: Path, out: Path) -> dict[str, Path]:
    """PEFT merges of every member (cat and svd: weights 1/N; ties: weights 1, density 0.5), saved as adapters."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pop = load_population(population)
    names = pop.names
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, str(pop.member_dir(names[0])), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(str(pop.member_dir(n)), adapter_name=n)
    avg = [1.0 / len(names)] * len(names)
    plans = {
        "merge_cat": {"combination_type": "cat", "weights": avg},
        "merge_ties": {"combination_type": "ties", "weights": [1.0] * len(names), "density": 0.5},
        "merge_svd": {"combination_type": "svd", "weights": avg},
    }
    folders = {}
    for name, plan in plans.items():
        peft.add_weighted_adapter(adapters=names, adapter_name=name, **plan)
        peft.save_pretrained(str(out), selected_adapters=[name])
        folder = out / name
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = pop.manifest.base_model.name
        (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        folders[name] = folder
    return folders


def merged_model(base: Path, adapter: Path, out: Path) -> Path:
    """`adapter` merged into the base's weights (PEFT `merge_and_unload`, fp32), saved as a plain HF folder (the
    base's tokenizer and chat template kept): the same function as serving the adapter, at the base's speed."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    return out


def vote_chains(texts: Sequence[tuple[str, bool]]) -> tuple[str | None, int]:
    """The majority answer of (text, finished) chains under `natural`, with the voting code the server uses
    (a chain cut off at max_tokens counts only with a marker), and how many chains had an answer."""
    cands = [candidate_from_text("sc", i, text, 0, "natural", finished=done) for i, (text, done) in enumerate(texts)]
    return vote(cands, "majority").answer, sum(c.status == "ok" for c in cands)


async def run_condition(
    server: Any,
    model: str,
    problems: Sequence[Problem],
    kind: str,
    concurrency: int,
    samples_per_member: int = 1,
    options: dict[str, Any] | None = None,
) -> list[dict]:
    """One request per problem; `kind`: "ensemble" (with `options` as its `ensemble` object, if given),
    "ensemble+system", "sc" (n=K), "routed" (top-1 x K).

    Each row: the family, whether the answer is right, completion tokens, seconds, and chains / chains
    with an answer (for the ensemble: members x `samples_per_member` chains, less those in `failed`).
    """
    sem = asyncio.Semaphore(concurrency)
    client = server.async_client(timeout=1800)  # one per event loop: each condition runs its own

    async def one(p: Problem) -> dict:
        messages = [{"role": "user", "content": p.prompt}]
        if kind == "ensemble+system":
            messages.insert(0, {"role": "system", "content": SYSTEM})
        extra: dict[str, Any] = {}
        if kind == "routed":
            extra["extra_body"] = {"ensemble": {"route": True, "members": 1, "samples_per_member": K}}
        elif options:
            extra["extra_body"] = {"ensemble": options}
        async with sem:
            t0 = time.perf_counter()
            r = await client.chat.completions.create(
                model=model,
                messages=messages,
                temperature=TEMPERATURE,
                max_tokens=MAX_TOKENS,
                n=K if kind == "sc" else 1,
                **extra,
            )
            seconds = time.perf_counter() - t0
        if kind == "sc":
            answer, found = vote_chains([(c.message.content or "", c.finish_reason != "length") for c in r.choices])
            chains = len(r.choices)
        else:
            info = (r.model_extra or {}).get("ensemble") or {}
            answer = info.get("answer")
            spm = K if kind == "routed" else int((options or {}).get("samples_per_member", samples_per_member))
            chains = len(info.get("members") or []) * spm
            found = chains - len(info.get("failed") or [])
        return {
            "domain": p.domain,
            "correct": bool(answer is not None and answers_equal(answer, p.answer)),
            "tokens": r.usage.completion_tokens,
            "seconds": round(seconds, 3),
            "chains": chains,
            "found": found,
        }

    try:
        return list(await asyncio.gather(*(one(p) for p in problems)))
    finally:
        await client.close()


def wilson(k: int, n: int) -> tuple[float, float]:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return round(ci.low, 3), round(ci.high, 3)


def paired_diff(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
    """mean(a - b) with a paired bootstrap 95% interval."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if np.all(d == d[0]):
        return {"mean": round(float(d.mean()), 3), "low": round(float(d[0]), 3), "high": round(float(d[0]), 3)}
    ci = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=5000, rng=np.random.default_rng(0))
    return {
        "mean": round(float(d.mean()), 3),
        "low": round(float(ci.confidence_interval.low), 3),
        "high": round(float(ci.confidence_interval.high), 3),
    }


def latency(client: Any, ensemble: str, base: str, problems: Sequence[Problem]) -> dict[str, Any]:
    """Requests one at a time, interleaved: the ensemble's default request and the base's n=K request."""
    times: dict[str, list[float]] = {"ensemble": [], "base_sc": []}
    for p in problems:
        for name, model, n in (("ensemble", ensemble, 1), ("base_sc", base, K)):
            t0 = time.perf_counter()
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": p.prompt}],
                temperature=TEMPERATURE,
                max_tokens=MAX_TOKENS,
                n=n,
            )
            times[name].append(time.perf_counter() - t0)
    p50 = {k: statistics.median(v) for k, v in times.items()}
    return {"p50_s": {k: round(v, 3) for k, v in p50.items()}, "ratio": round(p50["ensemble"] / p50["base_sc"], 3)}


def summarise(name: str, rows: list[dict], reference: list[dict] | None) -> dict[str, Any]:
    k = sum(r["correct"] for r in rows)
    out: dict[str, Any] = {
        "accuracy": round(k / len(rows), 4),
        "ci95": wilson(k, len(rows)),
        "tokens_per_problem": round(sum(r["tokens"] for r in rows) / len(rows), 1),
        "per_family": {
            f: round(
                sum(r["correct"] for r in rows if r["domain"] == f) / max(1, sum(r["domain"] == f for r in rows)), 3
            )
            for f in NATURAL_FAMILIES
        },
    }
    out["coverage"] = round(sum(r["found"] for r in rows) / max(1, sum(r["chains"] for r in rows)), 4)
    out["coverage_per_family"] = {
        f: round(
            sum(r["found"] for r in rows if r["domain"] == f)
            / max(1, sum(r["chains"] for r in rows if r["domain"] == f)),
            3,
        )
        for f in NATURAL_FAMILIES
    }
    if reference is not None:
        ours, theirs = [r["correct"] for r in reference], [r["correct"] for r in rows]
        out["ensemble_minus_this"] = paired_diff(ours, theirs)
        ratio = paired(ours, theirs)["error_ratio"]  # the ensemble's error / this one's, paired bootstrap
        out["error_ratio"] = {"mean": round(ratio[0], 3), "low": round(ratio[1], 3), "high": round(ratio[2], 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--population", type=Path, default=None, help="default: the embedded real population")
    ap.add_argument(
        "--generalists",
        type=Path,
        nargs="*",
        default=[Path("runs/real/generalist-r8"), Path("runs/real/generalist-r64")],
    )
    ap.add_argument(
        "--exclude",
        type=Path,
        nargs="*",
        default=[Path("runs/real/dev.jsonl")],
        help="JSONL files whose prompts are left out of the test (the split the population was evaluated and routed on)",
    )
    ap.add_argument("--per-cell", type=int, default=4)
    ap.add_argument("--latency-prompts", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument(
        "--only-ensemble", action="store_true", help="ask only the population (no base, merges, generalists)"
    )
    ap.add_argument(
        "--baseline-rows", type=Path, default=None, help="an earlier run's rows file: its baselines join the report"
    )
    ap.add_argument("--name", default="real", help="results: bench/results/NAME.json and NAME_rows.json")
    ap.add_argument(
        "--from-rows",
        action="store_true",
        help="no requests: summarise bench/results/NAME_rows.json (the last run's rows, and the baselines of "
        "--baseline-rows; latency from NAME.json)",
    )
    args = ap.parse_args()

    base = cached_conversion(embedded_real_gguf())
    population = args.population or EMBEDDED_REAL_POPULATION
    pop = load_population(population)
    problems = test_problems(args.per_cell, args.exclude)
    best = max(pop.manifest.members, key=lambda m: (m.fitness if m.fitness is not None else -1.0, m.name)).name
    spm = int((pop.manifest.ensemble_defaults or {}).get("samples_per_member", 1))
    print(f"{len(problems)} test problems; best member by dev accuracy: {best}")
    if args.from_rows:
        saved = json.loads((RESULTS / f"{args.name}_rows.json").read_text())
        old = (
            json.loads((RESULTS / f"{args.name}.json").read_text()) if (RESULTS / f"{args.name}.json").is_file() else {}
        )
        rows = saved["rows"]
        if args.baseline_rows is not None:
            rows.update(earlier_baselines(args.baseline_rows, problems, rows))
        report(args, problems, best, saved["seconds"], rows, old.get("latency"))
        return

    results: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-real-"))
    try:
        with ServerSet() as servers:
            extra = ["--embedded", "real"] if args.population is None else ["--population", str(population)]
            server = servers.start_ensemble(*extra, name="ensemble-real", timeout=600)
            models = [m.id for m in server.client().models.list().data]
            ensemble, base_name = models[0], pop.manifest.base_model.name
            conditions: list[tuple[str, str, str, dict[str, Any] | None]] = [("ensemble", ensemble, "ensemble", None)]
            every = {**ALL_MEMBERS, "members": len(pop.names)}  # a count: the defaults' `members` would apply
            if not args.only_ensemble:
                conditions.append(("ensemble + system", ensemble, "ensemble+system", None))
                if (pop.manifest.ensemble_defaults or {}) != every:
                    conditions.append(("ensemble, every member x1, no router", ensemble, "ensemble", every))
                conditions.append(("base SC@8", base_name, "sc", None))
            conditions += [
                (f"best member SC@8 ({best})", best, "sc", None),
                ("router top-1 SC@8", ensemble, "routed", None),
            ]
            for label, model, kind, options in conditions:
                t0 = time.perf_counter()
                results[label] = asyncio.run(
                    run_condition(server, model, problems, kind, args.concurrency, spm, options)
                )
                seconds[label] = round(time.perf_counter() - t0, 1)
                print(f"{label}: {sum(r['correct'] for r in results[label])}/{len(problems)} in {seconds[label]} s")
                write_json(f"{args.name}_rows", {"seconds": seconds, "rows": results})  # so far, in case a step fails
            lat = None
            if args.latency_prompts:
                lat = latency(server.client(timeout=600), ensemble, base_name, problems[: args.latency_prompts])
                print(json.dumps(lat))
            servers.stop(server)
            if not args.only_ensemble:
                run_baselines(args, servers, base, pop, population, best, problems, work, results, seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.baseline_rows is not None:
        results.update(earlier_baselines(args.baseline_rows, problems, results))
    report(args, problems, best, seconds, results, lat)


def run_baselines(
    args: argparse.Namespace,
    servers: ServerSet,
    base: Path,
    pop: Any,
    population: Path,
    best: str,
    problems: Sequence[Problem],
    work: Path,
    results: dict[str, list[dict]],
    seconds: dict[str, float],
) -> None:
    """The merges and the generalists, each on a server of its rank (or merged into the base), n=8 each."""
    merges = merge_members(base, population if args.population else pop.root, work / "merges")
    adapters = dict(merges)
    for g in args.generalists:
        gp = load_population(g)
        adapters[f"generalist_r{gp.manifest.members[0].rank}"] = gp.member_dir(gp.names[0])
    # Adapters up to rank MAX_SERVED_RANK share one LoRA server. Higher ranks are merged into the base and
    # served as plain models: on this CPU a server started with --max-lora-rank 64 did not finish one
    # condition in 17 minutes (rank 8: 3-5 min), and a merged adapter computes the same function.
    lora: dict[str, Path] = {}
    merged: dict[str, Path] = {}
    for name, folder in adapters.items():
        rank = json.loads((folder / "adapter_config.json").read_text())["r"]
        (lora if rank <= MAX_SERVED_RANK else merged)[name] = folder
    groups: list[tuple[str, list[str], list[str]]] = []
    if lora:
        mods = [f"{n}={p}" for n, p in lora.items()]
        groups.append((f"baselines-r{MAX_SERVED_RANK}", ["--model", str(base), "--lora-modules", *mods,
                       "--max-lora-rank", str(MAX_SERVED_RANK)], list(lora)))  # fmt: skip
    for name, folder in merged.items():
        plain = merged_model(base, folder, work / f"{name}-merged")
        # a plain model still needs one adapter to start `--model` mode; the base (merged) is what is asked
        groups.append((f"{name}-merged", ["--model", str(plain), "--lora-modules",
                       f"{best}={pop.member_dir(best)}", "--ignore-base-name"], [name]))  # fmt: skip
    for server_name, flags, names in groups:
        baselines = servers.start_ensemble(*flags, name=server_name, timeout=600)
        ids = [m.id for m in baselines.client().models.list().data]
        plain_id = next(i for i in ids if i not in {"ensemble", best, *names})
        for name in names:
            label = f"{name} SC@8" + (" (merged into the base)" if name in merged else "")
            model = plain_id if name in merged else name
            t0 = time.perf_counter()
            results[label] = asyncio.run(run_condition(baselines, model, problems, "sc", args.concurrency))
            seconds[label] = round(time.perf_counter() - t0, 1)
            print(f"{label}: {sum(r['correct'] for r in results[label])}/{len(problems)} in {seconds[label]} s")
            write_json(f"{args.name}_rows", {"seconds": seconds, "rows": results})
        servers.stop(baselines)


def earlier_baselines(path: Path, problems: Sequence[Problem], results: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The baselines' rows of an earlier run on the same problems (checked by count and family, in order), and
    the earlier population's default request (another recipe's ensemble, paired with this one)."""
    saved = json.loads(path.read_text())["rows"]
    out = {}
    for label, rows in saved.items():
        if label == "ensemble":
            label = "earlier population's default request"
        elif (
            label in results
            or label.startswith("ensemble")
            or label.startswith("best member")
            or label.startswith("router")
        ):
            continue  # the earlier population's other conditions (its members, its variants) are left out
        if [r["domain"] for r in rows] != [p.domain for p in problems]:
            raise SystemExit(
                f"{path}: {label!r} was measured on other problems (use the same --per-cell and --exclude)"
            )
        out[f"{label} (earlier run)"] = rows
    return out


def cli_args(args: argparse.Namespace) -> list[str]:
    """The arguments of this run as a command line (none that is unset; --from-rows is not a setting)."""
    out = []
    for k, v in vars(args).items():
        if v is None or v is False or k == "from_rows":
            continue
        if v is True:
            out.append(f"--{k.replace('_', '-')}")
            continue
        out += [f"--{k.replace('_', '-')}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    return out


def report(
    args: argparse.Namespace,
    problems: Sequence[Problem],
    best: str,
    seconds: dict[str, float],
    results: dict[str, list[dict]],
    lat: dict[str, Any] | None,
) -> None:
    ref = results["ensemble"]
    summary = {label: summarise(label, rows, None if label == "ensemble" else ref) for label, rows in results.items()}
    table = []
    for label, s in summary.items():
        d, e = s.get("ensemble_minus_this"), s.get("error_ratio")
        table.append(
            [
                label,
                f"{s['accuracy']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]",
                "" if d is None else f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]",
                "" if e is None else f"{e['mean']:.3f} [{e['low']:.3f}, {e['high']:.3f}]",
                s["tokens_per_problem"],
                s.get("coverage", ""),
            ]
        )
    print(
        md_table(
            [
                "condition",
                "accuracy [95% CI]",
                "ensemble minus this [95% CI]",
                "ensemble's error / this one's [95% CI]",
                "completion tokens / problem",
                "answer found",
            ],
            table,
        )
    )
    fam = [[f, *(summary[label]["per_family"][f] for label in summary)] for f in NATURAL_FAMILIES]
    print(md_table(["family", *summary], fam))
    cov = [[f, *(summary[label]["coverage_per_family"][f] for label in summary)] for f in NATURAL_FAMILIES]
    print("answer found, per family:\n" + md_table(["family", *summary], cov))
    print(json.dumps(lat))
    write_json(
        args.name,
        {
            "command": "python bench/real.py " + " ".join(cli_args(args)),
            "machine": machine(),
            "problems": len(problems),
            "best_member": best,
            "seconds": seconds,
            "latency": lat,
            "summary": summary,
        },
    )


if __name__ == "__main__":
    main()
