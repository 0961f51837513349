"""A compute-matched control beside an evolve run: one adapter trained on what the population learns from.

``control: PATH`` (a PEFT adapter folder on the population's base model, e.g. a generalist of
``bench/baselines/`` or one that bench/recipe.py trained) runs beside the population. Each generation
it fine-tunes on the union of the members' training examples (the same self-labelled chains, replay
included) for the sum of the members' gradient steps, with the task the members train with
(:func:`trainer.evolve.executors.train_member_task`, on the same executor). It never labels, votes,
evolves or enters the population. It is evaluated on the run's held-out problems beside the members
(``control`` in each history line: its accuracy overall and per level, its steps and examples), so
what self-play gives the population can be set against one adapter given the same data and the same
gradient steps.

Its weights after generation g live in ``control/<run id>/g<g>/`` of the population directory,
written (atomically) before the generation's manifest swap; a resumed run reads the committed
generation's, and the folder of a generation that was never committed is replaced when it runs again.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ensemble_serve.shared.lora import (
    LoraError,
    LoraWeights,
    check_compatible,
    load_lora,
    lora_from_bytes,
    lora_to_bytes,
    save_lora,
)
from ensemble_serve.shared.population import Population
from trainer.evolve.calls import DEFAULT_LR, train_steps
from trainer.evolve.config import EvolveConfig
from trainer.evolve.evaluation import evaluate_heldout
from trainer.evolve.executors import train_member_task
from trainer.evolve.retention import stage
from trainer.evolve.seeds import derive_seed
from trainer.tasks.sandbox import Problem

CONTROL_DIR = "control"
CONTROL_NAME = "control"


class ControlError(ValueError):
    """A control adapter that cannot run beside this population."""


class ControlArm:
    """The control adapter of one evolve run: its weights per generation, its training and its evaluation."""

    def __init__(self, source: Path, root: Path, run_id: str, members: Mapping[str, LoraWeights]):
        try:
            self.source = load_lora(source)
        except (LoraError, OSError) as e:
            raise ControlError(f"control {source}: {e}") from None
        first = next(iter(members.values()))
        # the base is the engine's to check; the name an adapter records for it varies (a path, a hub id)
        base_name = first.config.get("base_model_name_or_path")
        self.source = dataclasses.replace(
            self.source, config={**self.source.config, "base_model_name_or_path": base_name}
        )
        try:
            check_compatible([first, self.source], [next(iter(members)), CONTROL_NAME])
        except LoraError as e:
            raise ControlError(f"control {source} does not fit the population's members: {e}") from None
        self.folder = root / CONTROL_DIR / run_id

    @property
    def rank(self) -> int:
        return self.source.rank

    def weights(self, generation: int) -> LoraWeights:
        """The control's weights after `generation`: the last saved at or before it (a skipped generation
        trains nothing), else the source (before this run's first generation)."""
        for g in range(generation, -1, -1):
            if (self.folder / f"g{g}").is_dir():
                return load_lora(self.folder / f"g{g}")
        return self.source

    def call(
        self,
        base: str,
        examples: Mapping[str, Sequence[tuple[str, str]]],
        steps: int,
        generation: int,
        batch_size: int,
        lr: float,
        seed: int,
        threads: int,
    ) -> dict[str, Any]:
        """The `train_member_task` call of generation `generation`: the union of the members' examples
        (first occurrence kept, in member order) for `steps` steps from the last generation's weights."""
        seen: set[tuple[str, str]] = set()
        union = [ex for rows in examples.values() for ex in rows if not (ex in seen or seen.add(ex))]
        return dict(
            base=base,
            adapter=lora_to_bytes(self.weights(generation - 1)),
            examples=union,
            steps=steps if union else 0,
            batch_size=batch_size,
            lr=lr,
            seed=derive_seed(seed, "train", generation, CONTROL_NAME),
            threads=threads,
        )

    def train(
        self,
        cfg: EvolveConfig,
        examples: Mapping[str, Sequence[tuple[str, str]]],
        generation: int,
        pop: Population,
        run_tasks: Callable[..., list[Any]],
    ) -> dict[str, int]:
        """Generation `generation`'s gradient phase on the members' examples for the sum of their steps, run
        by `run_tasks(task, calls, description)` (the evolve loop's executor); the weights are saved."""
        steps = sum(train_steps(cfg, len(x)) for x in examples.values() if x)
        lr = cfg.train_lr or DEFAULT_LR
        base = str(pop.base_model_path)
        call = self.call(base, examples, steps, generation, cfg.train_batch_size, lr, cfg.seed, cfg.threads)
        (result,) = run_tasks(train_member_task, [call], "control")
        self.save(generation, result)
        return {"steps": call["steps"], "examples": len(call["examples"])}

    def save(self, generation: int, result: Mapping[str, Any]) -> None:
        """Keep the weights a training call returned as generation `generation`'s (atomically)."""
        weights = lora_from_bytes(result["adapter"])
        target = self.folder / f"g{generation}"
        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.folder, prefix=".tmp-") as work:
            save_lora(weights, Path(work) / "adapter")
            shutil.rmtree(target, ignore_errors=True)
            (Path(work) / "adapter").rename(target)

    def evaluate(
        self,
        engine: Any,
        pop: Population,
        generation: int,
        problems: Sequence[Problem],
        answer: str,
        synced: Callable[[], Any],
    ) -> dict[str, Any]:
        """The control's greedy accuracy on the held-out problems, overall and per level; `synced()` puts
        the engine back on the population afterwards."""
        with tempfile.TemporaryDirectory(prefix="ensemble-control-") as work:
            engine.sync(stage(pop, {CONTROL_NAME: self.weights(generation)}, Path(work)))
            result = evaluate_heldout(engine, [CONTROL_NAME], problems, answer)
        synced()
        levels = {lv: row["best_member"] for lv, row in result.get("levels", {}).items()}
        return {"all": result["members"][CONTROL_NAME]["all"], "levels": levels}
