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
import shutil
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
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
from trainer.tasks.data import IGNORE, batches, lr_at
from trainer.tasks.sandbox import Problem, in_shard, iter_problems, load_jsonl

SEED_MEMBER = "seed"
"""The name of a branched population's shared seed adapter (`seed_share` > 0), kept as its general expert."""


def member_plan(cfg: InitConfig, domains: Sequence[str] | None = None) -> list[dict]:
    """The hyper-parameters of each member: seeds, ranks, dropouts, lrs and the slice of the data it focuses on.

    The slice follows ``cfg.cut``: ``family``, member i focuses on ``domains[i mod len(domains)]`` (default: the
    config's domains); ``level``, on level i mod #levels of the focus levels in every domain; ``shard``, on
    shard i (of ``members``) of every domain's focus levels; ``seed``, on every domain's focus levels (no slice).
    """
    domains = list(domains or cfg.domains)
    levels = list(cfg.focus_difficulties or cfg.difficulties)
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
                "focus": domains[i % len(domains)] if cfg.cut == "family" else None,
                "levels": [levels[i % len(levels)]] if cfg.cut == "level" else levels,
                "shard": i if cfg.cut == "shard" else None,
                "shards": cfg.members,
            }
        )
    return plan


def focus_stream(
    cfg: InitConfig,
    focus: str | None,
    seed: int,
    levels: Sequence[int] | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[Problem]:
    """Problems for one member: `focus_weight` of them from its own slice, the rest from all domains.

    The slice: the `focus` domain (None: every domain) at `levels` (default: the focus levels), and with
    ``shard=(i, n)`` only the problems of shard i of n (:func:`in_shard`).
    """
    rng = random.Random(f"focus-mix:{seed}")
    focus_levels = list(levels or cfg.focus_difficulties or cfg.difficulties)
    own = iter_problems(
        seed=seed, split="train", domains=[focus] if focus else list(cfg.domains), difficulties=focus_levels
    )
    focused = (p for p in own if shard is None or in_shard(p.prompt, *shard))
    mixed = iter_problems(
        seed=seed + 10_000, split="train", domains=list(cfg.domains), difficulties=list(cfg.difficulties)
    )
    while True:
        yield next(focused) if rng.random() < cfg.focus_weight else next(mixed)


def spec_stream(cfg: InitConfig, spec: dict, user_problems: Sequence[Problem] | None) -> Iterator[Problem]:
    """A planned member's warm-up stream (its slice of the sandbox, or of the user's dataset)."""
    shard = None if spec.get("shard") is None else (spec["shard"], spec["shards"])
    if user_problems is not None:
        levels = spec.get("levels") if cfg.cut == "level" else cfg.focus_difficulties
        return dataset_stream(
            user_problems, spec["seed"], spec["focus"], cfg.focus_weight, levels, shard=shard, whole=cfg.cut != "family"
        )
    return focus_stream(cfg, spec["focus"], spec["seed"], spec.get("levels"), shard)


def _shuffled_forever(rows: Sequence[Problem], rng: random.Random) -> Iterator[Problem]:
    while True:
        order = list(rows)
        rng.shuffle(order)
        yield from order


def dataset_domains(cfg: InitConfig, problems: Sequence[Problem]) -> list[str]:
    """The domains members of a dataset focus on: the config's, if given, else every domain of the rows."""
    present = sorted({p.domain for p in problems if p.chain})
    if "domains" not in cfg.model_fields_set:
        return present
    missing = [d for d in cfg.domains if d not in present]
    if missing:
        raise ValueError(f"domains {missing} have no rows with a `chain` in {cfg.data}; its domains: {present}")
    return list(cfg.domains)


def dataset_stream(
    problems: Sequence[Problem],
    seed: int,
    focus: str | None = None,
    focus_weight: float = 0.0,
    focus_difficulties: Sequence[int] | None = None,
    shard: tuple[int, int] | None = None,
    whole: bool = False,
) -> Iterator[Problem]:
    """An endless shuffled stream over a user's dataset (rows need a chain to train on).

    With a `focus` domain (or ``whole``: every domain), `focus_weight` of the rows come from that slice (at
    `focus_difficulties`, if given, and in shard ``(i, n)``, if given) and the rest from the whole dataset,
    each part reshuffled after every pass.
    """
    rng = random.Random(f"dataset:{seed}")
    usable = [p for p in problems if p.chain]
    if not usable:
        raise ValueError("the dataset has no rows with a `chain` to warm members up on")
    mixed = _shuffled_forever(usable, rng)
    focused_rows = [
        p
        for p in usable
        if (whole or p.domain == focus)
        and (not focus_difficulties or p.difficulty in set(focus_difficulties))
        and (shard is None or in_shard(p.prompt, *shard))
    ]
    if (focus is None and not whole) or focus_weight <= 0 or not focused_rows:
        yield from mixed
        return
    focused = _shuffled_forever(focused_rows, random.Random(f"dataset-focus:{seed}"))
    while True:
        yield next(focused) if rng.random() < focus_weight else next(mixed)


def warm_up_member(
    cfg: InitConfig,
    spec: dict,
    stream: Iterator[Problem],
    out: Path,
    base_name: str,
    bar: tqdm,
    cost: dict[str, int],
    init_from: Path | None = None,
) -> float:
    """Train one LoRA adapter on the frozen base for ``cost["steps"]`` steps and save it as a PEFT folder.

    Returns the last loss. `cost` receives what the training saw: examples, tokens (prompt and target)
    and target tokens. ``init_from``: an adapter folder of the same rank and modules to start from
    (a branch of the shared seed) instead of PEFT's initialisation.
    """
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
    if init_from is not None:
        loaded = set_peft_model_state_dict(model, load_file(str(init_from / "adapter_model.safetensors")))
        if loaded.unexpected_keys:
            raise ValueError(f"{init_from}: the seed adapter does not fit this member ({loaded.unexpected_keys[:3]})")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    max_len = model.config.max_position_embeddings
    data = batches(stream, tok, cfg.batch_size, max_len, system_rate=cfg.system_rate, seed=spec["seed"])
    model.train()
    loss_value = float("nan")
    steps = cost["steps"]
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, spec["lr"], max(1, steps // 10))
        batch = next(data)
        cost["examples"] += int(batch["input_ids"].shape[0])
        cost["tokens"] += int(batch["attention_mask"].sum())
        cost["target_tokens"] += int((batch["labels"] != IGNORE).sum())
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()
        bar.update(1)
        bar.set_postfix(member=spec["name"], loss=f"{loss_value:.3f}")
    model.save_pretrained(str(out))
    _set_base_name(out, base_name, Path(cfg.base))
    return loss_value


def _set_base_name(adapter_dir: Path, base_name: str, base_path: Path | None = None) -> None:
    """Record the base model's identifier (not this machine's path) in adapter_config.json and PEFT's model card,
    and its target modules in a stable order (the same bytes from every run)."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_name
    if isinstance(config.get("target_modules"), list):  # PEFT writes a set: its order changes from process to process
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = adapter_dir / "README.md"
    if card.is_file() and base_path is not None:
        text = card.read_text()
        for form in sorted({str(base_path), str(base_path.resolve())}, key=len, reverse=True):
            text = text.replace(form, base_name)
        card.write_text(text)


def init_population(cfg: InitConfig, progress: bool = True) -> Population:
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    base = Path(cfg.base)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"base model folder {base} has no config.json (run `ensemble-train substrate` first?)")
    base_name = cfg.base_name or base.resolve().name
    user_problems = load_jsonl(cfg.data) if cfg.data else None
    plan = member_plan(cfg, dataset_domains(cfg, user_problems) if user_problems is not None else None)
    started = time.perf_counter()
    members: list[Member] = []
    seed_steps, member_steps = branch_budget(cfg)
    out_root = Path(cfg.out)
    work = staging_dir(cfg)
    work.mkdir(parents=True, exist_ok=True)
    try:
        done = [n for n in [SEED_MEMBER] * bool(seed_steps) + [spec["name"] for spec in plan] if _trained(work, n)]
        if done and progress:
            print(f"resuming: {len(done)} trained member(s) kept from an interrupted run ({', '.join(done)})")
        sources: dict[str, Path] = {}
        total_steps = seed_steps + member_steps * len(plan)
        bar = tqdm(total=total_steps, desc="warm-up", disable=not progress, unit="step")
        seed_dir = None
        if seed_steps:
            # Branch-Train-Merge's shared seed: one adapter on every domain alike, which every member
            # then continues from, and which stays in the population as the general expert
            spec = {**plan[0], "name": SEED_MEMBER, "seed": cfg.seed + 1000, "focus": None}
            stream = (
                dataset_stream(user_problems, spec["seed"])
                if user_problems is not None
                else focus_stream(_everything(cfg), cfg.domains[0], spec["seed"])
            )
            seed_dir, loss, cost = _train_once(cfg, spec, stream, work, base_name, bar, seed_steps)
            sources[SEED_MEMBER] = seed_dir
            members.append(_member(spec, cfg, loss, cost, role="seed"))
        for spec in plan:
            stream = spec_stream(cfg, spec, user_problems)
            out, loss, cost = _train_once(cfg, spec, stream, work, base_name, bar, member_steps, init_from=seed_dir)
            sources[spec["name"]] = out
            members.append(_member(spec, cfg, loss, cost, role="branch" if seed_dir else "specialist"))
        bar.close()
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            base_model=BaseModelRef(
                name=base_name,
                path=os.path.relpath(base.resolve(), out_root.resolve()),
                sha256=fingerprint_model_dir(base),
            ),
            generation=0,
            members=members,
            training_cost=total_cost(members),
            config_hash=_config_hash(cfg),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        population = create_population(out_root, manifest, sources, overwrite=cfg.overwrite)
    except BaseException:
        if not any(work.iterdir()):  # nothing trained to keep for a rerun
            work.rmdir()
        raise
    shutil.rmtree(work, ignore_errors=True)
    if progress:
        print(f"wrote {len(members)} members to {cfg.out} in {time.perf_counter() - started:.0f}s")
    return population


def staging_dir(cfg: InitConfig) -> Path:
    """Where `init` keeps each member as soon as it is trained, beside the output and named by the config's hash:
    a run that is killed and started again with the same config keeps the members it finished."""
    out = Path(cfg.out).absolute()
    return out.parent / f".{out.name}.init-{_config_hash(cfg)}"


def _trained(work: Path, name: str) -> bool:
    return (work / f"{name}.json").is_file() and (work / name / "adapter_model.safetensors").is_file()


def _train_once(
    cfg: InitConfig,
    spec: dict,
    stream: Iterator[Problem],
    work: Path,
    base_name: str,
    bar: tqdm,
    steps: int,
    init_from: Path | None = None,
) -> tuple[Path, float, dict[str, int]]:
    """Train one member into ``work/<name>`` (written aside, then renamed), or keep the one a killed run finished.

    Its loss and cost go to ``work/<name>.json`` last, so a member counts as done only once all of it is there.
    """
    name, out = spec["name"], work / spec["name"]
    if _trained(work, name):
        record = json.loads((work / f"{name}.json").read_text())
        bar.update(steps)
        return out, record["loss"], record["cost"]
    partial = work / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cost = {"steps": steps, "examples": 0, "tokens": 0, "target_tokens": 0}
    loss = warm_up_member(cfg, spec, stream, partial, base_name, bar, cost, init_from=init_from)
    partial.rename(out)
    tmp = work / f"{name}.json.tmp"
    tmp.write_text(json.dumps({"loss": loss, "cost": cost}))
    tmp.rename(work / f"{name}.json")
    return out, loss, cost


def _everything(cfg: InitConfig) -> InitConfig:
    """The seed's data: every domain at every level any member trains on (its own and the replayed ones), alike."""
    levels = sorted(set(cfg.difficulties) | set(cfg.focus_difficulties or ()))
    return cfg.model_copy(update={"focus_weight": 0.0, "difficulties": tuple(levels)})


def branch_budget(cfg: InitConfig) -> tuple[int, int]:
    """(the shared seed's steps, each member's steps) for the budget ``members x warmup_steps``.

    With ``seed_share`` s, the seed takes s of the budget and each member (1 - s) of its share, so a
    branched population costs what the same population trained from scratch costs.
    """
    budget = cfg.members * cfg.warmup_steps
    seed_steps = round(cfg.seed_share * budget)
    return seed_steps, (budget - seed_steps) // cfg.members


def total_cost(members: Sequence[Member]) -> dict[str, int]:
    """The sum of the members' recorded training costs (members without one count nothing)."""
    total = {"steps": 0, "examples": 0, "tokens": 0, "target_tokens": 0}
    for m in members:
        for k, v in (m.info.get("training_cost") or {}).items():
            if k in total:
                total[k] += int(v)
    return total


def _member(spec: dict, cfg: InitConfig, loss: float, cost: dict[str, int], role: str) -> Member:
    return Member(
        name=spec["name"],
        rank=spec["rank"],
        alpha=spec["alpha"],
        parents=[SEED_MEMBER] if role == "branch" else [],
        born_generation=0,
        seed=spec["seed"],
        info={
            "role": role,
            "lr": spec["lr"],
            "dropout": spec["dropout"],
            "cut": cfg.cut if role != "seed" else None,
            "focus_domain": spec["focus"],
            "focus_difficulties": (
                None if role == "seed" else list(spec.get("levels") or cfg.focus_difficulties or cfg.difficulties)
            ),
            **({"shard": [spec["shard"], spec["shards"]]} if spec.get("shard") is not None and role != "seed" else {}),
            "warmup_steps": cost["steps"],
            "warmup_loss": round(loss, 4),
            "training_cost": cost,
        },
    )


def _config_hash(cfg: InitConfig) -> str:
    return hashlib.sha256(cfg.model_dump_json(exclude={"out", "overwrite"}).encode()).hexdigest()[:16]
