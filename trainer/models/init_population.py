"""`ensemble-train init`: a diverse starting population of PEFT LoRA adapters.

Diversity comes the PopuLoRA way: every member has its own seed, rank, dropout and
learning rate, and a short supervised warm-up on its own slice of the data (a focus
domain plus a shared remainder, drawn from its own data seed). The result is a
population directory: a manifest plus one standard PEFT adapter folder per member.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaForCausalLM

from ensemble_serve.shared.population import (
    FORMAT_VERSION,
    BaseModelRef,
    Manifest,
    Member,
    Population,
    create_population,
    fingerprint_model_dir,
)
from trainer.models.config import InitConfig
from trainer.tasks.data import batches, lr_at
from trainer.tasks.sandbox import Problem, iter_problems, load_jsonl


def member_plan(cfg: InitConfig) -> list[dict]:
    """The hyper-parameters of each member: seeds, ranks, dropouts, lrs and focus domains differ."""
    plan = []
    nr, nd, nl = len(cfg.ranks), len(cfg.dropouts), len(cfg.lrs)
    for i in range(cfg.members):
        rank = cfg.ranks[i % nr]
        plan.append(
            {
                "name": f"m{i:02d}",
                "seed": cfg.seed + i,
                "rank": rank,
                "alpha": cfg.alpha_over_rank * rank,
                "dropout": cfg.dropouts[(i // nr) % nd],
                "lr": cfg.lrs[(i + i // nr) % nl],
                "focus": cfg.domains[i % len(cfg.domains)],
            }
        )
    return plan


def focus_stream(cfg: InitConfig, focus: str, seed: int) -> Iterator[Problem]:
    """Problems for one member: `focus_weight` of them from its focus domain, the rest from all."""
    rng = random.Random(f"focus-mix:{seed}")
    focus_levels = cfg.focus_difficulties or cfg.difficulties
    focused = iter_problems(seed=seed, split="train", domains=[focus], difficulties=list(focus_levels))
    mixed = iter_problems(
        seed=seed + 10_000, split="train", domains=list(cfg.domains), difficulties=list(cfg.difficulties)
    )
    while True:
        yield next(focused) if rng.random() < cfg.focus_weight else next(mixed)


def dataset_stream(problems: Sequence[Problem], seed: int) -> Iterator[Problem]:
    """An endless shuffled stream over a user's dataset (rows need a chain to train on)."""
    rng = random.Random(f"dataset:{seed}")
    usable = [p for p in problems if p.chain]
    if not usable:
        raise ValueError("the dataset has no rows with a `chain` to warm members up on")
    while True:
        order = list(usable)
        rng.shuffle(order)
        yield from order


def warm_up_member(
    cfg: InitConfig, spec: dict, stream: Iterator[Problem], out: Path, base_name: str, bar: tqdm
) -> float:
    """Train one LoRA adapter from the frozen base and save it as a PEFT folder; returns the last loss."""
    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(str(cfg.base))
    model = LlamaForCausalLM.from_pretrained(str(cfg.base), dtype=torch.float32)
    lora = LoraConfig(
        r=spec["rank"],
        lora_alpha=spec["alpha"],
        lora_dropout=spec["dropout"],
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    max_len = model.config.max_position_embeddings
    data = batches(stream, tok, cfg.batch_size, max_len, system_rate=cfg.system_rate, seed=spec["seed"])
    model.train()
    loss_value = float("nan")
    for step in range(cfg.warmup_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.warmup_steps, spec["lr"], max(1, cfg.warmup_steps // 10))
        loss = model(**next(data)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()
        bar.update(1)
        bar.set_postfix(member=spec["name"], loss=f"{loss_value:.3f}")
    model.save_pretrained(str(out))
    _set_base_name(out, base_name)
    return loss_value


def _set_base_name(adapter_dir: Path, base_name: str) -> None:
    """Record the base model's identifier (not this machine's path) in adapter_config.json."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def init_population(cfg: InitConfig, progress: bool = True) -> Population:
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    base = Path(cfg.base)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"base model folder {base} has no config.json (run `ensemble-train substrate` first?)")
    base_name = cfg.base_name or base.resolve().name
    user_problems = load_jsonl(cfg.data) if cfg.data else None
    plan = member_plan(cfg)
    started = time.perf_counter()
    members: list[Member] = []
    with tempfile.TemporaryDirectory(prefix="ensemble-init-") as work:
        sources: dict[str, Path] = {}
        bar = tqdm(total=cfg.warmup_steps * len(plan), desc="warm-up", disable=not progress, unit="step")
        for spec in plan:
            stream = (
                dataset_stream(user_problems, spec["seed"])
                if user_problems is not None
                else focus_stream(cfg, spec["focus"], spec["seed"])
            )
            out = Path(work) / spec["name"]
            loss = warm_up_member(cfg, spec, stream, out, base_name, bar)
            sources[spec["name"]] = out
            members.append(
                Member(
                    name=spec["name"],
                    rank=spec["rank"],
                    alpha=spec["alpha"],
                    parents=[],
                    born_generation=0,
                    seed=spec["seed"],
                    info={
                        "lr": spec["lr"],
                        "dropout": spec["dropout"],
                        "focus_domain": None if user_problems is not None else spec["focus"],
                        "focus_difficulties": list(cfg.focus_difficulties or cfg.difficulties),
                        "warmup_steps": cfg.warmup_steps,
                        "warmup_loss": round(loss, 4),
                    },
                )
            )
        bar.close()
        out_root = Path(cfg.out)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            base_model=BaseModelRef(
                name=base_name,
                path=os.path.relpath(base.resolve(), out_root.resolve()),
                sha256=fingerprint_model_dir(base),
            ),
            generation=0,
            members=members,
            config_hash=_config_hash(cfg),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        population = create_population(out_root, manifest, sources, overwrite=cfg.overwrite)
    if progress:
        print(f"wrote {len(members)} members to {cfg.out} in {time.perf_counter() - started:.0f}s")
    return population


def _config_hash(cfg: InitConfig) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]
