"""Members scored on labelled problems: the one path of `eval`, evolve's held-out evaluation, `router` and `calibrate`.

* :func:`greedy_candidates`: every member's greedy chain for every problem, all in one multi-LoRA
  batch, the answer read with an answer mode (an extractor of
  :data:`ensemble_serve.shared.voting.answers.EXTRACTORS`); :func:`greedy_answers` does the same on
  a caller's engine (checked and synced, :mod:`trainer.engines`) or on one it starts and drops;
* :func:`is_right`: a chain is right when it has an answer under that mode and the answer equals the
  problem's (``answers_equal``: numbers compared as numbers, text normalized);
* :func:`accuracy`, :func:`member_accuracy`: the share right overall (``"all"``) and per domain,
  rounded to 4 places;
* :func:`disagreement`: two members disagree on a problem unless both have an answer and the answers
  are ``answers_equal`` (a chain without an answer disagrees with everything);
  :func:`disagreement_table` gives it for every pair, :func:`mean_disagreement` its mean over pairs;
* :func:`record_domain_scores`: the one writer of the manifest's ``domain_scores``.

So `ensemble-train eval` and evolve's held-out evaluation give the same figures for the same members,
problems, answer mode and generation limit.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ensemble_serve.shared.engine_config import EngineConfig
from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.offline_remote import RemoteOfflineEngine
from ensemble_serve.shared.population import Population, load_population, read_manifest, write_manifest
from ensemble_serve.shared.voting import Candidate, candidate_from_text
from ensemble_serve.shared.voting.answers import answers_equal
from trainer.engines import attach, remote_engine
from trainer.settings import RemoteSettings
from trainer.tasks.sandbox import Problem

BASE = "(base)"
"""The name the base model (member ``None``: no adapter) is reported under."""
ALL = "all"
"""The key of the share over all problems, beside the domains'."""


def member_name(member: str | None) -> str:
    return BASE if member is None else member


# --------------------------------------------------------------------------- chains


