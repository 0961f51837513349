"""`ensemble-train evolve`: population self-play, one generation at a time.

Each generation (:meth:`Evolver.step`, one method per phase):

1. **self-play**: every member samples chains of thought for a fresh batch of
   problems, all members in one multi-LoRA vLLM batch (the engine layer the
   server uses) (:mod:`trainer.evolve.problems`, :mod:`trainer.evolve.sampling`);
2. **scoring**: answers are extracted and voted on (the server's majority vote),
   members judge each other's chains and are probed for hidden states and
   output distributions (torch tasks on the executor, :mod:`trainer.evolve.calls`),
   chains are embedded, and the fitness terms are combined (:mod:`trainer.evolve.fitness`);
3. **gradient phase**: each member fine-tunes (PEFT) on verified chains:
   right answers with labels, consensus or peer labels with labels hidden
   (:mod:`trainer.evolve.labels`; :mod:`trainer.evolve.executors` runs the tasks,
   here or on Ray); the labels are audited against the hidden answers for the
   record only (:mod:`trainer.evolve.audit`); what members keep (replay, frozen teachers,
   the forgetting guard's rollback) is :mod:`trainer.evolve.retention`'s;
4. **evolution**: elites stay, selected parents make children by crossover and
   mutation, children replace the members chosen by the replacement operator
   (:mod:`trainer.evolve.step`, :mod:`trainer.evolve.operators`); then, when switched on,
   the adapter lifecycle (:mod:`trainer.evolve.lifecycle`: death, inheritance, SVD
   mutation, slot reallocation), laid out as the next manifest by :mod:`trainer.evolve.nextgen`;
5. **commit**: the new generation is written atomically (:mod:`trainer.evolve.commit`),
   evaluated on held-out problems (:mod:`trainer.evolve.evaluation`), and a line goes to
   ``history.jsonl`` (:mod:`trainer.evolve.records`).

Durability: all randomness of generation g derives from (seed, g) and the
committed generation g-1 (:mod:`trainer.evolve.seeds`), and nothing else carries over
(each gradient phase starts a fresh optimizer), so a run resumed from the last committed
generation ends where an uninterrupted run ends. The run's settings live in
``evolve-run.json`` in the population directory (:mod:`trainer.evolve.run`); a half-written
generation is never visible (temp folders + atomic manifest swap), and the history line of a
generation that was committed but not yet recorded is completed on resume.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ensemble_serve.shared.fsutil import remove_tree
from ensemble_serve.shared.lora import LoraError, LoraWeights
from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.offline_remote import RemoteOfflineEngine, RemoteSetupError
from ensemble_serve.shared.population import (
    Manifest,
    Population,
    PopulationError,
    append_history,
    load_population,
    prune_unreferenced,
    read_history,
    read_manifest,
)
from ensemble_serve.shared.voting import Candidate
from trainer.engines import EngineMismatch, check_engine, remote_engine
from trainer.evolve import operators
from trainer.evolve.audit import label_audit
from trainer.evolve.calls import (
    add_scores,
    embed_chains,
    failed_members,
    score_calls,
    train_calls,
    trained_weights,
)
from trainer.evolve.commit import PENDING_FILE, has_record, read_pending, write_generation
from trainer.evolve.config import EvolveConfig
from trainer.evolve.control import ControlArm, ControlError
from trainer.evolve.curriculum import (
    PROPOSERS,
    CurriculumError,
    Plan,
    ProposerContext,
    after_self_play,
    curriculum_state,
    start_level,
)
from trainer.evolve.evaluation import add_heldout, evaluate_heldout, heldout_summary
from trainer.evolve.executors import score_member_task, train_member_task
from trainer.evolve.fitness import Evidence, compute_fitness
from trainer.evolve.labels import labelling_chains, member_labels, training_examples
from trainer.evolve.nextgen import apply_lifecycle, next_manifest, run_lifecycle
from trainer.evolve.problems import (
    generation_problems,
    generation_truth,
    heldout_problems,
    load_dataset,
    validation,
)
from trainer.evolve.records import (
    TensorBoardLog,
    fitness_summary,
    initial_members,
    lifecycle_summary,
    progress_line,
    record_base,
    secs,
    stats,
    timed,
    train_summary,
)
from trainer.evolve.retention import choose_teachers, retained_examples
from trainer.evolve.routed import RoutedPeers, RoutedPeersError, routed_summary
from trainer.evolve.run import RUN_FILE, EvolveError, Interrupted, load_members, prepare_run, stop_signals
from trainer.evolve.sampling import self_play
from trainer.evolve.step import check_operators, evolutionary_step
from trainer.evolve.workers import Workers
from trainer.scoring import record_domain_scores
from trainer.tasks.sandbox import DatasetError, Problem

JUDGE_TERMS = ("cross_eval", "diversity_hidden", "diversity_output")
"""Fitness terms that need every member run as a judge and probe subject (torch tasks on the executor)."""


class Evolver(Workers):
    """One evolve run over one population directory: the engine, the executor and the logs it holds."""

    def __init__(
        self,
        cfg: EvolveConfig,
        root: Path,
        run: dict[str, Any],
        progress: bool = True,
        engine: OfflineEngine | None = None,
    ):
        self.cfg = cfg
        self.root = root
        self.run = run
        self.progress = progress
        self.dataset = load_dataset(cfg.data, cfg.skip_invalid) if cfg.data is not None else None
        self.heldout = heldout_problems(cfg)
        self.validation = validation(cfg, self.heldout)
        self.population = load_population(root)
        # member folders of a commit that was killed before its manifest swap are not part of any generation
        prune_unreferenced(root)
        members = load_members(self.population)  # the members can evolve together, or the run is refused here
        self.control = None
        if cfg.control is not None:
            try:
                self.control = ControlArm(cfg.control, root, run["run_id"], members)
            except ControlError as e:
                raise EvolveError(str(e)) from None
        check_operators(cfg.evolution, self.population)
        self.routed = None  # label_peers: routed: the population's router picks each problem's labellers
        if cfg.label_peers == "routed":
            try:
                self.routed = RoutedPeers(self.population, cfg)
            except RoutedPeersError as e:
                raise EvolveError(str(e)) from None
        if cfg.labels == "hidden" and cfg.label_rule == "leave_self_out" and len(self.population.names) < 2:
            raise EvolveError(
                "label_rule leave_self_out labels a member by the OTHER members' chains: it needs at least two "
                "members (a single adapter: label_rule consensus, its own samples' majority)"
            )
        # a caller's engine (same base model) saves vLLM's start-up when one process runs many evolve runs
        self.engine: OfflineEngine | RemoteOfflineEngine | None = engine
        self._own_remote = None
        if engine is not None:
            try:
                check_engine(engine, self.population, self._lora_rank())
            except EngineMismatch as e:
                raise EvolveError(str(e)) from None
        elif cfg.remote:  # the servers are checked now, before anything runs
            try:
                self.engine = self._own_remote = remote_engine(self.population, cfg)
            except RemoteSetupError as e:
                raise EvolveError(str(e)) from None
        self.executor = None
        self.retried: list[dict[str, Any]] = []  # this generation's retried Ray tasks
        self.train_failed: list[dict[str, str]] = []  # this generation's failed training tasks (keep_member)
        self.tb = TensorBoardLog(cfg.tensorboard)
        self._snapshots = tempfile.TemporaryDirectory(prefix="ensemble-evolve-adapters-")
        self.stop_state = {"stop": False}

    # -- the run

    def run_all(self) -> list[dict[str, Any]]:
        """Finish a pending generation, record the start (held-out), then step to the target generation."""
        target = self.run["target_generation"]
        records = []
        with stop_signals(self.stop_state):
            self._finish_pending()
            if self.heldout and not has_record(self.root, self.population.manifest.generation):
                records.append(self._baseline_record())
            while self.population.manifest.generation < target:
                records.append(self.step())
        return records

    def step(self) -> dict[str, Any]:
        """Run one generation and commit it; returns its history record."""
        cfg, pop = self.cfg, self.population
        g = pop.manifest.generation + 1
        record = record_base(self.run, cfg, g)
        seconds: dict[str, float] = {}
        self.retried, self.train_failed = [], []

        plan = None
        if cfg.curriculum.enabled:  # 0. the curriculum: what this generation practises
            with timed(seconds, "propose"):
                plan = self._propose(g)
            if plan.skipped:
                return self._skip(g, plan, record, seconds)

        with timed(seconds, "generate"):  # 1. self-play
            problems, candidates = self._self_play(g, plan)
            routed = self._routed_groups(problems)

        with timed(seconds, "score"):  # 2. scoring
            weights = load_members(pop)
            ev = Evidence(
                members=list(pop.names), problems=problems, candidates=candidates, labels_visible=cfg.labels != "hidden"
            )
            self._score(ev, weights)
            result = compute_fitness(ev, cfg.fitness, cfg.fitness_scope)

        before, teachers = None, {}
        if self.validation is not None:  # what members keep (retention): validation figures and teachers
            with timed(seconds, "validate"):
                before = self.validation.figures(self._engine(), pop)
                teachers = choose_teachers(pop, before) if cfg.retention.teachers else {}
        with timed(seconds, "train"):  # 3. gradient phase
            focus = self._focus(pop)
            labels = member_labels(ev, cfg, focus, teachers, routed)
            examples = retained_examples(
                training_examples(ev, labels, cfg, focus), pop, teachers, cfg.retention, cfg, g, self.dataset
            )
            trained, losses = self._train(pop, weights, examples, g)
        if self.control is not None:
            with timed(seconds, "control"):
                record["control"] = self.control.train(self.cfg, examples, g, pop, self._map)
        if before is not None and cfg.retention.guard:
            with timed(seconds, "guard"):  # members that forgot their own family go back
                trained, record["guard"] = self.validation.guard(self._engine(), pop, before, weights, trained)

        with timed(seconds, "evolve"):  # 4. evolution
            niches = focus if cfg.niche else None
            elite, replaced, children = evolutionary_step(
                pop.names, trained, result.fitness, cfg, g, result.held_out, niches
            )
            life = run_lifecycle(pop, g, trained, result.fitness, replaced, children, cfg)

        # 5. commit
        manifest, adapters, members = next_manifest(
            pop, g, trained, losses, result.fitness, elite, replaced, children, cfg.seed, self.run["config_hash"]
        )
        manifest, adapters, members = apply_lifecycle(manifest, adapters, members, life, g, cfg)
        if cfg.lifecycle.enabled:
            record["lifecycle"] = lifecycle_summary(life, cfg.lifecycle)
        record.update(
            seconds=seconds, **fitness_summary(result), train=train_summary(ev, labels, examples), members=members
        )
        if teachers:
            record["teachers"] = teachers
        if routed is not None:
            record["routed_labellers"] = routed_summary(problems, routed, focus, self.routed.k)
        if self.retried:  # lost workers whose tasks ran again (same arguments, same results)
            record["retried"] = list(self.retried)
        self._remote_events(record)
        if self.train_failed:
            record["train_failed"] = list(self.train_failed)
        # reported only: the answers below are drawn apart from the batch and never read back
        truth = plan.truth if plan is not None else generation_truth(cfg, g, self.dataset)
        record["labels_audit"] = label_audit(ev, labels, truth)
        if plan is not None:
            chains = labelling_chains(candidates, problems, pop.names, cfg, focus, routed)
            record["curriculum"] = after_self_play(plan, chains, cfg.curriculum.backoff, self._ladder)
        self._commit(manifest, adapters, record)
        return self._finish_pending()

    # -- the curriculum

    @property
    def _ladder(self) -> tuple[int, ...]:
        return tuple(sorted(self.cfg.difficulties))

    def _propose(self, g: int) -> Plan:
        """Generation `g`'s plan from the configured proposer (it probes with the current members)."""
        cfg, cur = self.cfg, self.cfg.curriculum
        engine = self._synced_engine()
        names = self.population.names

        def probe(problems: Sequence[Problem]) -> list[list[Candidate]]:
            cands = self_play(engine, names, problems, cfg, g, progress=False, purpose="probe-sample")
            return labelling_chains(
                cands, problems, names, cfg, self._focus(self.population), self._routed_groups(problems)
            )

        ctx = ProposerContext(
            generation=g,
            seed=cfg.seed,
            n_problems=cfg.problems_per_generation,
            domains=tuple(cfg.domains),
            ladder=self._ladder,
            start_level=start_level(cfg.curriculum.start_level, self.population, self._ladder),
            low=cur.low,
            high=cur.high,
            probe_problems=cur.probe_problems,
            replay=cur.replay,
            labels_visible=cfg.labels != "hidden",
            state=curriculum_state(read_history(self.root), self.run["run_id"], g),
            probe=probe,
            dataset=self.dataset,
        )
        try:
            plan = PROPOSERS[cur.proposer](ctx)
        except CurriculumError as e:
            raise EvolveError(str(e)) from None
        if self.progress and not plan.skipped:
            cells = ", ".join(f"{d}:{lv}" for d, lv in plan.cells)
            tqdm.write(f"generation {g}: curriculum practises {cells} (+{plan.replay} replay)")
        return plan

    def _skip(self, g: int, plan: Plan, record: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any] | None:
        """Commit generation `g` unchanged (nothing learnable): the members as they were, the reason recorded."""
        tqdm.write(
            f"generation {g}: curriculum: {plan.skipped}; generation {g} is skipped (nothing trained)", file=sys.stderr
        )
        pop = self.population
        weights = load_members(pop)
        fitness = {m.name: float(m.fitness or 0.0) for m in pop.manifest.members}
        no_losses = {m: [] for m in pop.names}
        manifest, adapters, members = next_manifest(
            pop, g, weights, no_losses, fitness, [], [], [], self.cfg.seed, self.run["config_hash"]
        )
        record.update(
            seconds=seconds,
            skipped=plan.skipped,
            fitness=stats(list(fitness.values())),
            members=members,
            curriculum=after_self_play(plan, [], self.cfg.curriculum.backoff, self._ladder),
        )
        self._commit(manifest, adapters, record)
        return self._finish_pending()

    def _routed_groups(self, problems: Sequence[Problem]) -> list[list[str]] | None:
        """Each problem's labellers as the population's router picks them (label_peers: routed), else None."""
        return None if self.routed is None else self.routed.groups(problems, self.population.names)

    @staticmethod
    def _focus(pop: Population) -> dict[str, str | None]:
        """Each member's niche: the `focus_domain` its manifest entry records (set at init, kept by its slot)."""
        return {m.name: m.info.get("focus_domain") for m in pop.manifest.members}

    # -- the phases of a generation

    def _self_play(self, g: int, plan: Plan | None = None) -> tuple[list[Problem], dict[str, list[list[Candidate]]]]:
        """Generation `g`'s problems (the curriculum's, when it runs) and every member's sampled chains for them."""
        problems = plan.problems if plan is not None else generation_problems(self.cfg, g, self.dataset)
        engine = self._synced_engine()
        names = self.population.names
        if self.progress:
            tqdm.write(
                f"generation {g}: {len(names)} members x {len(problems)} problems x {self.cfg.samples_per_member}"
            )
        return problems, self_play(engine, names, problems, self.cfg, g, self.progress)

    def _score(self, ev: Evidence, weights: dict[str, LoraWeights]) -> None:
        """Cross-evaluation and probes (torch tasks) and chain embeddings, as the weights of the terms need."""
        w = self.cfg.fitness
        if any(w.get(t, 0) > 0 for t in JUDGE_TERMS) and len(ev.members) > 1:
            calls, authors = score_calls(ev, weights, self.cfg, str(self.population.base_model_path))
            add_scores(ev, authors, self._map(score_member_task, calls, "score"))
        if w.get("diversity_embedding", 0) > 0 and len(ev.members) > 1:
            ev.embeddings = embed_chains(ev)

    def _train(
        self, pop: Population, weights: dict[str, LoraWeights], examples: dict[str, list[tuple[str, str]]], g: int
    ) -> tuple[dict[str, LoraWeights], dict[str, list[float]]]:
        """The gradient phase: every member fine-tuned on its examples; returns the weights and losses."""
        calls = train_calls(pop, weights, examples, self.cfg, g)
        errors = "return" if self.cfg.on_train_error == "keep_member" else "raise"
        results = self._map(train_member_task, calls, "train", errors)
        self.train_failed = failed_members(pop.names, results)
        return trained_weights(pop.names, weights, results)

    def _control_heldout(self) -> dict[str, Any]:
        engine, pop = self._engine(), self.population
        g = pop.manifest.generation
        return self.control.evaluate(engine, pop, g, self.heldout, self.cfg.answer, self._synced_engine)

    def _commit(self, manifest: Manifest, adapters: dict[str, LoraWeights], record: dict[str, Any]) -> None:
        """Write generation `manifest` (new adapters + atomic manifest swap); on failure the previous one stays."""
        self.population = write_generation(self.root, manifest, adapters, record)

    def _finish_pending(self) -> dict[str, Any] | None:
        """Held-out evaluation and the history line of a committed generation (also after a crash)."""
        record = read_pending(self.root, self.population.manifest.generation)
        if record is None:
            return None
        started = time.perf_counter()
        if self.heldout:
            heldout = self._evaluate()
            add_heldout(record, heldout)
            if self.control is not None:
                record.setdefault("control", {})["heldout"] = self._control_heldout()
            self.population = record_domain_scores(self.root, heldout["members"])
        record.setdefault("seconds", {})["eval"] = secs(started)
        self._remote_events(record)
        append_history(self.root, record)
        (self.root / PENDING_FILE).unlink()
        self.tb.log(record)
        if self.progress:
            tqdm.write(progress_line(record))
        return record

    def _baseline_record(self) -> dict[str, Any]:
        """Held-out figures of the starting generation (so plots start where the run started)."""
        g = self.population.manifest.generation
        started = time.perf_counter()
        heldout = self._evaluate()
        record = record_base(self.run, self.cfg, g)
        record.update(
            members=initial_members(self.population.manifest, heldout),
            heldout=heldout_summary(heldout),
            seconds={"eval": secs(started)},
            **({"control": {"heldout": self._control_heldout()}} if self.control is not None else {}),
        )
        self._remote_events(record)
        append_history(self.root, record)
        self.tb.log(record)
        return record

    def _evaluate(self) -> dict[str, Any]:
        """The current generation on the held-out problems (see :func:`evaluate_heldout`)."""
        engine = self._synced_engine()
        return evaluate_heldout(
            engine, self.population.names, self.heldout, self.cfg.answer, self.progress, self._focus(self.population)
        )

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
        self.tb.close()
        if self._own_remote is not None:
            self._own_remote.close()  # the servers keep running; this run's adapters leave them
        self.engine = None
        self._snapshots.cleanup()


