"""A second, real-shaped test model, built here from nothing (no hub) and cached between runs.

The embedded substrate is a character-level Llama with a hand-written template. Users arrive with
models shaped like this one instead:

* **tokenizer**: byte-level BPE trained with `tokenizers` on sandbox text, Qwen2's special tokens
  (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`) and a ChatML Jinja template with a system role.
  Digits are grouped in pairs, so a number is several tokens, most of two digits ("478+365" is
  47|8|+|36|5, "123456" is 12|34|56);
* **model**: `Qwen2ForCausalLM` (grouped-query attention, biased q/k/v, tied embeddings, a
  4096-token context) trained briefly on the easy sandbox levels (30% of the examples after a
  system message) so that it answers some problems right;
* **adapters**: three LoRAs made with plain PEFT (`LoraConfig` + `get_peft_model` +
  `save_pretrained`), not with this project's trainer, each on its own family, with different
  ranks and target modules.

Why the digit pairs are also added tokens: transformers loads the tokenizer of any `qwen2` model
as `Qwen2Tokenizer`, whatever tokenizer_config.json says, and that class rebuilds the
pre-tokenizer with Qwen2's own regex, which isolates every digit (vLLM loads it the same way).
BPE merges of digits would then be learned here and never applied when served. The 100 digit pairs
are therefore also registered as (non-special) added tokens, which every loader matches before
pre-tokenization; the pre-tokenizer saved in tokenizer.json groups ASCII digits in pairs, left to
right, which splits them the same way, so `tokenizers`, transformers and vLLM all agree.

`build_realshape()` builds it once into the user's cache (`~/.cache/ensemble-serve/realshape-<hash>/`,
see `ensemble_serve.shared.fsutil.cache_dir`), outside any checkout, so every clone and CI run on a
machine reuses one build while its key holds (the hash covers this file's code, its settings and the versions
of the libraries that shape the result, so a change rebuilds; a file lock keeps two processes from
building at once), and returns the paths.
`python -m trainer.testing.realshape` (or `make realshape`) builds it and prints them.

A built copy also ships in the repository (`tests/assets/realshape-<hash>/`, 2.6 MB, written by
`python -m trainer.testing.realshape --ship tests/assets`): when its hash is the current key,
`build_realshape(shipped=...)` installs it into the cache instead of training (a clean clone's test
run skips the 90 s build); when the key has moved on (this file, its settings or a library changed),
it builds as before. The shipped adapters name their base as `../../base`; installing names the
cache's base folder, as a build does.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ensemble_serve.shared.fsutil import cache_dir

DONE = "DONE"
REPORT = "realshape.json"

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
SPECIAL_SPLIT = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))  # BPE learns no pieces of them
DIGIT_PAIRS = [f"{i:02d}" for i in range(100)]
# ChatML as Qwen2 ships it, without the default system message it adds when there is none.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2's pre-tokenizer regex with one change: ASCII digits go in pairs (`[0-9]{1,2}`), not one by one.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|[0-9]{1,2}|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SETTINGS: dict[str, Any] = {
    "seed": 0,
    "threads": 2,
    "tokenizer": {"vocab_size": 1024, "corpus_problems": 3000, "corpus_difficulties": [1, 2, 3, 4]},
    "model": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,  # head size 32, the smallest vLLM's CPU attention takes
        "num_key_value_heads": 2,  # grouped-query attention, as in Qwen2
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,  # as Qwen2-0.5B
    },
    "base": {
        "domains": ["add", "sub", "sort", "mod"],
        "difficulties": [1, 2],
        "steps": 1000,
        "batch_size": 32,
        "lr": 3e-3,
        "warmup_steps": 50,
        "system_rate": 0.3,
    },
    # name: family, LoRA rank, alpha, target modules
    "adapters": {
        "qv8": {"family": "add", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "all16": {
            "family": "sub",
            "r": 16,
            "lora_alpha": 32,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
        "attn4": {
            "family": "sort",
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
    },
    "adapter_training": {"steps": 100, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10, "system_rate": 0.3},
    "eval": {"per_domain": 12, "seed": 99, "max_new_tokens": 64},
}
LIBRARIES = ("torch", "transformers", "tokenizers", "peft")


@dataclass(frozen=True)
class RealShape:
    """A built real-shaped model: the base model folder and the PEFT adapter folders by name."""

    base: Path
    adapters: dict[str, Path]

    @property
    def report(self) -> dict[str, Any]:
        """What the build recorded: settings, build seconds, greedy accuracies."""
        return json.loads((self.base.parent / REPORT).read_text())


def _code_digest(text: str) -> bytes:
    """This file's code as Python parses it: comments, docstrings and formatting leave the key alone."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