def greedy_params(max_tokens: int) -> Any:
    """vLLM's sampling parameters of a greedy chain (vLLM is imported here, when an engine is about to run)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def greedy_candidates(
    engine: OfflineEngine,
    members: Sequence[str | None],
    problems: Sequence[Problem],
    max_tokens: int,
    answer: str = "natural",
    progress: bool = False,
) -> dict[str | None, list[Candidate]]:
    """Every member's greedy chain for every problem, its answer extracted: ``{member: [candidate per problem]}``.

    All (member, problem) pairs go into one multi-LoRA ``generate`` call, so vLLM batches every
    member in the same engine steps. ``None`` is the base model without an adapter.
    """
    pairs = [(m, i) for m in members for i in range(len(problems))]
    cands: dict[str | None, list[Candidate]] = {m: [] for m in members}
    for (m, _), chain in zip(pairs, greedy_chains(engine, pairs, problems, max_tokens, answer, progress)):
        cands[m].append(chain)
    return cands


def greedy_chains(
    engine: OfflineEngine,
    pairs: Sequence[tuple[str | None, int]],
    problems: Sequence[Problem],
    max_tokens: int,
    answer: str = "natural",
    progress: bool = False,
) -> list[Candidate]:
    """The greedy chain of each (member, problem index) pair, its answer extracted, in one multi-LoRA batch."""
    chat = [engine.chat_prompt(p.prompt) for p in problems]
    outputs = engine.generate(
        [chat[i] for _, i in pairs], [m for m, _ in pairs], greedy_params(max_tokens), progress=progress
    )
    return [
        candidate_from_text(
            member_name(m), 0, gens[0].text, gens[0].tokens, answer, finished=gens[0].finish_reason != "length"
        )
        for (m, _), gens in zip(pairs, outputs)
    ]


def greedy_answers(
    population: Population,
    members: Sequence[str | None],
    problems: Sequence[Problem],
    max_tokens: int,
    engine_cfg: EngineConfig,
    *,
    engine: OfflineEngine | None = None,
    remote: RemoteSettings | None = None,
    answer: str = "natural",
    progress: bool = False,
    seconds: dict[str, float] | None = None,
) -> dict[str | None, list[Candidate]]:
    """:func:`greedy_candidates` on `engine` (a caller's: checked, synced to `population`, left running),
    or on an engine started with `engine_cfg` for this call and dropped before returning, so what
    the command loads next (the router's features) does not share the memory with it; with
    `remote.remote`, on those vLLM servers instead (this call's adapters are unloaded at the end).

    `seconds`, when given, receives ``engine_load`` and ``generate``.
    """
    timing = seconds if seconds is not None else {}
    started = time.perf_counter()
    own = None
    if engine is None and remote is not None and remote.remote:
        engine = own = remote_engine(population, remote)
    elif engine is None:
        engine = own = OfflineEngine(population, engine_cfg)
    else:
        attach(engine, population)
    timing["engine_load"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    try:
        return greedy_candidates(engine, members, problems, max_tokens, answer, progress)
    finally:
        timing["generate"] = round(time.perf_counter() - started, 1)
        engine = None
        if own is not None:
            if isinstance(own, RemoteOfflineEngine):
                own.close()  # the servers keep running; this command's adapters leave them
            del own
            gc.collect()


# --------------------------------------------------------------------------- right answers


def answer_is_right(answer: str | None, problem: Problem) -> bool:
    """Whether an extracted answer (a vote's, a chain's) equals the problem's label."""
    return answer is not None and answers_equal(answer, problem.answer)


def is_right(problem: Problem, chain: Candidate) -> bool:
    """Whether a chain has an answer under the mode it was read with, and it equals the problem's label."""
    return chain.valid and answer_is_right(chain.answer, problem)


def hits(problems: Sequence[Problem], chains: Sequence[Candidate]) -> list[bool]:
    """:func:`is_right` of each problem's chain."""
    if len(problems) != len(chains):
        raise ValueError(f"{len(chains)} chains for {len(problems)} problems")
    return [is_right(p, c) for p, c in zip(problems, chains)]


def share(flags: Sequence[bool]) -> float:
    """The share of true flags, rounded to 4 places (0.0 for none)."""
    return round(sum(flags) / len(flags), 4) if flags else 0.0


def accuracy(flags: Sequence[bool], problems: Sequence[Problem]) -> dict[str, float]:
    """``{"all": share right, domain: share right on its problems, ...}`` (domains sorted)."""
    domains = sorted({p.domain for p in problems})
    return {
        ALL: share(flags),
        **{d: share([f for f, p in zip(flags, problems) if p.domain == d]) for d in domains},
    }


def member_accuracy(
    problems: Sequence[Problem], cands: Mapping[str | None, Sequence[Candidate]]
) -> dict[str, dict[str, float]]:
    """accuracy[member][domain] (plus "all") of every member's chains; the base model is reported as ``(base)``."""
    return {member_name(m): accuracy(hits(problems, row), problems) for m, row in cands.items()}


# --------------------------------------------------------------------------- disagreement


def disagreement(a: Sequence[Candidate], b: Sequence[Candidate]) -> float:
    """The share of problems on which two members' chains disagree (not both answered and equal); unrounded."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} and {len(b)} chains: the members answered different problems")
    if not a:
        return 0.0
    return sum(not (x.valid and y.valid and answers_equal(x.answer, y.answer)) for x, y in zip(a, b)) / len(a)


def disagreement_table(cands: Mapping[str | None, Sequence[Candidate]]) -> dict[str, dict[str, float]]:
    """:func:`disagreement` of every ordered pair of members, rounded to 4 places."""
    return {member_name(a): {member_name(b): round(disagreement(cands[a], cands[b]), 4) for b in cands} for a in cands}


def mean_disagreement(chains: Sequence[Sequence[Candidate]]) -> float:
    """The mean of :func:`disagreement` over pairs of distinct members, rounded to 4 places (0.0 under two)."""
    pairs = [(a, b) for i, a in enumerate(chains) for b in chains[i + 1 :]]
    if not pairs or not chains[0]:
        return 0.0
    differ = [disagreement(a, b) for a, b in pairs]
    return round(sum(differ) / len(differ), 4)


# --------------------------------------------------------------------------- the manifest


def record_domain_scores(
    root: Path, per_member: Mapping[str, Mapping[str, float]], *, fitness: bool = False
) -> Population:
    """Write each member's accuracy per domain into the manifest's ``domain_scores``; returns the population reloaded.

    Members missing from `per_member` keep their entry. With `fitness`, a member's fitness becomes
    its overall accuracy (``eval --update-manifest``; evolve keeps its own fitness).
    """
    manifest = read_manifest(root)
    members = []
    for m in manifest.members:
        if m.name in per_member:
            update: dict[str, object] = {"domain_scores": {d: v for d, v in per_member[m.name].items() if d != ALL}}
            if fitness:
                update["fitness"] = per_member[m.name][ALL]
            m = m.model_copy(update=update)
        members.append(m)
    write_manifest(root, manifest.model_copy(update={"members": members}))
    return load_population(root, check_weights=False)