def run_evolve(
    cfg: EvolveConfig, resume: bool = False, progress: bool = True, engine: OfflineEngine | None = None
) -> tuple[Path, list[dict[str, Any]]]:
    """Run (or resume) an evolve run; returns the population directory and the history lines written.

    Ctrl-C or SIGTERM raises :class:`Interrupted` after cleaning up; every generation
    committed before it is complete on disk and `--resume` continues from there. ``engine``: an
    :class:`OfflineEngine` on the same base model to use instead of starting one (checked by
    :func:`trainer.engines.check_engine`, synced to this population and left running).
    """
    copied = cfg.out is not None and not resume and not Path(cfg.out).exists()
    try:
        cfg, root, run = prepare_run(cfg, resume)
    except (PopulationError, LoraError, FileNotFoundError) as e:
        raise EvolveError(str(e)) from None
    try:
        evolver = Evolver(cfg, root, run, progress=progress, engine=engine)
    except BaseException as e:
        if not resume:  # a refused start leaves nothing behind: fix the config and run the same command again
            if copied:
                remove_tree(root)
            else:
                (root / RUN_FILE).unlink(missing_ok=True)
        if isinstance(e, (PopulationError, LoraError, operators.OperatorError, DatasetError)):
            raise EvolveError(str(e)) from None
        raise
    try:
        return root, evolver.run_all()
    except BaseException as e:
        if not (isinstance(e, KeyboardInterrupt) or evolver.stop_state["stop"]):
            raise
        raise Interrupted(
            f"stopped; generation {read_manifest(root).generation} is complete in {root} (continue with --resume)"
        ) from e
    finally:
        evolver.close()