def build_digest() -> str:
    """The cache key: this file's code, the settings and the versions of the libraries used."""
    h = hashlib.sha256(_code_digest(Path(__file__).read_text()))
    h.update(json.dumps(SETTINGS, sort_keys=True).encode())
    for name in LIBRARIES:
        h.update(f"{name}=={metadata.version(name)}".encode())
    return h.hexdigest()[:12]


def build_realshape(cache_root: Path | None = None, shipped: Path | None = None) -> RealShape:
    """The cached build in `cache_root` (default: the user's cache, `cache_dir()`), made first if missing.

    Made by installing `shipped/realshape-<key>/` when that folder holds a complete build of the current
    key, else by building.
    """
    cache_root = Path(cache_root) if cache_root is not None else cache_dir()
    cache_root.mkdir(parents=True, exist_ok=True)
    out = cache_root / f"realshape-{build_digest()}"
    if not (out / DONE).is_file():
        with open(cache_root / "realshape.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then reuse its build
            if not (out / DONE).is_file():
                source = Path(shipped) / out.name if shipped is not None else None
                if source is not None and (source / DONE).is_file():
                    _install(source, out)
                else:
                    _build(out)
    return RealShape(base=out / "base", adapters={name: out / "adapters" / name for name in SETTINGS["adapters"]})


SHIPPED_BASE = "../../base"  # how a shipped adapter names its base: the base folder, from the adapter's folder


def _base_references(folder: Path) -> list[Path]:
    """The files of a build that name the base folder: each adapter's config and PEFT model card."""
    return [
        f
        for name in SETTINGS["adapters"]
        for f in (folder / "adapters" / name).glob("*")
        if f.suffix in (".json", ".md")
    ]


def ship_realshape(dest_root: Path, cache_root: Path | None = None) -> Path:
    """Copy the current build (made first if missing) to `dest_root/realshape-<key>/` for the repository.

    Older shipped keys in `dest_root` are removed; the copy names no folder of this machine.
    """
    shape = build_realshape(cache_root)
    src = shape.base.parent
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    for old in dest_root.glob("realshape-*"):
        shutil.rmtree(old)
    dest = dest_root / src.name
    shutil.copytree(src, dest)
    for f in _base_references(dest):
        f.write_text(f.read_text().replace(str(shape.base), SHIPPED_BASE))
    return dest


def _install(source: Path, out: Path) -> None:
    """A shipped build into the cache: copied to a temporary sibling, its base named, then renamed into place."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    for f in _base_references(tmp):
        f.write_text(f.read_text().replace(SHIPPED_BASE, str(out / "base")))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


# ---------------------------------------------------------------------------------------------
# Building (called with the lock held)
# ---------------------------------------------------------------------------------------------


def _build(out: Path) -> None:
    """Build into a temporary sibling, write DONE last, then rename it into place."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    for stale in out.parent.glob(f"{out.name}.tmp-*"):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    with _torch_state(SETTINGS["threads"], SETTINGS["seed"]):
        report = _build_into(tmp, final=out)
    (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    (tmp / DONE).write_text(f"built in {report['build_seconds']} s\n")
    if out.exists():  # an incomplete folder of the same name (no DONE)
        shutil.rmtree(out)
    tmp.rename(out)


@contextmanager
def _torch_state(threads: int, seed: int) -> Iterator[None]:
    """Fixed threads and seeds for the build, the caller's restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(before)


def _build_into(tmp: Path, final: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    base = tmp / "base"
    base.mkdir(parents=True)
    _save_tokenizer(base)
    _save_config(base)
    tok = AutoTokenizer.from_pretrained(base)  # the tokenizer as transformers and vLLM load it (Qwen2Tokenizer)
    tokenizer_seconds = time.perf_counter() - started

    model = _train_base(base, tok)
    base_seconds = time.perf_counter() - started - tokenizer_seconds
    b = SETTINGS["base"]
    base_acc = _accuracy(model, tok, b["domains"])
    report: dict[str, Any] = {
        "settings": SETTINGS,
        "libraries": {name: metadata.version(name) for name in LIBRARIES},
        "vocab_size": len(tok),
        "parameters": sum(p.numel() for p in model.parameters()),
        "base_accuracy": base_acc,  # greedy, held-out, levels 1-2, no system message
        "tokenizer_seconds": round(tokenizer_seconds, 1),
        "base_seconds": round(base_seconds, 1),
        "adapters": {},
    }
    del model

    for name, spec in SETTINGS["adapters"].items():
        t0 = time.perf_counter()
        folder = tmp / "adapters" / name
        acc = _train_adapter(base, tok, name, spec, folder, final_base=final / "base")
        report["adapters"][name] = {**spec, "accuracy": acc, "seconds": round(time.perf_counter() - t0, 1)}
    report["build_seconds"] = round(time.perf_counter() - started, 1)
    return report


def _corpus() -> list[str]:
    """Sandbox prompts and chains, alone and chat-formatted (with and without a system message)."""
    from trainer.tasks.data import SYSTEM_MESSAGES
    from trainer.tasks.sandbox import generate_problems

    t = SETTINGS["tokenizer"]
    problems = generate_problems(t["corpus_problems"], seed=1, split="train", difficulties=t["corpus_difficulties"])
    texts = []
    for i, p in enumerate(problems):
        system = SYSTEM_MESSAGES[i % len(SYSTEM_MESSAGES)] if i % 3 == 0 else None
        texts += [p.prompt, p.chain or "", *SPECIAL_SPLIT.split(_chatml(p.prompt, system, p.chain))]
    return [t for t in texts if t]


def _chatml(user: str, system: str | None, answer: str | None) -> str:
    head = f"{IM_START}system\n{system}{IM_END}\n" if system is not None else ""
    text = f"{head}{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"
    return text + f"{answer}{IM_END}\n" if answer is not None else text


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SETTINGS["tokenizer"]["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer)
    # Pairs BPE learned keep their ids; the rest are appended. Not special: decoded like any text.
    core.add_tokens([AddedToken(pair, special=False, normalized=True) for pair in DIGIT_PAIRS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],  # Qwen2's additional special tokens
        model_max_length=SETTINGS["model"]["max_position_embeddings"],
    )
    tok.chat_template = CHAT_TEMPLATE
    # The chat template inside tokenizer_config.json, as Qwen2 ships it (not a separate .jinja file).
    tok.save_pretrained(folder, save_jinja_files=False)


def _save_config(folder: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config

    raw = AutoTokenizer.from_pretrained(folder)  # no config.json yet: the tokenizer exactly as saved
    endoftext, im_end = raw.convert_tokens_to_ids(ENDOFTEXT), raw.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(
        vocab_size=len(raw),
        **SETTINGS["model"],
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
        use_sliding_window=False,
        dtype="float32",
        architectures=["Qwen2ForCausalLM"],
    )
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext).save_pretrained(
        folder
    )


def _examples(tok, domains: list[str], seed: int, system_rate: float) -> Iterator[tuple[list[int], list[int]]]:
    """(input ids, labels) of chat-formatted training problems; only the assistant turn is learned."""
    from trainer.tasks.data import system_message
    from trainer.tasks.sandbox import iter_problems

    rng = random.Random(seed)
    for p in iter_problems(seed=seed, split="train", domains=domains, difficulties=SETTINGS["base"]["difficulties"]):
        system = system_message(rng) if rng.random() < system_rate else None
        prompt = tok.encode(_chatml(p.prompt, system, None), add_special_tokens=False)
        answer = tok.encode(f"{p.chain}{IM_END}", add_special_tokens=False)
        yield prompt + answer, [-100] * len(prompt) + answer


def _train(model, tok, domains: list[str], seed: int, opts: dict[str, Any]) -> float:
    """Plain PyTorch AdamW on the trainable parameters; the mean loss of the last 20 steps."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=opts["lr"], weight_decay=0.0)
    stream = _examples(tok, domains, seed, opts["system_rate"])
    steps, warmup = opts["steps"], opts["warmup_steps"]
    model.train()
    losses = []
    for step in range(steps):
        rows = [next(stream) for _ in range(opts["batch_size"])]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        for group in opt.param_groups:  # linear warm-up, then linear decay to 10%
            group["lr"] = opts["lr"] * min(1.0, (step + 1) / warmup) * (1 - 0.9 * step / steps)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


def _accuracy(model, tok, domains: list[str]) -> dict[str, float]:
    """Greedy accuracy per family (and "all") on held-out problems, checked by the sandbox's verifier."""
    import torch

    from trainer.tasks.sandbox import generate_problems, verify

    e = SETTINGS["eval"]
    problems = generate_problems(
        e["per_domain"] * len(domains),
        seed=e["seed"],
        split="heldout",
        domains=domains,
        difficulties=SETTINGS["base"]["difficulties"],
    )
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True)
        for p in problems
    ]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=e["max_new_tokens"],
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    answers = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    right: dict[str, int] = {}
    for p, text in zip(problems, answers):
        right[p.domain] = right.get(p.domain, 0) + verify(p, text).correct
    acc = {d: round(right.get(d, 0) / e["per_domain"], 3) for d in domains}
    acc["all"] = round(sum(right.values()) / len(problems), 3)
    return acc


