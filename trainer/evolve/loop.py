"""`ensemble-train evolve`: population self-play, one generation at a time.

Each generation:

1. **self-play**: every member samples chains of thought for a fresh batch of
   problems, all members in one multi-LoRA vLLM batch (the engine layer the
   server uses);
2. **scoring**: answers are extracted and voted on (the server's majority vote),
   members judge each other's chains and are probed for hidden states and
   output distributions (torch tasks on the executor), chains are embedded,
   and the fitness terms are combined (:mod:`trainer.evolve.fitness`);
3. **gradient phase**: each member fine-tunes (PEFT) on verified chains:
   right answers with labels, consensus answers with labels hidden;
4. **evolution**: elites stay, selected parents make children by crossover and
   mutation, children replace the members chosen by the replacement operator
   (:mod:`trainer.evolve.operators`); then, when switched on, the adapter lifecycle
   (:mod:`trainer.evolve.lifecycle`: death, inheritance, SVD mutation, slot reallocation);
5. **commit**: the new generation is written atomically
   (:func:`ensemble_serve.shared.population.commit_generation`), evaluated on held-out
   problems, and a line goes to ``history.jsonl``.

Durability: all randomness of generation g derives from (seed, g) and the
committed generation g-1, and nothing else carries over (each gradient phase
starts a fresh optimizer), so a run resumed from the last committed generation
ends where an uninterrupted run ends. The run's settings live in
``evolve-run.json`` in the population directory; a half-written generation is
never visible (temp folders + atomic manifest swap), and the history line of a
generation that was committed but not yet recorded is completed on resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ensemble_serve.shared.voting.answers import answers_equal
from ensemble_serve.shared.vllm import EngineConfig, OfflineEngine
from ensemble_serve.shared.fsutil import atomic_write_text, remove_tree
from ensemble_serve.shared.lora import (
    LoraError,
    LoraWeights,
    check_compatible,
    load_lora,
    lora_from_bytes,
    lora_to_bytes,
    save_lora,
)
from ensemble_serve.shared.population import (
    Manifest,
    Member,
    Population,
    PopulationError,
    append_history,
    commit_generation,
    create_population,
    load_population,
    prune_unreferenced,
    read_history,
    read_manifest,
    write_manifest,
)
from ensemble_serve.shared.voting.rules import Candidate, candidate_from_text, vote
from trainer.evolve import operators
from trainer.config import EvolveConfig, LifecycleConfig
from trainer.evaluate import greedy_candidates
from trainer.evolve.fitness import Evidence, compute_fitness, diversity_summary
from trainer.evolve.lifecycle import LifecycleResult, lifecycle_step
from trainer.tasks.sandbox import DatasetError, Problem, generate_problems, load_jsonl
from trainer.evolve.executors import make_executor, score_member_task, train_member_task

RUN_FILE = "evolve-run.json"
HELDOUT_MAX_TOKENS = 160
"""Generation limit of the held-out evaluation's greedy chains."""
DEFAULT_LR = 2e-3
"""Gradient-phase learning rate of a member whose manifest records none (and no `train_lr` is set)."""
PENDING_FILE = "evolve-pending.json"


class EvolveError(ValueError):
    """The population, dataset or run state cannot be evolved as asked; the message says why."""


class Interrupted(KeyboardInterrupt):
    """Raised by Ctrl-C or SIGTERM; the last complete generation is on disk."""


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from the run seed and a path of names (stable across processes and machines)."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


# --------------------------------------------------------------------------- run state


def config_hash(cfg: EvolveConfig) -> str:
    """Hash of everything that decides the result (not where it runs or how many generations)."""
    data = cfg.model_dump(mode="json", exclude={"generations", "executor", "ray_address", "ray_workers", "tensorboard"})
    data.pop("population", None)
    data.pop("out", None)
    # switches added after runs existed: at their defaults they change nothing, so they leave the hash as it was
    if data.get("lifecycle") == LifecycleConfig().model_dump(mode="json"):
        data.pop("lifecycle")
    if data.get("fitness_scope") == "global":
        data.pop("fitness_scope")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _read_run(root: Path) -> dict[str, Any] | None:
    path = root / RUN_FILE
    if not path.exists():
        return None
    try:
        run = json.loads(path.read_text())
        EvolveConfig.model_validate(run["config"])
        return run
    except (ValueError, KeyError, TypeError) as e:
        raise EvolveError(f"{path}: not a valid run file ({e}); remove it to start a new run") from e


