"""What a generation learns from its chains: labels, and the training examples that reach them.

* :func:`pseudo_labels`: the answer each problem's chains are checked against, the truth where the
  run may read it (``labels: ground_truth``), else a confident consensus (:func:`confident`);
* :func:`member_labels`: the same for every member, or with labels hidden each member's own labels
  from its labelling peers (:func:`labellers`: all members, the problem's niche, or the members the
  router sends it to; ``label_rule:
  leave_self_out`` leaves the member itself out, so it never grades its own chains);
* :func:`labelling_chains`: per problem, the labelling members' chains (what the curriculum scores);
* :func:`training_examples`: each member's verified chains (its own and, by ``share_chains``, its
  peers'), with the optional length filter.

Plain functions of the generation's evidence; the label audit (:mod:`trainer.evolve.audit`)
checks these labels against the hidden answers, for the record only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ensemble_serve.shared.voting import Candidate, vote
from ensemble_serve.shared.voting.answers import answers_equal
from trainer.evolve.config import EvolveConfig
from trainer.evolve.fitness import Evidence
from trainer.tasks.sandbox import Problem


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
    teachers: Mapping[str, str] | None = None,
    routed: Sequence[Sequence[str]] | None = None,
) -> list[list[str]]:
    """Per problem, the members whose chains label it: every member, or with ``label_peers: niche``
    the members whose focus domain is the problem's domain (every member when none is); with frozen
    `teachers` ({family: member}, :mod:`trainer.evolve.retention`) the family's teacher alone; with
    ``label_peers: routed`` the `routed` group of each problem (:mod:`trainer.evolve.routed`)."""
    if teachers:
        return [[teachers[p.domain]] if p.domain in teachers else list(members) for p in problems]
    if cfg.label_peers == "routed":
        if routed is None or len(routed) != len(problems):
            raise ValueError("label_peers: routed needs each problem's routed members")
        return [list(group) or list(members) for group in routed]
    if cfg.label_peers != "niche" or not focus:
        return [list(members) for _ in problems]
    return [niche_group(members, focus, p.domain) for p in problems]


def labelling_chains(
    candidates: Mapping[str, Sequence[Sequence[Candidate]]],
    problems: Sequence[Problem],
    members: Sequence[str],
    cfg: EvolveConfig,
    focus: Mapping[str, str | None] | None = None,
    routed: Sequence[Sequence[str]] | None = None,
) -> list[list[Candidate]]:
    """Per problem, the chains of its labelling members (:func:`labellers`): what the curriculum scores."""
    groups = labellers(problems, members, cfg, focus, routed=routed)
    return [[c for m in group for c in candidates[m][i]] for i, group in enumerate(groups)]


def _majority(ev: Evidence, i: int, group: Sequence[str], min_agreement: float) -> str | None:
    pool = [c for m in group for c in ev.candidates[m][i]]
    if not pool:
        return None
    result = vote(pool, "majority")
    return confident(result.answer, result.agreement, min_agreement)


def member_labels(
    ev: Evidence,
    cfg: EvolveConfig,
    focus: Mapping[str, str | None] | None = None,
    teachers: Mapping[str, str] | None = None,
    routed: Sequence[Sequence[str]] | None = None,
) -> dict[str, list[str | None]]:
    """Each member's labels: the truth with labels visible; with labels hidden the confident majority
    of the labelling members' chains (:func:`labellers`), all of them (``label_rule: consensus``) or
    all but the member itself (``leave_self_out``: a member never grades its own chains); with
    `teachers`, the family's teacher's chains; with `routed` groups, the routed members' chains."""
    if cfg.labels == "ground_truth":
        shared = pseudo_labels(ev, cfg)
        return {m: shared for m in ev.members}
    groups = labellers(ev.problems, ev.members, cfg, focus, teachers, routed)
    if cfg.label_rule == "consensus" and cfg.label_peers == "all" and not teachers:
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