def _train_base(folder: Path, tok):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config.from_pretrained(folder))
    # save_pretrained writes the model's generation config: keep the one with both stop tokens, as Qwen2 ships
    model.generation_config = GenerationConfig.from_pretrained(folder)
    b = SETTINGS["base"]
    _train(model, tok, b["domains"], SETTINGS["seed"], b)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _train_adapter(base: Path, tok, name: str, spec: dict[str, Any], folder: Path, final_base: Path) -> float:
    """One LoRA made the way a user makes one with PEFT; its greedy accuracy on its family."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    config = LoraConfig(
        r=spec["r"], lora_alpha=spec["lora_alpha"], target_modules=spec["target_modules"], task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    seed = SETTINGS["seed"] + 1 + list(SETTINGS["adapters"]).index(name)
    _train(peft_model, tok, [spec["family"]], seed, SETTINGS["adapter_training"])
    acc = _accuracy(peft_model, tok, [spec["family"]])[spec["family"]]
    peft_model.save_pretrained(folder, safe_serialization=True)
    # PEFT records the folder the base was loaded from, here the temporary one: name the final folder.
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = str(final_base)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    readme = folder / "README.md"
    if readme.is_file():
        readme.write_text(readme.read_text().replace(str(base), str(final_base)))
    return acc


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the real-shaped test model into the cache.")
    parser.add_argument("--ship", type=Path, help="also copy the build here for the repository (tests/assets)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    shape = build_realshape()
    if args.ship:
        print(f"shipped: {ship_realshape(args.ship)}")
    print(f"base: {shape.base}")
    for adapter_name, adapter_path in shape.adapters.items():
        print(f"adapter {adapter_name}: {adapter_path}")
    rep = shape.report
    print(f"base accuracy: {rep['base_accuracy']}")
    print(f"adapter accuracy: { {k: v['accuracy'] for k, v in rep['adapters'].items()} }")
    print(f"built in {rep['build_seconds']} s; this call took {time.perf_counter() - t0:.1f} s")
