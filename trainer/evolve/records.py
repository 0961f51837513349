"""What an evolve run records: ``history.jsonl`` lines, TensorBoard scalars, phase timings.

One history line per generation (and one for the starting generation when there are held-out
problems): the run id, config hash and labels; the seconds of each phase; fitness statistics,
every term per member, the weights and scope used; diversity; what the gradient phase saw
(chains parsed, labelled, verified, examples per member); the lifecycle's events; one entry per
member (status, parents, operators, held-out accuracy). Lines are plain JSON values: the report
(:mod:`trainer.study.report`) and the ablation harness read them back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ensemble_serve.shared.population import Manifest
from ensemble_serve.shared.voting.answers import answers_equal
from trainer.evolve.config import EvolveConfig
from trainer.evolve.fitness import Evidence, FitnessResult, diversity_summary
from trainer.evolve.lifecycle import LifecycleConfig, LifecycleResult
from trainer.evolve.run import EvolveError


def record_base(run: dict[str, Any], cfg: EvolveConfig, g: int) -> dict[str, Any]:
    """The fields every history line starts with."""
    return {
        "generation": g,
        "run_id": run["run_id"],
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "labels": cfg.labels,
        "config_hash": run["config_hash"],
    }


def initial_members(manifest: Manifest, heldout: dict[str, Any]) -> list[dict[str, Any]]:
    """The member entries of the starting generation's line, with their held-out accuracy."""
    return [
        {
            "name": m.name,
            "parents": list(m.parents),
            "born_generation": m.born_generation,
            "rank": m.rank,
            "fitness": m.fitness,
            "status": "initial",
            "heldout": heldout["members"][m.name],
        }
        for m in manifest.members
    ]


def fitness_summary(result: FitnessResult) -> dict[str, Any]:
    """A generation's fitness: statistics, every term per member, the weights and scope used, diversity."""
    return dict(
        fitness=stats(list(result.fitness.values())),
        terms={t: {m: round(v, 6) for m, v in vals.items()} for t, vals in result.terms.items()},
        fitness_weights=result.used,
        fitness_scope=result.scope,
        **({"fitness_scope_note": result.scope_note} if result.scope_note else {}),
        diversity=diversity_summary(result.terms),
    )


def train_summary(
    ev: Evidence, labels: Mapping[str, Sequence[str | None]], examples: dict[str, list[tuple[str, str]]]
) -> dict[str, Any]:
    """What the gradient phase saw: chains, how many parsed and were verified, examples per member."""
    chains = [c for row in ev.candidates.values() for r in row for c in r]
    verified = sum(
        c.valid and lab is not None and answers_equal(c.answer, lab)
        for m in ev.members
        for lab, row in zip(labels[m], ev.candidates[m])
        for c in row
    )
    return {
        "problems": len(ev.problems),
        "chains": len(chains),
        "parsed": round(sum(c.valid for c in chains) / max(1, len(chains)), 4),
        "labelled": sum(any(labels[m][i] is not None for m in ev.members) for i in range(len(ev.problems))),
        "verified": round(verified / max(1, len(chains)), 4),
        "examples": {m: len(x) for m, x in examples.items()},
        "mean_agreement": round(float(np.mean(ev.agreement)) if ev.agreement else 0.0, 4),
    }


def lifecycle_summary(life: LifecycleResult, cfg: LifecycleConfig) -> dict[str, Any]:
    """The history record's account of a lifecycle step (names only, JSON-able)."""
    return {
        "deaths": list(life.deaths),
        "inherited": dict(life.inherited),
        "mutated": list(life.mutated),
        "newborn": [
            {"name": b.name, "replaced": dead, "parents": list(b.parents), "reallocation": cfg.reallocation}
            for b, dead in zip(life.newborn, life.deaths)  # newborn k takes the slot of deaths[k]
        ],
    }


def progress_line(record: dict[str, Any]) -> str:
    """One line for the terminal: the generation's fitness and, when evaluated, held-out accuracy."""
    fitness, h = record["fitness"], record.get("heldout", {})
    line = f"generation {record['generation']}: fitness best {fitness['best']:.3f} mean {fitness['mean']:.3f}"
    if h:
        line += f" | held-out best {h['best_member']:.3f} mean {h['mean_member']:.3f} vote {h['ensemble_vote']:.3f}"
    return line


def stats(values: list[float]) -> dict[str, float]:
    """Best, mean and minimum, rounded (zeros for no values)."""
    if not values:
        return {"best": 0.0, "mean": 0.0, "min": 0.0}
    return {
        "best": round(max(values), 6),
        "mean": round(sum(values) / len(values), 6),
        "min": round(min(values), 6),
    }


def secs(started: float) -> float:
    """Seconds since `started` (a `time.perf_counter()` value), rounded to 10 ms."""
    return round(time.perf_counter() - started, 2)


@contextmanager
def timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Record the seconds the block takes as `seconds[phase]` (when it completes)."""
    started = time.perf_counter()
    yield
    seconds[phase] = secs(started)


class TensorBoardLog:
    """Fitness, diversity and held-out scalars of every history line, per generation (no-op without a logdir)."""

    def __init__(self, logdir: Path | None):
        self.writer = None
        if logdir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise EvolveError(
                    f"tensorboard logging needs TensorBoard; install the `train` extra (pip install 'ensemble-serve[train]') ({e})"
                ) from None
            self.writer = SummaryWriter(str(logdir))

    def log(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        g = record["generation"]
        for key in ("best", "mean", "min"):
            if key in record.get("fitness", {}):
                self.writer.add_scalar(f"fitness/{key}", record["fitness"][key], g)
        for key, v in record.get("diversity", {}).items():
            self.writer.add_scalar(f"diversity/{key}", v, g)
        for key in ("best_member", "mean_member", "ensemble_vote", "oracle"):
            if key in record.get("heldout", {}):
                self.writer.add_scalar(f"heldout/{key}", record["heldout"][key], g)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
