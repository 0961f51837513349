"""Diagnostic: does fine-tuning a member on *written* (gold) chains improve it?

If even gold chains do not move a member's held-out accuracy, the base model is at its capacity
on this distribution and self-labelled chains cannot be expected to either. Fine-tunes one member
of the embedded population with evolve's own gradient-phase task (`train_member_task`: PEFT,
AdamW, same schedule) on fresh sandbox train problems with their written chains, then compares
greedy held-out accuracy (transformers generation) before and after.

    python bench/capacity_check.py [--member m03] [--steps 128] [--examples 256] [--heldout 96]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import EMBEDDED_POPULATION, EMBEDDED_SUBSTRATE, rel, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--member", default="m03")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=96)
    ap.add_argument("--lr", type=float, default=5e-4)
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from ensemble_serve.shared.lora import load_lora, lora_from_bytes, lora_to_bytes, save_lora
    from trainer.evolve.executors import train_member_task
    from trainer.tasks.data import greedy_answers
    from trainer.tasks.sandbox import generate_problems, verify

    base = str(EMBEDDED_SUBSTRATE)
    member_dir = EMBEDDED_POPULATION / "members" / args.member
    heldout = generate_problems(args.heldout, seed=1234, split="heldout")

    def accuracy(adapter: Path) -> float:
        tok = AutoTokenizer.from_pretrained(base)
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
        outs = greedy_answers(model, tok, [p.prompt for p in heldout], max_new_tokens=128)
        return sum(verify(p, o).correct for p, o in zip(heldout, outs)) / len(heldout)

    before = accuracy(member_dir)
    train = generate_problems(args.examples, seed=77, split="train")
    started = time.perf_counter()
    res = train_member_task(
        base,
        lora_to_bytes(load_lora(member_dir)),
        [(p.prompt, p.chain) for p in train],
        steps=args.steps,
        batch_size=16,
        lr=args.lr,
        seed=1,
        threads=2,
    )
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as work:
        folder = save_lora(lora_from_bytes(res["adapter"]), Path(work) / "tuned")
        after = accuracy(folder)
    result = {
        "member": args.member,
        "steps": args.steps,
        "examples": args.examples,
        "lr": args.lr,
        "heldout_problems": args.heldout,
        "accuracy_before": round(before, 4),
        "accuracy_after": round(after, 4),
        "first_losses": res["losses"][:3],
        "last_losses": res["losses"][-3:],
        "train_seconds": round(seconds, 1),
    }
    path = write_json("capacity_check", result)
    print(f"{args.member}: held-out accuracy {before:.3f} -> {after:.3f} after {args.steps} steps on gold chains")
    print(f"results: {rel(path)}")


if __name__ == "__main__":
    main()
