"""Where an evolve run's work runs: its vLLM engine (in process or remote servers) and its task executor.

:class:`Workers` is the part of :class:`trainer.evolve.loop.Evolver` that holds them: the engine is
started on first use (sized for the members, their children and the control) and synced to the current
generation before each use; the executor (here or on Ray) runs the gradient and scoring tasks with a
progress bar and keeps the retries of lost workers for the generation's record. The evolver sets the
attributes it reads: ``cfg``, ``population``, ``control``, ``progress``, ``engine``, ``executor``,
``retried`` and ``_snapshots``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ensemble_serve.shared.engine_config import EngineConfig
from ensemble_serve.shared.offline_engine import OfflineEngine
from trainer.engines import population_lora_rank
from trainer.evolve.executors import make_executor


class Workers:
    """The engine and the executor of an evolve run (see the module's docstring for the attributes)."""

    def _engine(self) -> OfflineEngine:
        if self.engine is None:
            n = len(self.population.names)
            cfg = EngineConfig(
                max_loras=min(max(n, 1), 16),
                max_cpu_loras=max(2 * n, 4),
                max_lora_rank=self._lora_rank(),
                gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                max_num_seqs=self.cfg.max_num_seqs,
                seed=self.cfg.seed,
            )
            self.engine = OfflineEngine(self.population, cfg, snapshot_root=Path(self._snapshots.name))
        return self.engine

    def _lora_rank(self) -> int:
        """The max_lora_rank the engine needs: the members', the children's and the control's."""
        child = self.cfg.evolution.child_rank
        if self.control is not None:
            child = max(child or 0, self.control.rank)
        return population_lora_rank(self.population, child)

    def _remote_events(self, record: dict[str, Any]) -> None:
        """The remote servers that went down (or came back) and the requests sent again, into `record`."""
        events = self.engine.take_events() if self.engine is not None else []
        if events:
            record.setdefault("remote", []).extend(events)

    def _synced_engine(self) -> OfflineEngine:
        """The engine, serving exactly the current generation's adapters."""
        engine = self._engine()
        engine.sync(self.population)
        return engine

    def _executor(self):
        if self.executor is None:
            cfg = self.cfg
            self.executor = make_executor(
                cfg.executor,
                cfg.ray_address,
                cfg.ray_workers,
                cfg.threads,
                cfg.ray_max_retries,
                cfg.ray_cpus_per_task,
                cfg.ray_gpus_per_task,
            )
        return self.executor

    def _map(
        self, task: Callable[..., dict[str, Any]], calls: Sequence[dict[str, Any]], desc: str, errors: str = "raise"
    ) -> list[Any]:
        """Run the task calls on the executor (results in order), with a progress bar; the retries of lost
        attempts are kept for the generation's record."""
        bar = tqdm(total=len(calls), desc=desc, disable=not self.progress, unit="task", leave=False)
        executor = self._executor()
        try:
            results = executor.map(task, calls, on_done=lambda: bar.update(1), errors=errors)
        finally:
            self.retried.extend(executor.take_retries())
            bar.close()
        return results
