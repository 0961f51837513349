"""One generation's self-play and what is learnt from it.

* :func:`self_play`: every member samples chains for every problem, all in one multi-LoRA
  vLLM batch; sample s of member m on problem i is seeded with
  ``derive_seed(seed, "sample", g, m, i)``, so a resumed generation samples the same chains.
* scoring evidence: the task calls that run every member as a judge of the others' chains and
  as a probe subject (:func:`score_calls`, :func:`add_scores`), and sentence embeddings of the
  chains (:func:`embed_chains`); the fitness terms (:mod:`trainer.evolve.fitness`) read them.
* the gradient phase's data: :func:`pseudo_labels` (the truth where known, else a confident
  consensus), :func:`member_labels` (the same, or each member's leave-self-out peer labels),
  :func:`training_examples` (chains that reach the label, filtered), :func:`label_audit`
  (label precision against hidden answers, reported only), and the per-member
  training calls (:func:`train_calls`, seeded per generation and member; each starts a fresh
  optimizer, so nothing but the weights carries over between generations).

These are plain functions of plain data; the loop runs the task calls on its executor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ensemble_serve.shared.embeddings import default_embedder
from ensemble_serve.shared.lora import LoraWeights, lora_from_bytes, lora_to_bytes
from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.population import Population
from ensemble_serve.shared.voting import Candidate, candidate_from_text, vote
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
    purpose: str = "sample",
) -> dict[str, list[list[Candidate]]]:
    """Every member x problem x sample in one multi-LoRA batch; returns the candidates (answers extracted).

    Sample seeds derive from (seed, `purpose`, generation, member, problem): the curriculum's probe
    uses its own purpose, so its chains are not the self-play's."""
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
                    seed=derive_seed(cfg.seed, purpose, generation, m, i),
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
        else:
            labels.append(confident(answer, agreement, cfg.min_agreement))
    return labels


def confident(answer: str | None, agreement: float, min_agreement: float) -> str | None:
    """A consensus answer as a label: only when some chain agreed and the agreement reaches the threshold."""
    return answer if answer is not None and agreement > 0 and agreement >= min_agreement else None


def niche_group(members: Sequence[str], focus: Mapping[str, str | None], domain: str) -> list[str]:
    """The members whose focus domain is `domain`, or every member when none is."""
    return [m for m in members if focus.get(m) == domain] or list(members)


def labellers(
    problems: Sequence[Problem],
    members: Sequence[str],
    cfg: EvolveConfig,
    focus: Mapping[str, str | None] | None = None,
) -> list[list[str]]:
    """Per problem, the members whose chains label it: every member, or with ``label_peers: niche``
    the members whose focus domain is the problem's domain (every member when none is)."""
    if cfg.label_peers != "niche" or not focus:
        return [list(members) for _ in problems]
    return [niche_group(members, focus, p.domain) for p in problems]


def labelling_chains(
    candidates: Mapping[str, Sequence[Sequence[Candidate]]],
    problems: Sequence[Problem],
    members: Sequence[str],
    cfg: EvolveConfig,
    focus: Mapping[str, str | None] | None = None,
) -> list[list[Candidate]]:
    """Per problem, the chains of its labelling members (:func:`labellers`): what the curriculum scores."""
    groups = labellers(problems, members, cfg, focus)
    return [[c for m in group for c in candidates[m][i]] for i, group in enumerate(groups)]


def _majority(ev: Evidence, i: int, group: Sequence[str], min_agreement: float) -> str | None:
    pool = [c for m in group for c in ev.candidates[m][i]]
    if not pool:
        return None
    result = vote(pool, "majority")
    return confident(result.answer, result.agreement, min_agreement)


def member_labels(
    ev: Evidence, cfg: EvolveConfig, focus: Mapping[str, str | None] | None = None
) -> dict[str, list[str | None]]:
    """Each member's labels: the truth with labels visible; with labels hidden the confident majority
    of the labelling members' chains (:func:`labellers`), all of them (``label_rule: consensus``) or
    all but the member itself (``leave_self_out``: a member never grades its own chains)."""
    if cfg.labels == "ground_truth":
        shared = pseudo_labels(ev, cfg)
        return {m: shared for m in ev.members}
    groups = labellers(ev.problems, ev.members, cfg, focus)
    if cfg.label_rule == "consensus" and cfg.label_peers == "all":
        shared = pseudo_labels(ev, cfg)
        return {m: shared for m in ev.members}
    out: dict[str, list[str | None]] = {}
    for m in ev.members:
        labels = []
        for i, group in enumerate(groups):
            if cfg.label_rule == "leave_self_out":  # a niche of one: its member is labelled by everyone else
                peers = [o for o in group if o != m] or [o for o in ev.members if o != m]
            else:
                peers = list(group)
            labels.append(_majority(ev, i, peers, cfg.min_agreement))
        out[m] = labels
    return out


def _per_member(
    labels: Sequence[str | None] | Mapping[str, Sequence[str | None]], members: Sequence[str]
) -> Mapping[str, Sequence[str | None]]:
    return labels if isinstance(labels, Mapping) else {m: labels for m in members}


