"""Fitness: named terms in a registry, combined with the weights of the config.

Every term maps the generation's evidence (:class:`Evidence`) to one raw value per
member, or ``None`` when it cannot be computed (e.g. `correctness` with hidden
labels). Terms that are fractions (correctness, consensus) enter the fitness as
they are; the others (log-likelihoods, distances, leave-one-out deltas) are
min-max scaled across the population first, so a weight means the same thing
whatever the term's units. Every term is defined for every input: a member with
no parseable chain scores 0, a population of one has no diversity, and nothing
divides by zero.

Scope: by default (``"global"``) every term sees the whole batch. With ``"domain_loo"``
the terms that are means over problems (correctness, consensus) are computed once per
domain d on every problem *outside* d, giving one fitness per held-out domain
(``FitnessResult.held_out``): the evolutionary step selects each child's parents on the
fitness with that child's domain held out (domains taken in turn), so each domain is held out
of the selection pressure for its children. The other terms are population-level comparisons
without a per-problem mean to split, so they keep their global value.

The scalar ``fitness`` in domain_loo scope uses the per-domain terms averaged over domains.
Note that with equal problem counts per domain this average *equals* the global mean (each
problem lies outside D - 1 of the D domains, and each complement holds (D - 1)/D of the
problems), so on a balanced batch the scalar (elites, replacement, lifecycle deaths) is the
global one and only parent selection differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from ensemble_serve.shared.voting import Candidate, vote
from ensemble_serve.shared.voting.answers import answers_equal
from trainer.tasks.sandbox import Problem


@dataclass
class Evidence:
    """What one generation produced, per member (member order = `members`)."""

    members: list[str]
    problems: list[Problem]
    """The generation's problems; their answers are None when labels are hidden."""
    candidates: dict[str, list[list[Candidate]]]
    """member -> per problem -> one Candidate per sample (answer extracted and normalised)."""
    labels_visible: bool
    judge_logprob: dict[str, dict[str, float]] | None = None
    """judge -> author -> mean token log-probability the judge gives the author's chains."""
    hidden: dict[str, np.ndarray] | None = None
    """member -> final hidden states at the probe positions (rows aligned across members)."""
    output: dict[str, np.ndarray] | None = None
    """member -> next-token distributions at the probe positions."""
    embeddings: dict[str, np.ndarray] | None = None
    """member -> (problems, samples, dim) sentence embeddings of its chains."""
    consensus: list[str | None] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.consensus:
            self.consensus, self.agreement = consensus_answers(self.candidates, self.members, len(self.problems))

    def correct(self, member: str) -> list[list[bool]]:
        if not self.labels_visible:
            raise RuntimeError("labels are hidden: correctness must not be read")
        return [
            [c.valid and answers_equal(c.answer, p.answer) for c in row]
            for p, row in zip(self.problems, self.candidates[member])
        ]


def consensus_answers(
    candidates: Mapping[str, Sequence[Sequence[Candidate]]], members: Sequence[str], n_problems: int
) -> tuple[list[str | None], list[float]]:
    """Per problem: the majority answer of all members' chains (the server's own vote) and its agreement."""
    answers: list[str | None] = []
    agreement: list[float] = []
    for i in range(n_problems):
        pool = [c for m in members for c in candidates[m][i]]
        result = vote(pool, "majority") if pool else None
        answers.append(result.answer if result else None)
        agreement.append(result.agreement if result else 0.0)
    return answers, agreement


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def term_correctness(ev: Evidence) -> dict[str, float] | None:
    """Share of the member's chains whose answer is right (needs labels)."""
    if not ev.labels_visible or all(p.answer is None for p in ev.problems):
        return None
    return {m: _mean([ok for row in ev.correct(m) for ok in row]) for m in ev.members}


def term_consensus(ev: Evidence) -> dict[str, float]:
    """Share of the member's chains that agree with the population's majority answer (no labels needed)."""
    out = {}
    for m in ev.members:
        hits = []
        for answer, row in zip(ev.consensus, ev.candidates[m]):
            if answer is None:
                continue  # nobody answered this problem: it says nothing about anyone
            hits.extend(c.valid and answers_equal(c.answer, answer) for c in row)
        out[m] = _mean(hits)
    return out


def term_cross_eval(ev: Evidence) -> dict[str, float] | None:
    """How likely the *other* members find this member's chains (mean token log-probability)."""
    if not ev.judge_logprob or len(ev.members) < 2:
        return None
    return {
        author: _mean([ev.judge_logprob[judge][author] for judge in ev.members if judge != author])
        for author in ev.members
    }