def prepare_run(cfg: EvolveConfig, resume: bool) -> tuple[EvolveConfig, Path, dict[str, Any]]:
    """Resolve the population directory and the run state (create, or reload for --resume)."""
    root = Path(cfg.out or cfg.population)
    if resume:
        if not (root / "population.json").exists():
            raise EvolveError(f"{root}: no population to resume")
        run = _read_run(root)
        if run is None:
            raise EvolveError(f"{root}: no run to resume ({RUN_FILE} is missing); start one without --resume")
        stored = EvolveConfig.model_validate(run["config"])
        if config_hash(stored) != config_hash(cfg) and cfg != EvolveConfig(population=cfg.population, out=cfg.out):
            raise EvolveError(
                f"{root}: the run was started with other settings (config {run['config_hash']}, "
                f"given {config_hash(cfg)}); resume with the same config, or with only --population/--out"
            )
        # executor/tensorboard may change on resume; they do not change the result
        stored = stored.model_copy(
            update={k: getattr(cfg, k) for k in ("executor", "ray_address", "ray_workers", "tensorboard")}
        )
        return stored, root, run
    if cfg.out is not None:
        _copy_population(cfg)
    if not (root / "population.json").exists():
        raise EvolveError(f"{root}: no population.json (create one with `ensemble-train init`)")
    old = _read_run(root)
    current = read_manifest(root).generation
    if old is not None and old.get("target_generation", 0) > current:
        raise EvolveError(
            f"{root}: holds an interrupted run (generation {current} of {old['target_generation']}); "
            f"pass --resume to finish it, or remove {RUN_FILE} to start over from generation {current}"
        )
    run = {
        "run_id": uuid.uuid4().hex[:12],
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg),
        "start_generation": current,
        "target_generation": current + cfg.generations,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(root / RUN_FILE, json.dumps(run, indent=2) + "\n")
    return cfg, root, run


def _copy_population(cfg: EvolveConfig) -> None:
    """Copy the source population (or a subset of its members) to `cfg.out` as a new population."""
    out = Path(cfg.out)
    if out.exists():
        raise EvolveError(f"{out} already exists; choose a new --out, or pass --resume to continue the run there")
    source = load_population(cfg.population)
    members = list(source.manifest.members)
    if cfg.members is not None:
        unknown = [n for n in cfg.members if n not in source.names]
        if unknown:
            raise EvolveError(f"--members: {unknown} not in {cfg.population} (members: {source.names})")
        members = [m for m in members if m.name in cfg.members]
    base = source.manifest.base_model
    if base.path is not None and source.base_model_path is not None:
        base = base.model_copy(update={"path": os.path.relpath(source.base_model_path.resolve(), out.absolute())})
    manifest = source.manifest.model_copy(
        update={"members": [m.model_copy(update={"path": f"members/{m.name}"}) for m in members], "base_model": base}
    )
    create_population(out, manifest, {m.name: source.member_dir(m.name) for m in members})


# --------------------------------------------------------------------------- problems


def load_dataset(path: Path, skip_invalid: bool) -> list[Problem]:
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


def heldout_problems(cfg: EvolveConfig) -> list[Problem]:
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


# --------------------------------------------------------------------------- phases


def self_play(
    engine: OfflineEngine,
    members: Sequence[str],
    problems: Sequence[Problem],
    cfg: EvolveConfig,
    generation: int,
    progress: bool = False,
) -> dict[str, list[list[Candidate]]]:
    """Every member x problem x sample in one multi-LoRA batch; returns the candidates (answers extracted)."""
    from vllm import SamplingParams

    prompts, owners, params, index = [], [], [], []
    chat = [engine.chat_prompt(p.prompt) for p in problems]
    for m in members:
        for i in range(len(problems)):
            prompts.append(chat[i])
            owners.append(m)
            params.append(
                SamplingParams(
                    n=cfg.samples_per_member,
                    temperature=cfg.temperature,
                    max_tokens=cfg.max_tokens,
                    seed=derive_seed(cfg.seed, "sample", generation, m, i),
                )
            )
            index.append((m, i))
    outputs = engine.generate(prompts, owners, params, progress=progress)
    cands: dict[str, list[list[Candidate]]] = {m: [[] for _ in problems] for m in members}
    for (m, i), gens in zip(index, outputs):
        cands[m][i] = [candidate_from_text(m, s, g.text, g.tokens, cfg.answer) for s, g in enumerate(gens)]
    return cands


def pseudo_labels(ev: Evidence, cfg: EvolveConfig) -> list[str | None]:
    """The answer each problem's chains are verified against: the truth where known, else a confident consensus."""
    labels = []
    for p, answer, agreement in zip(ev.problems, ev.consensus, ev.agreement):
        if cfg.labels == "ground_truth" and p.answer is not None:
            labels.append(p.answer)
        elif answer is not None and agreement >= cfg.min_agreement and agreement > 0:
            labels.append(answer)
        else:
            labels.append(None)
    return labels


def training_examples(
    ev: Evidence, labels: Sequence[str | None], cfg: EvolveConfig
) -> dict[str, list[tuple[str, str]]]:
    """Verified chains per member: its own, plus (share_chains) the other members'."""
    verified: dict[str, list[tuple[str, str]]] = {m: [] for m in ev.members}
    for m in ev.members:
        for p, label, row in zip(ev.problems, labels, ev.candidates[m]):
            if label is None:
                continue
            for c in row:
                if c.valid and answers_equal(c.answer, label) and c.text.strip():
                    verified[m].append((p.prompt, c.text.strip()))
    out = {}
    for m in ev.members:
        pool = list(verified[m])
        if cfg.share_chains:
            pool += [ex for other in ev.members if other != m for ex in verified[other]]
        seen: set[tuple[str, str]] = set()
        out[m] = [ex for ex in pool if not (ex in seen or seen.add(ex))]
    return out