def training_examples(
    ev: Evidence,
    labels: Sequence[str | None] | Mapping[str, Sequence[str | None]],
    cfg: EvolveConfig,
    focus: Mapping[str, str | None] | None = None,
) -> dict[str, list[tuple[str, str]]]:
    """Verified chains per member: its own, plus the other members' (``share_chains: true``); with
    ``share_chains: niche`` a member with a focus domain learns only that domain, from its own and
    its niche peers' chains (a member without one learns from every chain); with ``experts`` every
    member learns each family from its own chains and those of the family's niche members.

    `labels`: one list for every member, or one per member (:func:`member_labels`). With
    ``max_length_ratio``, chains cut off at ``max_tokens`` and chains longer than that ratio times
    the median length of the chains reaching the same label are left out (the length filter).
    """
    per = _per_member(labels, ev.members)
    medians: dict[tuple[int, str], float] = {}

    def median_length(i: int, label: str) -> float:
        if (i, label) not in medians:
            lengths = [
                c.tokens for m in ev.members for c in ev.candidates[m][i] if c.valid and answers_equal(c.answer, label)
            ]
            medians[(i, label)] = float(np.median(lengths)) if lengths else 0.0
        return medians[(i, label)]

    def keep(i: int, c: Candidate, label: str) -> bool:
        if not (c.valid and answers_equal(c.answer, label) and c.text.strip()):
            return False
        if cfg.max_length_ratio is None:
            return True
        return c.tokens < cfg.max_tokens and c.tokens <= cfg.max_length_ratio * median_length(i, label)

    verified: dict[str, list[tuple[int, tuple[str, str]]]] = {m: [] for m in ev.members}
    for m in ev.members:
        for i, (p, label, row) in enumerate(zip(ev.problems, per[m], ev.candidates[m])):
            if label is None:
                continue
            verified[m] += [(i, (p.prompt, c.text.strip())) for c in row if keep(i, c, label)]
    out = {}
    for m in ev.members:
        niche = (focus or {}).get(m) if cfg.share_chains == "niche" else None
        if niche is not None:  # a specialist keeps to its niche: its own and its niche peers' chains there
            pool = [ex for i, ex in verified[m] if ev.problems[i].domain == niche]
            pool += [
                ex
                for o in ev.members
                if o != m and (focus or {}).get(o) == niche
                for i, ex in verified[o]
                if ev.problems[i].domain == niche
            ]
        else:
            pool = [ex for _, ex in verified[m]]
            if cfg.share_chains == "experts":  # each family taught by its niche's members
                pool += [
                    ex
                    for o in ev.members
                    if o != m
                    for i, ex in verified[o]
                    if (focus or {}).get(o) == ev.problems[i].domain
                ]
            elif cfg.share_chains is not False:  # true, or niche for a member without a focus domain
                pool += [ex for other in ev.members if other != m for _, ex in verified[other]]
        seen: set[tuple[str, str]] = set()
        out[m] = [ex for ex in pool if not (ex in seen or seen.add(ex))]
    return out


def label_audit(
    ev: Evidence, labels: Mapping[str, Sequence[str | None]], truth: Sequence[str | None]
) -> dict[str, Any] | None:
    """Label precision and recall against the hidden answers, for the record only (None without answers).

    Over (member, problem) pairs whose answer is known: coverage = labelled / pairs; precision =
    right labels / labels; recall = right labels on pairs where some chain of the population reached
    the answer / those pairs (what a perfect judge of these chains could label). Also per cell
    (domain:level).
    Nothing reads it back: it is reported, never trained on, never used to choose.
    """
    if not truth or all(t is None for t in truth):
        return None
    reached = [
        t is not None and any(c.valid and answers_equal(c.answer, t) for m in ev.members for c in ev.candidates[m][i])
        for i, t in enumerate(truth)
    ]
    cells: dict[str, list[int]] = {}
    for i, p in enumerate(ev.problems):
        cells.setdefault(f"{p.domain}:{p.difficulty}", []).append(i)

    def figures(rows: Sequence[int]) -> dict[str, Any]:
        pairs = [(m, i) for m in ev.members for i in rows if truth[i] is not None]
        given = [(m, i) for m, i in pairs if labels[m][i] is not None]
        right = [(m, i) for m, i in given if answers_equal(labels[m][i], truth[i])]
        reachable = sum(reached[i] for _, i in pairs)
        return {
            "pairs": len(pairs),
            "labelled": len(given),
            "coverage": round(len(given) / len(pairs), 4) if pairs else None,
            "precision": round(len(right) / len(given), 4) if given else None,
            "recall": round(sum(reached[i] for _, i in right) / reachable, 4) if reachable else None,
        }

    return {**figures(range(len(truth))), "cells": {k: figures(v) for k, v in sorted(cells.items())}}


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
    """Each member's weights after its training task (unchanged when it did not train) and its losses."""
    trained, losses = {}, {}
    for m, res in zip(names, results):
        trained[m] = lora_from_bytes(res["adapter"]) if res["trained"] else weights[m]
        losses[m] = res["losses"]
    return trained, losses
