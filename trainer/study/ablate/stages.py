"""The evolve stage of an ablation cell: its starting population and the evolve run, resumed or found done.

A stage is the evolve run of one combination of :data:`trainer.study.ablate.design.STAGE_FACTORS`
levels and one seed; the cells that differ only in the router share it. Its population lives in
``<out>/stages/<stage>/seed-<s>/population`` and its summary in ``done.json`` next to it, written
last: a stage with ``done.json`` is never run again, one without is resumed (or started over
when it never got its run file). One vLLM engine serves every stage (its adapters are re-synced
to each stage's population); a stage that raises drops it, so the next stage starts a fresh one.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ensemble_serve.shared.embedded import EMBEDDED_POPULATION
from ensemble_serve.shared.engine_config import EngineConfig
from ensemble_serve.shared.fsutil import atomic_write_text, remove_tree
from ensemble_serve.shared.lora import load_lora, save_lora
from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.population import Population, create_population, load_population, read_history
from trainer.engines import population_lora_rank
from trainer.evolve.config import EvolveConfig
from trainer.evolve.lifecycle import fresh_adapter
from trainer.evolve.loop import run_evolve
from trainer.evolve.run import RUN_FILE as EVOLVE_RUN_FILE
from trainer.evolve.seeds import derive_seed
from trainer.study.ablate.config import AblateConfig
from trainer.study.ablate.design import AblationError, stage_id

__all__ = ["EvolveStages", "misaligned_weights"]


class EvolveStages:
    """Runs the evolve stages of an ablation on one shared vLLM engine (``close`` releases it)."""

    def __init__(self, cfg: AblateConfig, progress: bool = False) -> None:
        self.cfg = cfg
        self.progress = progress
        self.evolve_base = EvolveConfig(**cfg.evolve)
        self.engine: OfflineEngine | None = None
        self._snapshots = tempfile.TemporaryDirectory(prefix="ensemble-ablate-adapters-")

    def close(self) -> None:
        self.engine = None
        gc.collect()
        self._snapshots.cleanup()

    # -- the starting populations

    def source(self, seed: int) -> Path:
        """The pre-aligned population a seed starts from (the config's, with {seed} filled in, or the embedded one)."""
        return self.cfg.population_for(seed) or EMBEDDED_POPULATION

    def start(self, levels: Mapping[str, str], seed: int) -> Path:
        """The stage's starting population: the source itself, its misaligned copy, or its re-initialised copy."""
        if levels["init"] == "pre_aligned" and levels["alignment"] == "aligned":
            return self.source(seed)
        kind = "random" if levels["init"] == "random" else "misaligned"
        root = self.cfg.out / "starts" / f"{kind}-seed-{seed}"
        if not root.exists():
            self._derived_start(root, seed, kind)
        return root

    def _derived_start(self, root: Path, seed: int, kind: str) -> None:
        """A copy of the seed's source whose members are re-initialised as PEFT does (B = 0), or misaligned.

        Misaligned: the members with a ``focus_domain``, in name order, each take the weights of the
        next one (the last the first's), so no member holds what was trained for its own family;
        members without a focus family (a branched population's shared seed) keep their own.
        """
        source = load_population(self.source(seed))
        base = source.manifest.base_model
        if base.path is not None and source.base_model_path is not None:
            base = base.model_copy(update={"path": os.path.relpath(source.base_model_path.resolve(), root.absolute())})
        held = {m.name: m.name for m in source.manifest.members}
        if kind == "misaligned":
            held.update(misaligned_weights(source))
        members = [
            m.model_copy(
                update={
                    "path": f"members/{m.name}",
                    "fitness": None,
                    "domain_scores": {},
                    "parents": [],
                    # a misaligned member says whose weights it holds (its focus family stays its slot's)
                    "info": {**m.info, **({"weights_of": held[m.name]} if held[m.name] != m.name else {})},
                }
            )
            for m in source.manifest.members
        ]
        manifest = source.manifest.model_copy(update={"members": members, "base_model": base, "generation": 0})
        with tempfile.TemporaryDirectory(prefix="ensemble-ablate-start-") as work:
            folders = {}
            for m in source.manifest.members:
                weights = load_lora(source.member_dir(held[m.name]))
                if kind == "random":
                    rng = torch.Generator().manual_seed(derive_seed("ablate-random-init", seed, m.name))
                    weights = fresh_adapter(weights, rng)
                folders[m.name] = save_lora(weights, Path(work) / m.name)
            root.parent.mkdir(parents=True, exist_ok=True)
            create_population(root, manifest, folders)

    # -- the evolve run

    def _engine(self, population_dir: Path) -> OfflineEngine:
        if self.engine is None:
            pop = load_population(population_dir)
            n = len(pop.names)
            rank = population_lora_rank(pop, self.evolve_base.evolution.child_rank)
            self.engine = OfflineEngine(
                pop,
                EngineConfig(
                    max_loras=min(max(n, 1), 16),
                    max_cpu_loras=max(2 * n, 4),
                    max_lora_rank=rank,
                    gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                    max_num_seqs=self.evolve_base.max_num_seqs,
                    seed=0,
                ),
                snapshot_root=Path(self._snapshots.name),
            )
        return self.engine

    def evolve_config(self, levels: Mapping[str, str], seed: int, start: Path, out: Path) -> EvolveConfig:
        """The evolve run of a stage: the shared settings plus the cell's switches and the budget."""
        settings = dict(self.cfg.evolve)
        evolution = {**settings.pop("evolution", {}), "enabled": levels["evolution"] == "on"}
        lifecycle = {**settings.pop("lifecycle", {}), "enabled": levels["lifecycle"] == "on"}
        if levels["inheritance"] == "none":
            lifecycle["inherit_alpha"] = 0.0  # the alpha = 0 counterfactual: deaths as before, nothing blended
        return EvolveConfig(
            **settings,
            population=start,
            out=out,
            generations=self.cfg.generations,
            seed=seed,
            fitness_scope=levels["scope"],
            heldout_per_domain=0,
            evolution=evolution,
            lifecycle=lifecycle,
        )

    def stage(self, levels: Mapping[str, str], seed: int) -> tuple[Path, dict[str, Any]]:
        """The evolved population of a stage (run, resumed, or found done) and the stage's summary."""
        folder = self.cfg.out / "stages" / stage_id(levels) / f"seed-{seed}"
        done = folder / "done.json"
        population = folder / "population"
        if done.exists():
            return population, json.loads(done.read_text())
        start = self.start(levels, seed)
        cfg = self.evolve_config(levels, seed, start, population)
        resume = (population / EVOLVE_RUN_FILE).exists()
        if population.exists() and not resume:
            remove_tree(population)  # a copy that never got its run file: start the stage over
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:
            run_evolve(cfg, resume=resume, progress=self.progress, engine=self._engine(start))
        except KeyboardInterrupt:
            raise
        except Exception:
            self.engine = None  # the engine may be the cause (or dead): the next stage starts a fresh one
            gc.collect()
            raise
        history = [r for r in read_history(population) if "members" in r]
        summary = {
            "generations": self.cfg.generations,
            "seconds": round(time.perf_counter() - started, 2),
            "train_steps_per_member": self.cfg.generations * cfg.train_steps,
            "last": _stage_last(history),
        }
        atomic_write_text(done, json.dumps(summary, indent=2))
        return population, summary


def misaligned_weights(population: Population) -> dict[str, str]:
    """Whose weights each focused member takes in a misaligned start: the next focused member's, in name order.

    Refused (:class:`AblationError`) when fewer than two families have a specialist: then every
    rotation leaves some member with weights trained for its own family.
    """
    focus = {m.name: m.info["focus_domain"] for m in population.manifest.members if m.info.get("focus_domain")}
    focused = sorted(focus)
    families = set(focus.values())
    if len(families) < 2:
        raise AblationError(
            f"{population.root}: a misaligned start needs specialists of at least two families (members with a "
            f"focus_domain); this population has {sorted(families) or 'none'}"
        )
    # rotate by the smallest shift that moves every member off its own family (two specialists a family
    # in name order, e.g. a0 a1 b0 b1, need a shift of two)
    for shift in range(1, len(focused)):
        moved = {n: focused[(i + shift) % len(focused)] for i, n in enumerate(focused)}
        if all(focus[src] != focus[n] for n, src in moved.items()):
            return moved
    raise AblationError(
        f"{population.root}: no rotation of the specialists moves every one of them off its own family "
        f"({dict(sorted(focus.items()))}); one family holds more than half of them"
    )


def _stage_last(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if not history:
        return {}
    last = history[-1]
    out: dict[str, Any] = {"generation": last.get("generation")}
    for key in ("lifecycle", "train", "diversity", "fitness"):
        if key in last:
            out[key] = last[key]
    return out