def _probe_and_judge_sets(
    ev: Evidence, cfg: EvolveConfig
) -> tuple[list[tuple[str, str]], list[str], list[tuple[str, str]]]:
    """Chains to cross-evaluate (with their authors) and the shared probe chains."""
    chains, authors = [], []
    for i, p in enumerate(ev.problems[: cfg.cross_eval_chains]):
        for m in ev.members:
            for c in ev.candidates[m][i]:
                chains.append((p.prompt, c.text))
                authors.append(m)
    probes = []
    for i, p in enumerate(ev.problems[: cfg.probe_chains]):
        pool = [c for m in ev.members for c in ev.candidates[m][i]]
        pick = next((c for c in pool if c.valid and answers_equal(c.answer, ev.consensus[i])), pool[0])
        probes.append((p.prompt, pick.text))
    return chains, authors, probes


def _embed_chains(ev: Evidence) -> dict[str, np.ndarray] | None:
    try:
        from ensemble_serve.shared.embeddings import default_embedder
    except ImportError:  # the `embed` extra is not installed
        return None
    embedder = default_embedder()
    out = {}
    for m in ev.members:
        rows = ev.candidates[m]
        flat = [c.text for row in rows for c in row]
        vecs = embedder.encode(flat)
        out[m] = np.asarray(vecs).reshape(len(rows), -1, vecs.shape[-1])
    return out


# --------------------------------------------------------------------------- evolution


@dataclasses.dataclass
class Offspring:
    name: str
    weights: LoraWeights
    parents: list[str]
    operators: list[str]
    fitter: str
    """The fitter parent (ties: the lower index): the child takes its rank ratio and learning rate."""
    held_out: str | None = None
    """domain_loo scope: the domain held out of this child's parent selection."""


def evolutionary_step(
    names: Sequence[str],
    weights: dict[str, LoraWeights],
    fitness: dict[str, float],
    cfg: EvolveConfig,
    generation: int,
    held_out: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[list[int], list[int], list[Offspring]]:
    """Elites, the indices the children replace, and the children (crossover + mutation).

    With ``held_out`` ({domain: fitness with that domain held out}, the domain_loo scope), child
    k of generation g is assigned domain ``sorted(held_out)[(g * offspring + k) % D]`` and its
    parents are selected (and crossed, weighted) on that fitness; elites and replacement use
    ``fitness``. Pure given its inputs and (seed, generation): the same call makes the same children.
    """
    evo = cfg.evolution
    n = len(names)
    if not evo.enabled or evo.offspring == 0 or n < 2:
        return [], [], []
    fit = [fitness[m] for m in names]
    elite = operators.elites(fit, min(evo.elite, n))
    n_off = min(evo.offspring, n - len(elite))
    if n_off <= 0:
        return elite, [], []
    replaced = operators.get_operator("replacement", evo.replacement)(fit, n_off, elite)
    select = operators.get_operator("selection", evo.selection)
    cross = None if evo.crossover == "none" else operators.get_operator("crossover", evo.crossover)
    mutate = None if evo.mutation == "none" else operators.get_operator("mutation", evo.mutation)
    import torch

    rng = torch.Generator().manual_seed(derive_seed(cfg.seed, "select", generation))
    children = []
    held_domains = sorted(held_out) if held_out else []
    for k in range(len(replaced)):
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "child", generation, k))
        domain = held_domains[(generation * len(replaced) + k) % len(held_domains)] if held_domains else None
        fit = [fitness[m] for m in names] if domain is None else [held_out[domain][m] for m in names]
        picks = select(fit, 2, rng, **evo.selection_options)
        parents = [names[i] for i in picks]
        fitter = max(picks, key=lambda i: (fit[i], -i))
        pw = weights[names[fitter]]
        rank = evo.child_rank or pw.rank
        alpha = pw.alpha / pw.rank * rank
        ops = []
        if cross is not None:
            shifted = [max(fit[i], 0.0) + 1e-6 for i in picks]
            child = cross([weights[p] for p in parents], shifted, rank, alpha, gen, rank_policy=evo.rank_policy)
            ops.append(evo.crossover)
        else:
            child = operators.get_operator("crossover", "weighted_average")([pw], [1.0], rank, alpha, gen)
            parents = [names[fitter]]
        if mutate is not None and evo.mutation_strength > 0:
            child = mutate(child, evo.mutation_strength, gen)
            ops.append(evo.mutation)
        children.append(
            Offspring(f"g{generation}c{k}", child, sorted(set(parents), key=parents.index), ops, names[fitter], domain)
        )
    return elite, replaced, children


