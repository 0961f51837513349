"""The task calls a generation hands its executor, and what it reads back from them.

* scoring: one :func:`~trainer.evolve.executors.score_member_task` call per member, as the judge
  of every cross-evaluated chain and the subject of every probe (:func:`score_calls`); the
  results go into the evidence (:func:`add_scores`); the chains' sentence embeddings
  (:func:`embed_chains`) are computed here, in process. The fitness terms
  (:mod:`trainer.evolve.fitness`) read all three.
* the gradient phase: one :func:`~trainer.evolve.executors.train_member_task` call per member
  (:func:`train_calls`: its examples, its learning rate, a seed of (generation, member); each
  starts a fresh optimizer, so nothing but the weights carries over between generations), and
  the weights and losses they return (:func:`trained_weights`).

Plain data in, plain data out: the loop runs the calls on its executor (here or on Ray).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ensemble_serve.shared.embeddings import default_embedder
from ensemble_serve.shared.lora import LoraWeights, lora_from_bytes, lora_to_bytes
from ensemble_serve.shared.population import Population
from ensemble_serve.shared.voting.answers import answers_equal
from trainer.evolve.config import EvolveConfig
from trainer.evolve.fitness import Evidence
from trainer.evolve.seeds import derive_seed

DEFAULT_LR = 2e-3
"""Gradient-phase learning rate of a member whose manifest records none (and no `train_lr` is set)."""


# --------------------------------------------------------------------------- scoring


def probe_and_judge_sets(
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


def score_calls(
    ev: Evidence, weights: dict[str, LoraWeights], cfg: EvolveConfig, base: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """One `score_member_task` call per member (judge of every chain, subject of every probe), and the chains' authors."""
    chains, authors, probes = probe_and_judge_sets(ev, cfg)
    calls = [
        dict(base=base, adapter=lora_to_bytes(weights[m]), chains=chains, probes=probes, threads=cfg.threads)
        for m in ev.members
    ]
    return calls, authors


def add_scores(ev: Evidence, authors: Sequence[str], results: Sequence[dict[str, Any]]) -> None:
    """Store the judges' mean log-probability per author, and the probes' hidden states and outputs, in `ev`."""
    ev.judge_logprob = {}
    for judge, res in zip(ev.members, results):
        per_author: dict[str, list[float]] = {}
        for author, lp in zip(authors, res["logprob"]):
            per_author.setdefault(author, []).append(lp)
        ev.judge_logprob[judge] = {a: float(np.mean(v)) for a, v in per_author.items()}
    ev.hidden = {m: r["hidden"] for m, r in zip(ev.members, results)}
    ev.output = {m: r["output"] for m, r in zip(ev.members, results)}


def embed_chains(ev: Evidence) -> dict[str, np.ndarray]:
    """Sentence embeddings of every member's chains, shaped (problems, samples, dimension) per member."""
    embedder = default_embedder()
    out = {}
    for m in ev.members:
        rows = ev.candidates[m]
        flat = [c.text for row in rows for c in row]
        vecs = embedder.encode(flat)
        out[m] = np.asarray(vecs).reshape(len(rows), -1, vecs.shape[-1])
    return out


# --------------------------------------------------------------------------- the gradient phase


def train_steps(cfg: EvolveConfig, n_examples: int) -> int:
    """The gradient steps of a member with `n_examples` examples: `train_steps`, capped at `train_epochs` passes."""
    if cfg.train_epochs is None:
        return cfg.train_steps
    return min(cfg.train_steps, math.ceil(cfg.train_epochs * n_examples / cfg.train_batch_size))


def train_calls(
    pop: Population,
    weights: dict[str, LoraWeights],
    examples: dict[str, list[tuple[str, str]]],
    cfg: EvolveConfig,
    generation: int,
) -> list[dict[str, Any]]:
    """One `train_member_task` call per member: its examples, its learning rate, a seed of (generation, member)."""
    base = str(pop.base_model_path)
    calls = []
    for m in pop.manifest.members:
        lr = cfg.train_lr or float(m.info.get("lr") or DEFAULT_LR)
        calls.append(
            dict(
                base=base,
                adapter=lora_to_bytes(weights[m.name]),
                examples=examples[m.name],
                steps=train_steps(cfg, len(examples[m.name])),
                batch_size=cfg.train_batch_size,
                lr=lr,
                seed=derive_seed(cfg.seed, "train", generation, m.name),
                threads=cfg.threads,
            )
        )
    return calls


def trained_weights(
    names: Sequence[str], weights: dict[str, LoraWeights], results: Sequence[dict[str, Any]]
) -> tuple[dict[str, LoraWeights], dict[str, list[float]]]:
    """Each member's weights after its training task (unchanged when it did not train, or when its task failed
    and left a :class:`~trainer.evolve.executors.TaskError` in its place) and its losses (none then)."""
    trained, losses = {}, {}
    for m, res in zip(names, results):
        ok = isinstance(res, dict)
        trained[m] = lora_from_bytes(res["adapter"]) if ok and res["trained"] else weights[m]
        losses[m] = res["losses"] if ok else []
    return trained, losses


def failed_members(names: Sequence[str], results: Sequence[Any]) -> list[dict[str, str]]:
    """The members whose training task failed (``on_train_error: keep_member``), with the error."""
    return [{"member": m, "error": res.error} for m, res in zip(names, results) if not isinstance(res, dict)]
