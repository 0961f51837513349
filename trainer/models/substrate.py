"""The sandbox substrate: a small Llama-architecture causal LM trained from scratch.

It is a standard Hugging Face model folder (config.json, model.safetensors,
tokenizer.json with a chat template, generation_config.json) that transformers,
PEFT and vLLM load unchanged. Training is by steps with fixed threads and seeds,
so one seed gives one model on one machine.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from ensemble_serve.shared.fsutil import tmp_dir_beside
from trainer.models.config import SubstrateConfig
from trainer.tasks.data import batches, greedy_answers, lr_at
from trainer.tasks.sandbox import Problem, generate_problems, iter_problems, verify
from trainer.tasks.tokenizer import build_tokenizer, save_tokenizer

REPORT_FILE = "substrate.json"
HELD_OUT_SYSTEM = "You are a concise assistant for arithmetic."  # not among the training system messages


def seed_everything(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def build_model(cfg: SubstrateConfig, tok: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    vocab = len(tok)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def evaluate_accuracy(answer_fn: Callable[[Sequence[str]], list[str]], problems: Sequence[Problem]) -> dict[str, float]:
    """Per-domain accuracy (and "all") of `answer_fn` on labelled problems."""
    texts = answer_fn([p.prompt for p in problems])
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for p, text in zip(problems, texts):
        ok = verify(p, text).correct
        for key in (p.domain, "all"):
            total[key] += 1
            right[key] += ok
    return {k: right[k] / total[k] for k in sorted(total)}


def heldout_problems(seed: int, per_domain: int, domains: Sequence[str], difficulties: Sequence[int]) -> list[Problem]:
    return generate_problems(
        per_domain * len(domains), seed=seed, split="heldout", domains=list(domains), difficulties=list(difficulties)
    )


def train_substrate(cfg: SubstrateConfig, progress: bool = True) -> dict:
    """Train, evaluate and save the substrate; returns the report also written to substrate.json."""
    seed_everything(cfg.seed, cfg.threads)
    tok = build_tokenizer(cfg.max_position_embeddings)
    model = build_model(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    stream = batches(
        iter_problems(seed=cfg.seed, split="train", domains=list(cfg.domains), difficulties=list(cfg.difficulties)),
        tok,
        cfg.batch_size,
        cfg.max_position_embeddings,
        system_rate=cfg.system_rate,
        seed=cfg.seed,
    )
    model.train()
    started = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="substrate", disable=not progress, unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        batch = next(stream)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    train_seconds = time.perf_counter() - started

    accuracy: dict[str, float] = {}
    with_system: dict[str, float] = {}
    if cfg.eval_per_domain:
        problems = heldout_problems(cfg.seed + 1, cfg.eval_per_domain, cfg.domains, cfg.difficulties)
        accuracy = evaluate_accuracy(lambda ps: greedy_answers(model, tok, ps), problems)
        if cfg.system_rate > 0:  # a system message it was not trained with
            with_system = evaluate_accuracy(lambda ps: greedy_answers(model, tok, ps, system=HELD_OUT_SYSTEM), problems)

    report = {
        "parameters": n_params,
        "steps": cfg.steps,
        "train_seconds": round(train_seconds, 1),
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "heldout_accuracy": accuracy,
        "heldout_accuracy_with_system_message": with_system or None,
        "trained_difficulties": list(cfg.difficulties),
        "config": json.loads(cfg.model_dump_json()),
    }
    save_substrate(model, tok, cfg.out, report)
    return report


def save_substrate(model: LlamaForCausalLM, tok: PreTrainedTokenizerBase, out: Path, report: dict) -> None:
    """Write the model folder atomically: a temporary folder beside `out`, then a rename."""
    out = Path(out)
    tmp = tmp_dir_beside(out)
    try:
        model.save_pretrained(str(tmp))  # safetensors
        save_tokenizer(tok, tmp)
        GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        ).save_pretrained(str(tmp))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            old = tmp_dir_beside(out)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