# --------------------------------------------------------------------------- evaluation


def evaluate_heldout(
    engine: OfflineEngine, members: Sequence[str], problems: Sequence[Problem], answer: str, progress: bool = False
) -> dict:
    """Greedy chains of every member on the held-out problems: member, ensemble-vote and oracle accuracy."""
    if not problems:
        return {}
    cands = greedy_candidates(engine, members, problems, HELDOUT_MAX_TOKENS, answer, progress)
    domains = sorted({p.domain for p in problems})

    def acc(hits: Sequence[bool], subset: Sequence[int]) -> float:
        return round(sum(hits[i] for i in subset) / len(subset), 4) if subset else 0.0

    by_domain = {d: [i for i, p in enumerate(problems) if p.domain == d] for d in domains}
    every = list(range(len(problems)))
    per_member = {}
    member_hits = {}
    for m in members:
        hits = [cands[m][i].valid and answers_equal(cands[m][i].answer, p.answer) for i, p in enumerate(problems)]
        member_hits[m] = hits
        per_member[m] = {"all": acc(hits, every), **{d: acc(hits, ix) for d, ix in by_domain.items()}}
    vote_hits, agreement = [], []
    for i, p in enumerate(problems):
        result = vote([cands[m][i] for m in members], "majority")
        vote_hits.append(result.answer is not None and answers_equal(result.answer, p.answer))
        agreement.append(round(result.agreement, 4))
    oracle = [any(member_hits[m][i] for m in members) for i in every]
    member_all = [per_member[m]["all"] for m in members]
    return {
        "problems": len(problems),
        "best_member": max(member_all),
        "mean_member": round(sum(member_all) / len(member_all), 4),
        "ensemble_vote": acc(vote_hits, every),
        "oracle": acc(oracle, every),
        "vote_agreement": agreement,
        "ensemble_domains": {d: acc(vote_hits, ix) for d, ix in by_domain.items()},
        "members": per_member,
    }


# --------------------------------------------------------------------------- the loop