def _cosine_distance_to_mean(vectors: Mapping[str, np.ndarray], members: Sequence[str]) -> dict[str, float] | None:
    """Mean over rows of 1 - cos(member row, population-mean row)."""
    if len(members) < 2:
        return None
    stack = np.stack([np.asarray(vectors[m], dtype=np.float64) for m in members])  # (members, rows, dim)
    if stack.size == 0 or stack.shape[1] == 0:
        return None
    mean = stack.mean(axis=0, keepdims=True)
    dot = (stack * mean).sum(-1)
    norms = np.linalg.norm(stack, axis=-1) * np.linalg.norm(mean, axis=-1)
    cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)
    dist = (1.0 - cos).mean(axis=1)
    return {m: float(d) for m, d in zip(members, dist)}


def term_diversity_embedding(ev: Evidence) -> dict[str, float] | None:
    """Sentence-embedding distance of the member's chains from the population's mean chain, per problem."""
    if ev.embeddings is None:
        return None
    rows = {m: np.asarray(ev.embeddings[m]).reshape(-1, np.asarray(ev.embeddings[m]).shape[-1]) for m in ev.members}
    return _cosine_distance_to_mean(rows, ev.members)


def term_diversity_hidden(ev: Evidence) -> dict[str, float] | None:
    """Cosine distance of the member's final hidden states from the population mean, on shared probe chains."""
    return None if ev.hidden is None else _cosine_distance_to_mean(ev.hidden, ev.members)


def term_diversity_output(ev: Evidence) -> dict[str, float] | None:
    """Cosine distance of the member's next-token distributions from the population mean, on shared probes."""
    return None if ev.output is None else _cosine_distance_to_mean(ev.output, ev.members)


def _vote_accuracy(ev: Evidence, members: Sequence[str], reference: Sequence[str | None]) -> float:
    hits = []
    for i, ref in enumerate(reference):
        if ref is None:
            continue
        pool = [c for m in members for c in ev.candidates[m][i]]
        result = vote(pool, "majority") if pool else None
        hits.append(bool(result and result.answer is not None and answers_equal(result.answer, ref)))
    return _mean(hits)


def term_contribution(ev: Evidence) -> dict[str, float] | None:
    """Leave-one-out: majority-vote accuracy of the population minus that of the population without the member.

    Against the answers when labels are visible, else against the full population's consensus.
    """
    if len(ev.members) < 2:
        return None
    reference = [p.answer for p in ev.problems] if ev.labels_visible else list(ev.consensus)
    if all(r is None for r in reference):
        return None
    full = _vote_accuracy(ev, ev.members, reference)
    return {m: full - _vote_accuracy(ev, [x for x in ev.members if x != m], reference) for m in ev.members}


Term = Callable[[Evidence], "dict[str, float] | None"]

FITNESS_TERMS: dict[str, tuple[Term, bool]] = {
    # name: (function, scaled) ; scaled terms are min-max scaled across members.
    # The one list of term names: the config's `fitness` weights are checked against these keys.
    "correctness": (term_correctness, False),
    "consensus": (term_consensus, False),
    "cross_eval": (term_cross_eval, True),
    "diversity_embedding": (term_diversity_embedding, True),
    "diversity_hidden": (term_diversity_hidden, True),
    "diversity_output": (term_diversity_output, True),
    "contribution": (term_contribution, True),
}


def _minmax(values: Mapping[str, float]) -> dict[str, float]:
    lo, hi = min(values.values()), max(values.values())
    if not hi > lo:
        return {m: 0.0 for m in values}
    return {m: (v - lo) / (hi - lo) for m, v in values.items()}


Scope = Literal["global", "domain_loo"]
"""The fitness scopes (module docstring); the config's `fitness_scope` field has this type."""
SCOPES: tuple[str, ...] = get_args(Scope)
PER_PROBLEM_TERMS: tuple[str, ...] = ("correctness", "consensus")
"""Terms that are means over the batch's problems: the only ones a domain scope can split."""


@dataclass
class FitnessResult:
    fitness: dict[str, float]
    terms: dict[str, dict[str, float]]
    """Raw value of every computable term (also those with weight 0: they are reported), in the scope used."""
    used: dict[str, float]
    """Weights of the terms that entered the fitness."""
    scope: str = "global"
    """The scope the per-problem terms were computed in (a requested domain_loo can fall back to global)."""
    scope_note: str | None = None
    """Why the requested scope was not applied, when it was not."""
    held_out: dict[str, dict[str, float]] = field(default_factory=dict)
    """domain_loo: {domain d: fitness of each member with d held out}; empty in global scope."""


