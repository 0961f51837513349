"""The problems of an evolve run: a dataset file, each generation's fresh batch, the held-out set.

Invariants: generation g's batch depends only on (seed, g) and the dataset (sandbox problems
are generated from ``derive_seed(seed, "problems", g)``, dataset rows are drawn in an order
shuffled by the same seed), so a resumed run sees the same problems; with ``labels: hidden``
the batch carries no answers or chains. Held-out problems come from their own split (or
``eval_data``) and are never trained on.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

from trainer.evolve.config import EvolveConfig
from trainer.evolve.retention import Validation, validation_problems
from trainer.evolve.run import EvolveError
from trainer.evolve.seeds import derive_seed
from trainer.tasks.sandbox import DatasetError, Problem, generate_problems, load_jsonl


def load_dataset(path: Path, skip_invalid: bool) -> list[Problem]:
    """The problems of a JSONL file, refused (EvolveError) when none is valid."""
    try:
        problems = load_jsonl(path, skip_invalid=skip_invalid)
    except DatasetError as e:
        raise EvolveError(str(e)) from None
    if not problems:
        raise EvolveError(f"{path}: no valid problems left to train on")
    return problems


def generation_problems(cfg: EvolveConfig, generation: int, dataset: Sequence[Problem] | None) -> list[Problem]:
    """The fresh problems of one generation (answers removed when labels are hidden)."""
    n = cfg.problems_per_generation
    if dataset is None:
        problems = generate_problems(
            n,
            seed=derive_seed(cfg.seed, "problems", generation),
            split="train",
            domains=list(cfg.domains),
            difficulties=list(cfg.difficulties),
        )
    else:
        rng = random.Random(derive_seed(cfg.seed, "problems", generation))
        order = list(range(len(dataset)))
        rng.shuffle(order)
        problems = [dataset[i] for i in order[:n]]
    if not problems:
        raise EvolveError("the problem batch is empty")
    if cfg.labels == "hidden":
        problems = [dataclasses.replace(p, answer=None, chain=None) for p in problems]
    return problems


def generation_truth(cfg: EvolveConfig, generation: int, dataset: Sequence[Problem] | None) -> list[str | None]:
    """The answers of generation `generation`'s batch, for the label audit only (the loop's batch has none
    when labels are hidden; this draws the same problems again with their answers)."""
    return [
        p.answer for p in generation_problems(cfg.model_copy(update={"labels": "ground_truth"}), generation, dataset)
    ]


def heldout_problems(cfg: EvolveConfig) -> list[Problem]:
    """The held-out problems every generation is evaluated on (none when switched off)."""
    if cfg.eval_data is not None:
        problems = [p for p in load_dataset(cfg.eval_data, cfg.skip_invalid) if p.answer is not None]
        if not problems:
            raise EvolveError(f"{cfg.eval_data}: no rows with an `answer` to evaluate against")
        return problems
    if cfg.heldout_per_domain == 0:
        return []
    return generate_problems(
        cfg.heldout_per_domain * len(cfg.domains),
        seed=cfg.eval_seed,
        split="heldout",
        domains=list(cfg.domains),
        difficulties=list(cfg.difficulties),
    )


def validation(cfg: EvolveConfig, heldout: Sequence[Problem]) -> Validation | None:
    """The retention's validation problems and figures (:mod:`trainer.evolve.retention`), when the guard or
    frozen teachers need them (None otherwise); a validation file that cannot be read is refused here."""
    ret = cfg.retention
    if not ret.validates:
        return None
    try:
        problems = validation_problems(ret, cfg.domains, cfg.difficulties, heldout)
        return Validation(ret, problems, cfg.answer)
    except (DatasetError, ValueError, OSError) as e:
        raise EvolveError(f"retention: {e}") from None
