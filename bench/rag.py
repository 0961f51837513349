"""Long-context RAG: what the ensemble's fan-out costs in prefill, and what fewer members save.

A retrieval prompt of about 1,700 tokens (24 passages) (many short passages and a question; a new set of passages
each round, so no round reuses another's prefix cache) is asked of the real server on the
real-shaped model (tests/realshape.py: Qwen2, byte-level BPE, a 2048-token context, three PEFT
adapters brought in with `ensemble-train import`). vLLM's prefix cache is per adapter, so an
ensemble of k members prefills the prompt k times, where a single member with `n` samples prefills
it once. Output is held at a few tokens (`ignore_eos`) so that the prefill is nearly all the work.

Per round, interleaved in shuffled order:
* `member n=1` - one adapter, one chain (one prefill);
* `member n=3` - one adapter, three chains (one prefill, shared);
* `ensemble k=1`, `k=2`, `k=3` - the ensemble fanned out to the first k members with `answer: text`
  (k prefills; routed top-k pays for k members the same way);
* `ensemble k=3 adaptive` - the same with `ensemble.adaptive` in waves of one member (confidence
  0.85: two agreeing members stop it), the most trusted first;
* `ensemble k=3, repeated prompt` - the same request again right after `ensemble k=3`: every
  adapter's prefix is cached now.

    .venv/bin/python bench/rag.py [--repeats 8] [--max-tokens 4]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from _common import (
    ServerSet,
    fmt_spread,
    interleaved,
    md_table,
    paired_ratios,
    spread,
    write_results,
)
from tqdm import tqdm

from ensemble_serve.shared.bring_your_own import AdapterSpec, import_adapters
from trainer.testing.realshape import build_realshape

VARIANTS = ["member n=1", "member n=3", "ensemble k=1", "ensemble k=2", "ensemble k=3", "ensemble k=3 adaptive"]
ADAPTIVE = {"confidence": 0.85, "wave_size": 1}  # one member at a time; two agreeing members stop it (P = 0.875)
REPEAT = "ensemble k=3, repeated prompt"
SYSTEM = "Answer from the passages only."


def rag_prompt(rng: random.Random, passages: int = 24) -> tuple[str, str]:
    rows = []
    for i in range(passages):
        rows.append(
            f"[{i}] The depot of district {rng.randint(1, 999)} holds {rng.randint(10, 9999)} crates of "
            f"part {rng.choice('ABCDEFGH')}{rng.randint(1, 99)}; its clerk files a count every "
            f"{rng.randint(2, 30)} days."
        )
    q = rng.randrange(passages)
    return "Passages:\n" + "\n".join(
        rows
    ) + f"\n\nQuestion: how many crates does the depot in passage [{q}] hold?", str(q)


def ask(client, variant: str, prompt: str, members: list[str], max_tokens: int) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    common = dict(messages=messages, max_tokens=max_tokens, temperature=0.7, extra_body={"ignore_eos": True})
    t0 = time.perf_counter()
    if variant.startswith("member"):
        n = int(variant.split("n=")[1])
        resp = client.chat.completions.create(model=members[0], n=n, **common)
    else:
        k = int(variant.split("k=")[1].split(",")[0].split()[0])
        options = {"members": members[:k], "answer": "text"}
        if variant.endswith("adaptive"):
            options["adaptive"] = ADAPTIVE
        common["extra_body"] = {"ignore_eos": True, "ensemble": options}
        resp = client.chat.completions.create(model="ensemble", **common)
    wall = time.perf_counter() - t0
    ens = (resp.model_extra or {}).get("ensemble") or {}
    return {
        "wall_s": wall,
        "prompt_tokens": resp.usage.prompt_tokens,
        "completion_tokens": resp.usage.completion_tokens,
        "members_asked": len(ens.get("members") or []) if variant.startswith("ensemble") else 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4)
    args = parser.parse_args()
    shape = build_realshape()
    members = list(shape.adapters)
    with tempfile.TemporaryDirectory() as tmp, ServerSet() as servers:
        pop = Path(tmp) / "pop"
        import_adapters(shape.base, [AdapterSpec(n, p) for n, p in shape.adapters.items()], pop)
        server = servers.start_ensemble(
            "--population", str(pop), "--served-model-name", "ensemble", "--max-model-len", "2048", name="rag"
        )
        client = server.client(timeout=600)
        rng = random.Random(2026)
        ask(client, "ensemble k=3", rag_prompt(rng)[0], members, args.max_tokens)  # warm-up
        rows: dict[str, list[dict]] = {v: [] for v in [*VARIANTS, REPEAT]}
        for rnd, variant in tqdm(list(interleaved(VARIANTS, args.repeats, random.Random(7))), desc="rag"):
            prompt = rag_prompt(rng)[0]
            cpu0 = server.cpu_seconds()
            rec = ask(client, variant, prompt, members, args.max_tokens)
            rec.update(round=rnd, cpu_s=server.cpu_seconds() - cpu0)
            rows[variant].append(rec)
            if variant == "ensemble k=3":
                cpu0 = server.cpu_seconds()
                again = ask(client, variant, prompt, members, args.max_tokens)
                again.update(round=rnd, cpu_s=server.cpu_seconds() - cpu0)
                rows[REPEAT].append(again)
    base = rows["member n=1"]
    table = []
    summary = {}
    for variant, recs in rows.items():
        walls = spread([r["wall_s"] for r in recs])
        ratios = spread(paired_ratios(recs, base))
        cpu = spread([r["cpu_s"] for r in recs])
        asked = sum(r["members_asked"] for r in recs) / len(recs)
        summary[variant] = {
            "members_asked": asked,
            "wall_s": walls,
            "ratio_to_member_n1": ratios,
            "server_cpu_s": cpu,
            "prompt_tokens": recs[0]["prompt_tokens"],
            "completion_tokens": recs[0]["completion_tokens"],
        }
        table.append([variant, fmt_spread(walls), fmt_spread(ratios), f"{cpu['median']:.2f}", f"{asked:.2f}"])
    print(md_table(["variant", "wall s", "ratio to member n=1", "server CPU s", "members asked"], table))
    write_results("rag", {"settings": vars(args), "members": members, "variants": summary, "rounds": rows})


if __name__ == "__main__":
    main()