def evidence_subset(ev: Evidence, keep: Sequence[int]) -> Evidence:
    """The evidence of the problems `keep` only, with the full batch's consensus.

    The consensus answers are kept, not re-voted on the subset: a problem's majority answer does
    not depend on which other problems are in the batch, and re-voting would cost a vote per
    problem for nothing. Population-level evidence (judges, probes, embeddings) is left out: the
    per-problem terms do not read it.
    """
    return Evidence(
        members=list(ev.members),
        problems=[ev.problems[i] for i in keep],
        candidates={m: [ev.candidates[m][i] for i in keep] for m in ev.members},
        labels_visible=ev.labels_visible,
        consensus=[ev.consensus[i] for i in keep],
        agreement=[ev.agreement[i] for i in keep],
    )


def held_out_terms(ev: Evidence, name: str, domains: Sequence[str]) -> dict[str, dict[str, float]]:
    """Term `name` computed on every problem outside d, for each domain d where it is defined.

    A domain whose complement leaves the term undefined (e.g. no labelled problem outside it)
    is left out. An empty complement gives the term's own empty value (0 for the per-problem
    terms), never a division by zero.
    """
    fn = FITNESS_TERMS[name][0]
    out = {}
    for d in domains:
        keep = [i for i, p in enumerate(ev.problems) if p.domain != d]
        values = fn(evidence_subset(ev, keep))
        if values is not None:
            out[d] = values
    return out


def domain_loo_term(ev: Evidence, name: str, domains: Sequence[str]) -> dict[str, float] | None:
    """Mean over domains d of term `name` computed on every problem outside d (None: undefined for every d)."""
    per_domain = list(held_out_terms(ev, name, domains).values())
    if not per_domain:
        return None
    return {m: _mean([v[m] for v in per_domain]) for m in ev.members}


def _combine(
    terms: Mapping[str, Mapping[str, float]], used: Mapping[str, float], members: Sequence[str]
) -> dict[str, float]:
    total = sum(used.values())
    fitness = {m: 0.0 for m in members}
    for t, w in used.items():
        scaled = _minmax(dict(terms[t])) if FITNESS_TERMS[t][1] else terms[t]
        for m in members:
            fitness[m] += w * scaled[m] / total
    return fitness


def compute_fitness(ev: Evidence, weights: Mapping[str, float], scope: Scope = "global") -> FitnessResult:
    """Every computable term, and the fitness: sum of weight x (scaled) term over the weights of the terms used.

    `scope` "domain_loo" replaces the per-problem terms by their per-domain leave-one-out mean
    (module docstring); with fewer than two domains in the batch there is nothing to hold out,
    so the global values are used and `scope_note` says so.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown fitness scope {scope!r}; expected one of {list(SCOPES)}")
    terms: dict[str, dict[str, float]] = {}
    for name, (fn, _) in FITNESS_TERMS.items():
        values = fn(ev)
        if values is not None:
            terms[name] = values
    used_scope, note = "global", None
    per_domain_terms: dict[str, dict[str, dict[str, float]]] = {}
    domains: list[str] = []
    if scope == "domain_loo":
        domains = sorted({p.domain for p in ev.problems})
        if len(domains) < 2:
            note = f"domain_loo needs at least two domains, the batch has {len(domains)} {domains}: global scope used"
            domains = []
        else:
            used_scope = "domain_loo"
            for name in PER_PROBLEM_TERMS:
                if name not in terms:
                    continue
                per_domain_terms[name] = held_out_terms(ev, name, domains)
                if per_domain_terms[name]:  # undefined outside every domain: the global value stands
                    vals = list(per_domain_terms[name].values())
                    terms[name] = {m: _mean([v[m] for v in vals]) for m in ev.members}
    for name, values in terms.items():
        if not all(math.isfinite(v) for v in values.values()):
            raise ValueError(f"fitness term {name} is not finite: {values}")
    used = {t: w for t, w in weights.items() if w > 0 and t in terms}
    fitness = _combine(terms, used, ev.members)
    held_out = {}
    for d in domains:  # the fitness with d held out: per-problem terms on the problems outside d
        terms_d = {t: per_domain_terms.get(t, {}).get(d, values) for t, values in terms.items()}
        held_out[d] = _combine(terms_d, used, ev.members)
    return FitnessResult(fitness=fitness, terms=terms, used=used, scope=used_scope, scope_note=note, held_out=held_out)


def diversity_summary(terms: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Population mean of each raw diversity measure (for history and plots)."""
    return {
        name.removeprefix("diversity_"): round(_mean(list(values.values())), 6)
        for name, values in terms.items()
        if name.startswith("diversity_")
    }
