"""`ensemble-train eval`: each member's per-domain accuracy, generated with vLLM.

All members (and the bare base model) answer the same held-out problems in one
multi-LoRA `generate` call, through the same engine layer the server uses.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field, field_validator

from ensemble_serve.shared.engine_config import EngineConfig
from ensemble_serve.shared.fsutil import atomic_write_text
from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.population import Population, load_population, write_manifest
from ensemble_serve.shared.voting import Candidate, candidate_from_text
from trainer.settings import ALL_DOMAINS, FrozenConfig, check_difficulties, check_domains
from trainer.tasks.sandbox import Problem, generate_problems, load_jsonl, verify

BASE = "(base)"


class EvalConfig(FrozenConfig):
    """`ensemble-train eval`: per-domain accuracy of each member, generated with vLLM."""

    population: Path = Field(Path("runs/population"), description="Population directory to evaluate.")
    per_domain: int = Field(64, ge=1, description="Held-out problems per domain.")
    seed: int = Field(1234, description="Seed of the held-out problems.")
    domains: tuple[str, ...] = Field(ALL_DOMAINS, description="Domains to evaluate.")
    difficulties: tuple[int, ...] = Field((1, 2, 3, 4), description="Difficulty levels to evaluate.")
    data: Path | None = Field(None, description="A labelled JSONL dataset to evaluate on instead of the sandbox.")
    include_base: bool = Field(True, description="Also evaluate the base model without an adapter.")
    max_tokens: int = Field(128, gt=0, description="Generation limit per chain.")
    out: Path | None = Field(
        None,
        description="Write the results as JSON here, and the gate heat map as <name>-specialisation.png beside it.",
    )
    gpu_memory_utilization: float = Field(
        0.2, gt=0, le=1, description="vLLM memory fraction (on the CPU backend: of NUMA node 0's memory)."
    )

    _domains = field_validator("domains")(check_domains)
    _diffs = field_validator("difficulties")(check_difficulties)


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


def greedy_candidates(
    engine: OfflineEngine,
    members: Sequence[str | None],
    problems: Sequence[Problem],
    max_tokens: int,
    answer: str = "auto",
    progress: bool = False,
) -> dict[str | None, list[Candidate]]:
    """Every member's greedy chain for every problem, its answer extracted: ``{member: [candidate per problem]}``.

    All (member, problem) pairs go into one multi-LoRA ``generate`` call, so vLLM batches every
    member in the same engine steps. ``None`` is the base model without an adapter.
    """
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    chat = [engine.chat_prompt(p.prompt) for p in problems]
    pairs = [(m, i) for m in members for i in range(len(problems))]
    outputs = engine.generate([chat[i] for _, i in pairs], [m for m, _ in pairs], params, progress=progress)
    cands: dict[str | None, list[Candidate]] = {m: [] for m in members}
    for (m, _), gens in zip(pairs, outputs):
        cands[m].append(candidate_from_text(m or BASE, 0, gens[0].text, gens[0].tokens, answer))
    return cands


def score_members(
    engine: OfflineEngine, problems: Sequence[Problem], members: Sequence[str | None], max_tokens: int
) -> dict[str, dict[str, float]]:
    """accuracy[member][domain] (plus "all") from greedy chains, all members in one batch."""
    return accuracy_of(problems, greedy_candidates(engine, members, problems, max_tokens, progress=True))


def disagreement(cands: dict[str | None, list[Candidate]]) -> dict[str, dict[str, float]]:
    """For every pair of members, the share of problems on which their answers differ (no answer differs too)."""
    names = {m: BASE if m is None else m for m in cands}
    out: dict[str, dict[str, float]] = {}
    for a in cands:
        out[names[a]] = {}
        for b in cands:
            pairs = list(zip(cands[a], cands[b]))
            differ = sum(x.answer is None or y.answer is None or x.answer != y.answer for x, y in pairs)
            out[names[a]][names[b]] = round(differ / len(pairs), 4) if pairs else 0.0
    return out


def format_disagreement(table: dict[str, dict[str, float]]) -> str:
    names = list(table)
    head = f"{'differ':<10}" + "".join(f"{n:>9}" for n in names)
    return "\n".join(
        [head, "-" * len(head)] + [f"{a:<10}" + "".join(f"{table[a][b]:>9.3f}" for b in names) for a in names]
    )


def accuracy_of(problems: Sequence[Problem], cands: dict[str | None, list[Candidate]]) -> dict[str, dict[str, float]]:
    """accuracy[member][domain] (plus "all") of the candidates, checked against the problems' answers."""
    members = list(cands)
    right: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    total: dict[str, int] = defaultdict(int)
    for p in problems:
        total[p.domain] += 1
        total["all"] += 1
    for member, row in cands.items():
        key = BASE if member is None else member
        for p, c in zip(problems, row):
            ok = verify(p, c.text).correct
            right[key][p.domain] += ok
            right[key]["all"] += ok
    return {
        (BASE if m is None else m): {d: right[BASE if m is None else m][d] / total[d] for d in sorted(total)}
        for m in members
    }


def format_table(acc: dict[str, dict[str, float]]) -> str:
    domains = sorted({d for row in acc.values() for d in row} - {"all"}) + ["all"]
    head = f"{'member':<10}" + "".join(f"{d:>9}" for d in domains)
    lines = [head, "-" * len(head)]
    for member, row in acc.items():
        lines.append(f"{member:<10}" + "".join(f"{row.get(d, float('nan')):>9.3f}" for d in domains))
    return "\n".join(lines)


def record_scores(population: Population, acc: dict[str, dict[str, float]]) -> None:
    """Write each member's per-domain accuracy (domain_scores) and mean accuracy (fitness) into the manifest."""
    members = [
        m.model_copy(
            update={
                "domain_scores": {d: v for d, v in acc[m.name].items() if d != "all"},
                "fitness": acc[m.name]["all"],
            }
        )
        for m in population.manifest.members
    ]
    write_manifest(population.root, population.manifest.model_copy(update={"members": members}))


def run_eval(cfg: EvalConfig, update_manifest: bool = False) -> dict:
    population = load_population(cfg.population)
    problems = eval_problems(cfg)
    started = time.perf_counter()
    engine = OfflineEngine(
        population, EngineConfig(gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=None)
    )
    load_seconds = time.perf_counter() - started
    members: list[str | None] = ([None] if cfg.include_base else []) + list(population.names)
    started = time.perf_counter()
    cands = greedy_candidates(engine, members, problems, cfg.max_tokens, progress=True)
    acc = accuracy_of(problems, cands)
    result = {
        "population": str(cfg.population),
        "generation": population.manifest.generation,
        "problems": len(problems),
        "engine_load_seconds": round(load_seconds, 1),
        "generate_seconds": round(time.perf_counter() - started, 1),
        "accuracy": acc,
        "disagreement": disagreement({m: row for m, row in cands.items() if m is not None}),
    }
    if update_manifest:
        record_scores(population, acc)
    if cfg.out is not None:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cfg.out), json.dumps(result, indent=2) + "\n")
    return result