@contextmanager
def _stop_signals(state: dict[str, bool]) -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM stop the run after the last complete generation.

    A terminal's Ctrl-C reaches the whole process group, so vLLM's engine processes may die of
    it at the same moment; whatever error that causes here, `state["stop"]` records that a stop
    was asked for, so the run still ends as an interruption, not a crash.
    """

    def handler(signum, frame):  # noqa: ARG001
        state["stop"] = True
        raise Interrupted()

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


class _TensorBoard:
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


class Evolver:
    """One evolve run over one population directory."""

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
        self.population = load_population(root)
        # member folders of a commit that was killed before its manifest swap are not part of any generation
        prune_unreferenced(root)
        self._check_members(self.population)
        self._check_operators(self.population)
        # a caller's engine (same base model) saves vLLM's start-up when one process runs many evolve runs
        self.engine: OfflineEngine | None = engine
        if engine is not None:
            need = _vllm_rank(max(m.rank for m in self.population.manifest.members), cfg.evolution.child_rank)
            if engine.cfg.max_lora_rank is not None and engine.cfg.max_lora_rank < need:
                raise EvolveError(f"the shared engine's max_lora_rank {engine.cfg.max_lora_rank} is below {need}")
        self.executor = None
        self.tb = _TensorBoard(cfg.tensorboard)
        self._snapshots = tempfile.TemporaryDirectory(prefix="ensemble-evolve-adapters-")
        self.stop_state = {"stop": False}

    # -- setup

    def _check_operators(self, population: Population) -> None:
        """Refuse, before any work, a crossover that cannot combine these members' ranks under the policy."""
        evo = self.cfg.evolution
        if not evo.enabled:
            return
        for kind, name in (
            ("selection", evo.selection),
            ("crossover", evo.crossover),
            ("mutation", evo.mutation),
            ("replacement", evo.replacement),
        ):
            if name != "none" or kind in ("selection", "replacement"):
                try:
                    operators.get_operator(kind, name)
                except operators.OperatorError as e:
                    raise EvolveError(f"evolution.{kind}: {e}") from None
        if evo.rank_policy not in ("error", "truncate", "pad"):
            raise EvolveError(f"evolution.rank_policy must be error, truncate or pad, got {evo.rank_policy!r}")
        n = len(population.manifest.members)
        free = n - min(evo.elite, n)
        if evo.replacement == "generational" and evo.offspring and min(evo.offspring, free) != free:
            raise EvolveError(
                f"replacement generational replaces every non-elite member: with {n} members and elite "
                f"{evo.elite}, offspring must be {free} (got {evo.offspring})"
            )
        if evo.crossover not in ("svd_interpolate", "layer_wise") or evo.rank_policy != "error":
            return
        ranks = {m.rank for m in population.manifest.members}
        if evo.crossover == "layer_wise" and evo.child_rank:
            ranks.add(evo.child_rank)  # layer_wise copies a parent's factors: the child must have its rank
        if len(ranks) > 1:
            raise EvolveError(
                f"crossover {evo.crossover} needs equal ranks, but the members' (and child) ranks are {sorted(ranks)}; "
                "set evolution.rank_policy to truncate or pad, or use crossover weighted_average"
            )

    def _check_members(self, population: Population) -> dict[str, LoraWeights]:
        weights = {}
        for name in population.names:
            try:
                weights[name] = load_lora(population.member_dir(name))
            except LoraError as e:
                raise EvolveError(f"member {name}: {e}") from None
        try:
            check_compatible([weights[n] for n in population.names], population.names)
        except LoraError as e:
            raise EvolveError(f"{population.root}: members cannot evolve together: {e}") from None
        return weights

    def _engine(self) -> OfflineEngine:
        if self.engine is None:
            n = len(self.population.names)
            cfg = EngineConfig(
                max_loras=min(max(n, 1), 16),
                max_cpu_loras=max(2 * n, 4),
                max_lora_rank=_vllm_rank(
                    max(m.rank for m in self.population.manifest.members), self.cfg.evolution.child_rank
                ),
                gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                max_num_seqs=self.cfg.max_num_seqs,
                seed=self.cfg.seed,
            )
            self.engine = OfflineEngine(self.population, cfg, snapshot_root=Path(self._snapshots.name))
        return self.engine

    def _executor(self):
        if self.executor is None:
            self.executor = make_executor(
                self.cfg.executor, self.cfg.ray_address, self.cfg.ray_workers, self.cfg.threads
            )
        return self.executor

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
        self.tb.close()
        self.engine = None
        self._snapshots.cleanup()

    # -- the run

    def run_all(self) -> list[dict[str, Any]]:
        target = self.run["target_generation"]
        records = []
        with _stop_signals(self.stop_state):
            self._finish_pending()
            if self.heldout and not any(
                r.get("generation") == self.population.manifest.generation for r in read_history(self.root)
            ):
                records.append(self._baseline_record())
            while self.population.manifest.generation < target:
                records.append(self.step())
        return records

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, disable=not self.progress, unit="task", leave=False)

    def _baseline_record(self) -> dict[str, Any]:
        """Held-out figures of the starting generation (so plots start where the run started)."""
        g = self.population.manifest.generation
        started = time.perf_counter()
        engine = self._engine()
        engine.registry.sync(self.population)
        heldout = evaluate_heldout(engine, self.population.names, self.heldout, self.cfg.answer, self.progress)
        members = [
            {
                "name": m.name,
                "parents": list(m.parents),
                "born_generation": m.born_generation,
                "rank": m.rank,
                "fitness": m.fitness,
                "status": "initial",
                "heldout": heldout["members"][m.name],
            }
            for m in self.population.manifest.members
        ]
        record = self._record_base(g)
        record.update(members=members, heldout=_heldout_summary(heldout), seconds={"eval": _secs(started)})
        append_history(self.root, record)
        self.tb.log(record)
        return record

    def _record_base(self, g: int) -> dict[str, Any]:
        return {
            "generation": g,
            "run_id": self.run["run_id"],
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "labels": self.cfg.labels,
            "config_hash": self.run["config_hash"],
        }

    def step(self) -> dict[str, Any]:
        """Run one generation and commit it; returns its history record."""
        cfg = self.cfg
        pop = self.population
        g = pop.manifest.generation + 1
        names = pop.names
        seconds: dict[str, float] = {}
        record = self._record_base(g)

        # 1. self-play
        t = time.perf_counter()
        problems = generation_problems(cfg, g, self.dataset)
        engine = self._engine()
        engine.registry.sync(pop)
        if self.progress:
            tqdm.write(f"generation {g}: {len(names)} members x {len(problems)} problems x {cfg.samples_per_member}")
        candidates = self_play(engine, names, problems, cfg, g, self.progress)
        seconds["generate"] = _secs(t)

        # 2. scoring
        t = time.perf_counter()
        weights = self._check_members(pop)
        ev = Evidence(
            members=list(names), problems=problems, candidates=candidates, labels_visible=cfg.labels != "hidden"
        )
        self._score(ev, weights)
        result = compute_fitness(ev, cfg.fitness, cfg.fitness_scope)
        seconds["score"] = _secs(t)

        # 3. gradient phase
        t = time.perf_counter()
        labels = pseudo_labels(ev, cfg)
        examples = training_examples(ev, labels, cfg)
        trained, losses = self._train(pop, weights, examples, g)
        seconds["train"] = _secs(t)

        # 4. evolution
        t = time.perf_counter()
        elite, replaced, children = evolutionary_step(names, trained, result.fitness, cfg, g, result.held_out)
        life = self._lifecycle(pop, g, trained, result.fitness, replaced, children)
        seconds["evolve"] = _secs(t)

        # 5. commit
        manifest, adapters, member_info = self._next_manifest(
            pop, g, trained, losses, result.fitness, elite, replaced, children
        )
        manifest, adapters, member_info = self._apply_lifecycle(manifest, adapters, member_info, life, g)
        if cfg.lifecycle.enabled:
            record["lifecycle"] = lifecycle_summary(life, cfg.lifecycle)
        chains = [c for row in candidates.values() for r in row for c in r]
        record.update(
            seconds=seconds,
            fitness=_stats(list(result.fitness.values())),
            terms={t: {m: round(v, 6) for m, v in vals.items()} for t, vals in result.terms.items()},
            fitness_weights=result.used,
            fitness_scope=result.scope,
            **({"fitness_scope_note": result.scope_note} if result.scope_note else {}),
            diversity=diversity_summary(result.terms),
            train={
                "problems": len(problems),
                "chains": len(chains),
                "parsed": round(sum(c.valid for c in chains) / max(1, len(chains)), 4),
                "labelled": sum(label is not None for label in labels),
                "verified": round(
                    sum(
                        c.valid and lab is not None and answers_equal(c.answer, lab)
                        for m in names
                        for lab, row in zip(labels, candidates[m])
                        for c in row
                    )
                    / max(1, len(chains)),
                    4,
                ),
                "examples": {m: len(x) for m, x in examples.items()},
                "mean_agreement": round(float(np.mean(ev.agreement)) if ev.agreement else 0.0, 4),
            },
            members=member_info,
        )
        self._commit(manifest, adapters, record)
        return self._finish_pending()

    def _commit(self, manifest: Manifest, adapters: dict[str, LoraWeights], record: dict[str, Any]) -> None:
        """Write generation `manifest` (new adapters + atomic manifest swap); on failure the previous one stays."""
        g = manifest.generation
        try:
            with tempfile.TemporaryDirectory(prefix="ensemble-evolve-") as work:
                sources = {}
                for name, w in adapters.items():
                    folder = Path(work) / name
                    save_lora(w, folder)
                    sources[name] = folder
                atomic_write_text(self.root / PENDING_FILE, json.dumps(record) + "\n")
                self.population = commit_generation(self.root, manifest, sources)
        except (OSError, PopulationError) as e:
            if read_manifest(self.root).generation != g:
                (self.root / PENDING_FILE).unlink(missing_ok=True)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise EvolveError(
                f"{self.root}: could not write generation {g} ({reason}); generation {g - 1} is intact"
            ) from e

    def _finish_pending(self) -> dict[str, Any] | None:
        """Held-out evaluation and the history line of a committed generation (also after a crash)."""
        path = self.root / PENDING_FILE
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
        except ValueError:
            path.unlink()
            return None
        g = self.population.manifest.generation
        if record.get("generation") != g or any(r.get("generation") == g for r in read_history(self.root)):
            path.unlink()  # the commit did not happen, or the line was written: nothing to finish
            return None
        t = time.perf_counter()
        if self.heldout:
            engine = self._engine()
            engine.registry.sync(self.population)
            heldout = evaluate_heldout(engine, self.population.names, self.heldout, self.cfg.answer, self.progress)
            for m in record["members"]:
                m["heldout"] = heldout["members"].get(m["name"])
            record["heldout"] = _heldout_summary(heldout)
            self._record_domain_scores(heldout["members"])
        record.setdefault("seconds", {})["eval"] = _secs(t)
        append_history(self.root, record)
        path.unlink()
        self.tb.log(record)
        if self.progress:
            h = record.get("heldout", {})
            tqdm.write(
                f"generation {g}: fitness best {record['fitness']['best']:.3f} mean {record['fitness']['mean']:.3f}"
                + (
                    f" | held-out best {h['best_member']:.3f} mean {h['mean_member']:.3f} vote {h['ensemble_vote']:.3f}"
                    if h
                    else ""
                )
            )
        return record

    def _record_domain_scores(self, per_member: dict[str, dict[str, float]]) -> None:
        manifest = read_manifest(self.root)
        members = [
            m.model_copy(update={"domain_scores": {d: v for d, v in per_member[m.name].items() if d != "all"}})
            if m.name in per_member
            else m
            for m in manifest.members
        ]
        write_manifest(self.root, manifest.model_copy(update={"members": members}))
        self.population = load_population(self.root, check_weights=False)

    def _score(self, ev: Evidence, weights: dict[str, LoraWeights]) -> None:
        """Cross-evaluation and probes (torch tasks) and chain embeddings, as the weights of the terms need."""
        w = self.cfg.fitness
        need_torch = any(w.get(t, 0) > 0 for t in ("cross_eval", "diversity_hidden", "diversity_output"))
        if need_torch and len(ev.members) > 1:
            chains, authors, probes = _probe_and_judge_sets(ev, self.cfg)
            base = str(self.population.base_model_path)
            calls = [
                dict(
                    base=base, adapter=lora_to_bytes(weights[m]), chains=chains, probes=probes, threads=self.cfg.threads
                )
                for m in ev.members
            ]
            bar = self._bar(len(calls), "score")
            results = self._executor().map(score_member_task, calls, on_done=lambda: bar.update(1))
            bar.close()
            ev.judge_logprob = {}
            for judge, res in zip(ev.members, results):
                per_author: dict[str, list[float]] = {}
                for author, lp in zip(authors, res["logprob"]):
                    per_author.setdefault(author, []).append(lp)
                ev.judge_logprob[judge] = {a: float(np.mean(v)) for a, v in per_author.items()}
            ev.hidden = {m: r["hidden"] for m, r in zip(ev.members, results)}
            ev.output = {m: r["output"] for m, r in zip(ev.members, results)}
        if w.get("diversity_embedding", 0) > 0 and len(ev.members) > 1:
            ev.embeddings = _embed_chains(ev)

    def _train(
        self, pop: Population, weights: dict[str, LoraWeights], examples: dict[str, list[tuple[str, str]]], g: int
    ) -> tuple[dict[str, LoraWeights], dict[str, list[float]]]:
        cfg = self.cfg
        base = str(pop.base_model_path)
        calls = []
        for m in pop.manifest.members:
            lr = cfg.train_lr or float(m.info.get("lr") or DEFAULT_LR)
            calls.append(
                dict(
                    base=base,
                    adapter=lora_to_bytes(weights[m.name]),
                    examples=examples[m.name],
                    steps=cfg.train_steps,
                    batch_size=cfg.train_batch_size,
                    lr=lr,
                    seed=derive_seed(cfg.seed, "train", g, m.name),
                    threads=cfg.threads,
                )
            )
        bar = self._bar(len(calls), "train")
        results = self._executor().map(train_member_task, calls, on_done=lambda: bar.update(1))
        bar.close()
        trained, losses = {}, {}
        for m, res in zip(pop.names, results):
            trained[m] = lora_from_bytes(res["adapter"]) if res["trained"] else weights[m]
            losses[m] = res["losses"]
        return trained, losses

    def _next_manifest(
        self,
        pop: Population,
        g: int,
        trained: dict[str, LoraWeights],
        losses: dict[str, list[float]],
        fitness: dict[str, float],
        elite: list[int],
        replaced: list[int],
        children: list[Offspring],
    ) -> tuple[Manifest, dict[str, LoraWeights], list[dict[str, Any]]]:
        new_members: list[Member] = []
        adapters: dict[str, LoraWeights] = {}
        info: list[dict[str, Any]] = []
        child_for = dict(zip(replaced, children))
        for i, m in enumerate(pop.manifest.members):
            if i in child_for:
                child = child_for[i]
                parent = pop.member(child.fitter)
                inherited = sum(fitness[p] for p in child.parents) / len(child.parents)
                member = Member(
                    name=child.name,
                    rank=child.weights.rank,
                    alpha=child.weights.alpha,
                    fitness=round(inherited, 6),
                    parents=child.parents,
                    born_generation=g,
                    seed=derive_seed(self.cfg.seed, "child", g, child.name),
                    info={
                        **({"lr": parent.info["lr"]} if parent.info.get("lr") is not None else {}),
                        "operators": child.operators,
                        "replaced": m.name,
                        "fitness_inherited": True,
                        **({"selected_with_held_out": child.held_out} if child.held_out else {}),
                    },
                )
                adapters[child.name] = child.weights
                status, ops = "child", child.operators
            else:
                changed = bool(losses[m.name])
                path = f"members/{m.name}-g{g}" if changed else m.path
                member = m.model_copy(
                    update={
                        "path": path,
                        "fitness": round(fitness[m.name], 6),
                        "info": {**m.info, "train_loss": losses[m.name][-1] if losses[m.name] else None},
                    }
                )
                if changed:
                    adapters[m.name] = trained[m.name]
                status, ops = ("elite" if i in elite else "survivor"), []
            new_members.append(member)
            info.append(
                {
                    "name": member.name,
                    "parents": list(member.parents),
                    "born_generation": member.born_generation,
                    "rank": member.rank,
                    "fitness": member.fitness,
                    "status": status,
                    "operators": ops,
                    "scored_fitness": None if status == "child" else round(fitness[member.name], 6),
                    "train_steps": len(losses.get(member.name, [])),
                }
            )
        manifest = pop.manifest.model_copy(
            update={
                "generation": g,
                "members": new_members,
                "config_hash": self.run["config_hash"],
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        try:
            manifest = Manifest.model_validate(manifest.model_dump())
        except ValueError as e:  # e.g. a child name that clashes with a member's
            raise EvolveError(f"generation {g} would be invalid: {e}") from e
        return manifest, adapters, info

    def _lifecycle(
        self,
        pop: Population,
        g: int,
        trained: dict[str, LoraWeights],
        fitness: dict[str, float],
        replaced: list[int],
        children: list[Offspring],
    ) -> LifecycleResult:
        """The lifecycle step on the population as it will be committed: children in their slots, at age 0.

        Children carry the mean fitness of their parents (as the manifest records it) so the
        step is defined for them, but at age 0 they never die. The elites are the top
        `evolution.elite` by this generation's fitness, the same members `evolutionary_step`
        keeps, and protected even when evolution itself is off.
        """
        cfg = self.cfg
        if not cfg.lifecycle.enabled:
            return LifecycleResult()
        names = list(pop.names)
        weights = dict(trained)
        fit = dict(fitness)
        ages = {m.name: g - m.born_generation for m in pop.manifest.members}
        for i, child in zip(replaced, children):
            names[i] = child.name
            weights[child.name] = child.weights
            fit[child.name] = sum(fitness[p] for p in child.parents) / len(child.parents)
            ages[child.name] = 0
        elite = operators.elites([fitness[m] for m in pop.names], min(cfg.evolution.elite, len(names)))
        return lifecycle_step(
            names,
            {m: weights[m] for m in names},
            {m: fit[m] for m in names},
            {m: ages[m] for m in names},
            elite,
            cfg.lifecycle,
            g,
            cfg.seed,
        )

    def _apply_lifecycle(
        self,
        manifest: Manifest,
        adapters: dict[str, LoraWeights],
        info: list[dict[str, Any]],
        life: LifecycleResult,
        g: int,
    ) -> tuple[Manifest, dict[str, LoraWeights], list[dict[str, Any]]]:
        """The next generation's manifest, adapters and history entries with the lifecycle's effects.

        Changed members get a new folder `members/<name>-g<g>` (unless they already have one
        this generation: trained members and children); dead members give their slot to the
        newborns, whose status is "reallocated"; survivors' status becomes "inherited" or
        "mutated" (their entry's `lifecycle` lists every event).
        """
        if life.empty:
            return manifest, adapters, info
        members = list(manifest.members)
        adapters = dict(adapters)
        info = [dict(x) for x in info]
        index = {m.name: i for i, m in enumerate(members)}
        received = set(life.inherited.values())
        for name, w in life.changed.items():
            i = index[name]
            if name not in adapters:  # its folder belongs to the previous generation, which must stay intact
                members[i] = members[i].model_copy(update={"path": f"members/{name}-g{g}"})
            adapters[name] = w
            events = [e for e, hit in (("inherited", name in received), ("mutated", name in life.mutated)) if hit]
            info[i].update(
                status=events[0],
                lifecycle=events,
                operators=[*info[i]["operators"], *(["svd"] if name in life.mutated else [])],
            )
        for slot, name, w, parents in life.newborn:
            dead = members[slot]
            source = members[index[parents[0]]] if parents else dead
            member = Member(
                name=name,
                rank=w.rank,
                alpha=w.alpha,
                fitness=source.fitness if parents else None,
                parents=list(parents),
                born_generation=g,
                seed=derive_seed(self.cfg.seed, "newborn", g, name),
                info={
                    **({"lr": source.info["lr"]} if source.info.get("lr") is not None else {}),
                    "lifecycle": "reallocated",
                    "replaced": dead.name,
                    **({"fitness_inherited": True} if parents else {}),
                },
            )
            members[slot] = member
            adapters.pop(dead.name, None)
            adapters[name] = w
            info[slot] = {
                "name": name,
                "parents": list(parents),
                "born_generation": g,
                "rank": w.rank,
                "fitness": member.fitness,
                "status": "reallocated",
                "lifecycle": ["reallocated"],
                "operators": ["svd"] if parents and self.cfg.lifecycle.svd_mutation > 0 else [],
                "scored_fitness": None,
                "train_steps": 0,
                "replaced": dead.name,
            }
        try:
            manifest = Manifest.model_validate(manifest.model_copy(update={"members": members}).model_dump())
        except ValueError as e:  # e.g. a newborn name that clashes with a member's
            raise EvolveError(f"generation {g} would be invalid: {e}") from e
        return manifest, adapters, info


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


def _vllm_rank(biggest: int, child_rank: int | None) -> int:
    from ensemble_serve.shared.vllm import VLLM_LORA_RANKS

    need = max(biggest, child_rank or 0)
    return next(r for r in VLLM_LORA_RANKS if r >= need)


def _heldout_summary(h: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in h.items() if k != "members"}


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"best": 0.0, "mean": 0.0, "min": 0.0}
    return {
        "best": round(max(values), 6),
        "mean": round(sum(values) / len(values), 6),
        "min": round(min(values), 6),
    }


def _secs(t: float) -> float:
    return round(time.perf_counter() - t, 2)


def run_evolve(
    cfg: EvolveConfig, resume: bool = False, progress: bool = True, engine: OfflineEngine | None = None
) -> tuple[Path, list[dict[str, Any]]]:
    """Run (or resume) an evolve run; returns the population directory and the history lines written.

    Ctrl-C or SIGTERM raises :class:`Interrupted` after cleaning up; every generation
    committed before it is complete on disk and `--resume` continues from there. ``engine``: an
    :class:`OfflineEngine` on the same base model to use instead of starting one (it is synced to
    this population and left running).
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
