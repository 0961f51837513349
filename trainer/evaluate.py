"""`ensemble-train eval`: each member's per-domain accuracy, generated with vLLM.

All members (and the bare base model) answer the same held-out problems in one
multi-LoRA `generate` call, through the same engine layer the server uses. The chains are
scored by :mod:`trainer.scoring`, the code evolve's held-out evaluation scores with: the same
members, problems, answer mode and generation limit give the same figures in both.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, field_validator

from ensemble_serve.shared.engine_config import EngineConfig
from ensemble_serve.shared.fsutil import atomic_write_text
from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.population import load_population
from ensemble_serve.shared.voting.answers import MODES
from trainer.scoring import disagreement_table, greedy_answers, member_accuracy, record_domain_scores
from trainer.settings import (
    ALL_DOMAINS,
    FrozenConfig,
    RemoteSettings,
    alternatives,
    check_difficulties,
    check_domains,
    one_of,
)
from trainer.tasks.sandbox import Problem, generate_problems, load_jsonl


class EvalConfig(FrozenConfig, RemoteSettings):
    """`ensemble-train eval`: per-domain accuracy of each member, generated with vLLM."""

    population: Path = Field(Path("runs/population"), description="Population directory to evaluate.")
    per_domain: int = Field(64, ge=1, description="Held-out problems per domain.")
    seed: int = Field(1234, description="Seed of the held-out problems.")
    domains: tuple[str, ...] = Field(ALL_DOMAINS, description="Domains to evaluate.")
    difficulties: tuple[int, ...] = Field((1, 2, 3, 4), description="Difficulty levels to evaluate.")
    data: Path | None = Field(None, description="A labelled JSONL dataset to evaluate on instead of the sandbox.")
    include_base: bool = Field(True, description="Also evaluate the base model without an adapter.")
    max_tokens: int = Field(
        128, gt=0, description="Generation limit per chain (evolve's held-out evaluation uses 160)."
    )
    answer: str = Field(
        "natural", description=f"Answer extractor for chains, as evolve's `answer`: {alternatives(MODES)}."
    )
    out: Path | None = Field(
        None,
        description="Write the results as JSON here.",
    )
    gpu_memory_utilization: float = Field(
        0.2, gt=0, le=1, description="vLLM memory fraction (on the CPU backend: of NUMA node 0's memory)."
    )

    _domains = field_validator("domains")(check_domains)
    _diffs = field_validator("difficulties")(check_difficulties)
    _answer = field_validator("answer")(one_of("answer mode", MODES))


def eval_problems(cfg: EvalConfig) -> list[Problem]:
    if cfg.data is not None:
        problems = [p for p in load_jsonl(cfg.data) if p.answer is not None]
        if not problems:
            raise ValueError(f"{cfg.data} has no rows with an `answer` to evaluate against")
        return problems
    return generate_problems(
        cfg.per_domain * len(cfg.domains),
        seed=cfg.seed,
        split="heldout",
        domains=list(cfg.domains),
        difficulties=list(cfg.difficulties),
    )


def format_disagreement(table: dict[str, dict[str, float]]) -> str:
    names = list(table)
    head = f"{'differ':<10}" + "".join(f"{n:>9}" for n in names)
    return "\n".join(
        [head, "-" * len(head)] + [f"{a:<10}" + "".join(f"{table[a][b]:>9.3f}" for b in names) for a in names]
    )


def format_table(acc: dict[str, dict[str, float]]) -> str:
    domains = sorted({d for row in acc.values() for d in row} - {"all"}) + ["all"]
    head = f"{'member':<10}" + "".join(f"{d:>9}" for d in domains)
    lines = [head, "-" * len(head)]
    for member, row in acc.items():
        lines.append(f"{member:<10}" + "".join(f"{row.get(d, float('nan')):>9.3f}" for d in domains))
    return "\n".join(lines)


def run_eval(cfg: EvalConfig, update_manifest: bool = False, engine: OfflineEngine | None = None) -> dict:
    """Every member's (and the base model's) accuracy per domain, and the members' pairwise disagreement.

    Scored as evolve's held-out evaluation scores (:mod:`trainer.scoring`), under `cfg.answer`.
    ``engine``: an :class:`OfflineEngine` on the population's base model to use instead of starting
    one (checked, its adapters synced to this population, and left running).
    """
    population = load_population(cfg.population)
    problems = eval_problems(cfg)
    members: list[str | None] = ([None] if cfg.include_base else []) + list(population.names)
    seconds: dict[str, float] = {}
    cands = greedy_answers(
        population,
        members,
        problems,
        cfg.max_tokens,
        EngineConfig(gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=None),
        engine=engine,
        remote=cfg,
        answer=cfg.answer,
        progress=True,
        seconds=seconds,
    )
    acc = member_accuracy(problems, cands)
    result = {
        "population": str(cfg.population),
        "generation": population.manifest.generation,
        "problems": len(problems),
        "answer": cfg.answer,
        "engine_load_seconds": seconds["engine_load"],
        "generate_seconds": seconds["generate"],
        "accuracy": acc,
        "disagreement": disagreement_table({m: row for m, row in cands.items() if m is not None}),
    }
    if update_manifest:
        record_domain_scores(population.root, acc, fitness=True)
    if cfg.out is not None:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cfg.out), json.dumps(result, indent=2) + "\n")
    return result
