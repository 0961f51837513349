"""One generation's self-play and what is learnt from it.

* :func:`self_play`: every member samples chains for every problem, all in one multi-LoRA
  vLLM batch; sample s of member m on problem i is seeded with
  ``derive_seed(seed, "sample", g, m, i)``, so a resumed generation samples the same chains.
* scoring evidence: the task calls that run every member as a judge of the others' chains and
  as a probe subject (:func:`score_calls`, :func:`add_scores`), and sentence embeddings of the
  chains (:func:`embed_chains`); the fitness terms (:mod:`trainer.evolve.fitness`) read them.
* the gradient phase's data: :func:`pseudo_labels` (the truth where known, else a confident
  consensus), :func:`training_examples` (chains that reach the label), and the per-member
  training calls (:func:`train_calls`, seeded per generation and member; each starts a fresh
  optimizer, so nothing but the weights carries over between generations).

These are plain functions of plain data; the loop runs the task calls on its executor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ensemble_serve.shared.embeddings import default_embedder
from ensemble_serve.shared.lora import LoraWeights, lora_from_bytes, lora_to_bytes
from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.population import Population
from ensemble_serve.shared.voting import Candidate, candidate_from_text
from ensemble_serve.shared.voting.answers import answers_equal
from trainer.evolve.config import EvolveConfig
from trainer.evolve.fitness import Evidence
from trainer.evolve.seeds import derive_seed
from trainer.tasks.sandbox import Problem

DEFAULT_LR = 2e-3
"""Gradient-phase learning rate of a member whose manifest records none (and no `train_lr` is set)."""

# --------------------------------------------------------------------------- chains


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


# --------------------------------------------------------------------------- scoring evidence


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


# --------------------------------------------------------------------------- the gradient phase's data


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
                steps=cfg.train_steps,
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
    """Each member's weights after its training task (unchanged when it did not train) and its losses."""
    trained, losses = {}, {}
    for m, res in zip(names, results):
        trained[m] = lora_from_bytes(res["adapter"]) if res["trained"] else weights[m]
        losses[m] = res["losses"]
    return trained, losses
