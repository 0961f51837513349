"""Turning problems into training batches and greedy answers (plain PyTorch + transformers).

Used by the substrate's pre-training and the members' supervised warm-up. The loss
covers only the assistant turn (the chain and its end-of-sequence token): the model
learns to answer, not to write prompts.

Clients put system messages before the user turn (LangChain and chat UIs do by default). A model
that never saw one answers garbage after one, so training can put a system message before a share
of the examples (`system_rate`): one of :data:`SYSTEM_MESSAGES`, or a made-up one, so that the
model learns to answer the user turn whatever the system text says.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from trainer.tasks.sandbox import Problem
from trainer.tasks.tokenizer import prompt_text

IGNORE = -100

# Short system texts of the kinds clients send; `system_message` also makes up new ones from SYSTEM_WORDS.
SYSTEM_MESSAGES = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer concisely.",
    "You are a careful math tutor.",
    "Think step by step.",
    "Answer the question.",
    "Be precise.",
    "You are an AI assistant.",
    "Reply with the final answer on the last line.",
    "You are a calculator.",
    "Follow the format of the examples.",
    "You are a knowledgeable, friendly assistant.",
    "Keep it short.",
)
SYSTEM_WORDS = (
    "you are a an the helpful careful precise smart friendly expert assistant tutor model bot agent "
    "answer reply solve question task user please always never briefly clearly correctly step by"
).split()


def system_message(rng: random.Random) -> str:
    """A system text for one training example: a common one, or a made-up sentence of 3-8 words."""
    if rng.random() < 0.5:
        return rng.choice(SYSTEM_MESSAGES)
    words = [rng.choice(SYSTEM_WORDS) for _ in range(rng.randint(3, 8))]
    return " ".join(words).capitalize() + rng.choice([".", "!", ""])


def encode_example(
    tok: PreTrainedTokenizerBase, problem: Problem, max_len: int, system: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one problem with a worked chain (prompt positions masked)."""
    if problem.chain is None:
        raise ValueError(f"problem {problem.prompt[:40]!r} has no chain to train on")
    prompt_ids = tok(prompt_text(tok, problem.prompt, system), add_special_tokens=False)["input_ids"]
    answer_ids = tok(problem.chain, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_len]
    return ids, labels


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (ids, labels) into input_ids / attention_mask / labels tensors."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batches(
    problems: Iterator[Problem],
    tok: PreTrainedTokenizerBase,
    batch_size: int,
    max_len: int,
    pool: int = 8,
    system_rate: float = 0.0,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of training batches from an endless stream of problems.

    Examples are drawn `pool` batches at a time and grouped by length, so a batch
    pads little (compute on 2 cores is the budget); the batches of a pool are
    yielded in an order that alternates long and short, deterministically. A
    `system_rate` share of the examples get a system message (:func:`system_message`).
    """
    rng = random.Random(f"system:{seed}")

    def system() -> str | None:
        return system_message(rng) if system_rate > 0 and rng.random() < system_rate else None

    while True:
        chunk = [encode_example(tok, next(problems), max_len, system()) for _ in range(batch_size * pool)]
        chunk.sort(key=lambda ex: len(ex[0]))
        groups = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        order = [groups[i // 2] if i % 2 == 0 else groups[-(i // 2) - 1] for i in range(len(groups))]
        for group in order:
            yield collate(group, tok.pad_token_id)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 64,
    system: str | None = None,
) -> list[str]:
    """Greedy completions for chat prompts (after `system`, if given) with transformers' `generate` (left padding)."""
    was_training = model.training
    model.eval()
    tok.padding_side = "left"
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [prompt_text(tok, p, system) for p in prompts[start : start + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        out.extend(tok.batch_decode(new, skip_special_tokens=True))
    tok.padding_side = "right"
    model.train(was_training)
    return out
