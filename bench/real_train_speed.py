"""How fast PEFT trains a LoRA on the embedded real model on this machine's CPU, for sizing member training.

    python bench/real_train_speed.py [--steps 8] [--batch 8] [--rank 8]

One LoRA (q_proj, v_proj, as PEFT's default for Llama) on SmolLM2-135M-Instruct (the converted embedded
real model), trained with AdamW on batches of natural-task examples (prompt through the chat template,
loss on the target only) at the batch sizes given; the first step is a warm-up and is not counted.
Prints seconds per step and target tokens per second per batch size; writes bench/results/real_train_speed.json.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine, md_table, write_json

from ensemble_serve.shared.embedded import embedded_real_gguf
from ensemble_serve.shared.gguf import cached_conversion
from trainer.tasks.natural import natural_problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    folder = cached_conversion(embedded_real_gguf())
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "v_proj"])
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    problems = natural_problems(max(args.batch) * (args.steps + 1), seed="bench-train-speed")

    def encode(p):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True
        )
        ids_prompt = tok(prompt, add_special_tokens=False)["input_ids"]
        ids_target = tok(p.chain + tok.eos_token, add_special_tokens=False)["input_ids"]
        return ids_prompt + ids_target, [-100] * len(ids_prompt) + ids_target

    rows, results = [], {}
    for batch in args.batch:
        times, targets = [], 0
        for step in range(args.steps + 1):
            items = [encode(p) for p in problems[step * batch : (step + 1) * batch]]
            width = max(len(i) for i, _ in items)
            ids = torch.tensor([i + [tok.pad_token_id or 0] * (width - len(i)) for i, _ in items])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in items])
            mask = (torch.arange(width)[None, :] < torch.tensor([len(i) for i, _ in items])[:, None]).long()
            started = time.perf_counter()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step:  # the first step warms up
                times.append(time.perf_counter() - started)
                targets += int((labels != -100).sum())
        per_step = sum(times) / len(times)
        results[batch] = {
            "seconds_per_step": round(per_step, 3),
            "target_tokens_per_second": round(targets / sum(times), 1),
        }
        rows.append([batch, round(per_step, 3), round(targets / sum(times), 1)])
    print(md_table(["batch", "seconds per step", "target tokens per second"], rows))
    write_json(
        "real_train_speed",
        {
            "command": f"python bench/real_train_speed.py --steps {args.steps} --batch {' '.join(map(str, args.batch))} --rank {args.rank}",
            "machine": machine(),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
