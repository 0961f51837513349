"""The curriculum: which problems a generation practises, chosen where the population can still learn.

A **proposer** (an entry of :data:`PROPOSERS`) is called once per generation before self-play.
It probes candidate problems (one batch, every member samples `samples_per_member` chains at the
self-play temperature) and returns a :class:`Plan`: the problems to practise, a replay of
mastered ones, and its state for the next generation. Two are built in:

* ``frontier`` (the sandbox): every domain has a current level on the ladder of `difficulties`.
  The cells (domain, level - 1 .. level + 1) are probed; the current level is practised while
  its score lies strictly between `low` and `high` (learnable); a mastered level (score >= high)
  moves the domain up one level, a level too hard (score <= low) moves it down one. Steps are one
  level at a time: a larger step is where self-labelled training avalanches into errors.
* ``agreement`` (a dataset, or any problems without levels): a pool of rows is probed and the
  rows whose agreement is learnable are practised, so a user's JSONL file needs no levels.

**Scores.** The probe's chains of a problem are those of its labelling members (every member, or
with ``label_peers: niche`` its family's specialists). With labels the score of a cell is their
consensus solve rate (their majority answer is right); with labels hidden it is their mean
agreement (the share of chains that give the majority answer). The hidden arm's problems carry no
answers, so nothing here can read one.

**Back-off** (:func:`after_self_play`). After self-play, every practised cell's chains give
three label-free signals: mean agreement, mean consensus margin (majority share minus
runner-up share) and mean chain length. When one moves past its limit between two generations
at the same cell, the domain steps back a level and waits `cooldown` generations before it
climbs again. The signals never involve an answer, in either arm.

**Determinism.** The probe's problems and samples derive from (seed, generation, cell); the
state is a plain JSON value stored in each generation's history line, read back from the last
line, so a resumed run makes the same plans.

A user proposer: ``@register_proposer("name")`` on a function ``(ctx: ProposerContext) -> Plan``,
imported before the config is read; ``curriculum.proposer: name`` then selects it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ensemble_serve.shared.voting import Candidate
from ensemble_serve.shared.voting.answers import answers_equal
from ensemble_serve.shared.voting.grouping import outcome_groups
from trainer.evolve.seeds import derive_seed
from trainer.tasks.sandbox import Problem, generate_problems

Cell = tuple[str, int]
"""(domain, level); level 0 for problems without levels."""

ProbeFn = Callable[[Sequence[Problem]], list[list[Candidate]]]
"""Samples the probe chains for each problem: per problem, the chains of the members that label it."""


@dataclass(frozen=True)
class CellStats:
    """What the chains of one cell say: label-free signals, and the solve rate where answers are known."""

    problems: int
    agreement: float
    margin: float
    length: float
    solve_rate: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class Plan:
    """One generation's curriculum: what to practise, or why nothing."""

    problems: list[Problem]
    """The batch (answers stripped when labels are hidden)."""
    cells: list[Cell]
    """The practised cells (frontier), or [("all", 0)] (agreement)."""
    state: dict[str, Any]
    """The proposer's state after this plan; :func:`after_self_play` adds the signals."""
    probe: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per probed cell ("domain:level"): its stats and score."""
    replay: int = 0
    events: list[str] = field(default_factory=list)
    skipped: str | None = None
    truth: list[str | None] = field(default_factory=list)
    """The answers of `problems` for the label audit only (see :func:`trainer.evolve.records.label_audit`)."""


@dataclass
class ProposerContext:
    """What a proposer may use: settings, the generation, its last state, the probe, the problem source."""

    generation: int
    seed: int
    n_problems: int
    domains: tuple[str, ...]
    ladder: tuple[int, ...]
    start_level: int
    low: float
    high: float
    probe_problems: int
    replay: float
    labels_visible: bool
    state: dict[str, Any]
    probe: ProbeFn
    dataset: Sequence[Problem] | None = None


Proposer = Callable[[ProposerContext], Plan]
PROPOSERS: dict[str, Proposer] = {}


def register_proposer(name: str) -> Callable[[Proposer], Proposer]:
    """Add a proposer to the registry under `name` (a config's `curriculum.proposer`)."""

    def add(fn: Proposer) -> Proposer:
        PROPOSERS[name] = fn
        return fn

    return add


class CurriculumError(ValueError):
    """A curriculum that cannot run (bad state, unknown proposer)."""


# --------------------------------------------------------------------------- signals


def cell_stats(problems: Sequence[Problem], chains: Sequence[Sequence[Candidate]], labels_visible: bool) -> CellStats:
    """Agreement, margin and length of the chains of some problems; the solve rate only with labels visible."""
    agreement, margin, length, solved = [], [], [], []
    for p, row in zip(problems, chains):
        groups, reps = outcome_groups(row)  # the vote's own grouping of equal answers
        sizes = sorted((len(g) for g in groups), reverse=True)
        n = max(1, len(row))
        first = sizes[0] / n if sizes else 0.0
        second = sizes[1] / n if len(sizes) > 1 else 0.0
        agreement.append(first)
        margin.append(first - second)
        length.append(statistics.fmean(c.tokens for c in row) if row else 0.0)
        if labels_visible:
            top = max(range(len(groups)), key=lambda g: (len(groups[g]), -g)) if groups else None
            solved.append(top is not None and p.answer is not None and answers_equal(reps[top], p.answer))
    k = len(agreement)
    return CellStats(
        problems=k,
        agreement=statistics.fmean(agreement) if k else 0.0,
        margin=statistics.fmean(margin) if k else 0.0,
        length=statistics.fmean(length) if k else 0.0,
        solve_rate=(statistics.fmean(solved) if solved else 0.0) if labels_visible else None,
    )


def score_of(stats: CellStats) -> float:
    """The learnability score: the solve rate where labels are visible, else the agreement."""
    return stats.solve_rate if stats.solve_rate is not None else stats.agreement


def cell_key(cell: Cell) -> str:
    return f"{cell[0]}:{cell[1]}"


def backoff_signal(
    before: Mapping[str, float], now: CellStats, agreement_drop: float, margin_drop: float, length_drift: float
) -> str | None:
    """Which label-free signal moved past its limit since the last generation at this cell (None: none did)."""
    if before["agreement"] - now.agreement > agreement_drop:
        return f"agreement fell {before['agreement']:.2f} -> {now.agreement:.2f}"
    if before["margin"] - now.margin > margin_drop:
        return f"margin fell {before['margin']:.2f} -> {now.margin:.2f}"
    if before["length"] > 0 and abs(now.length - before["length"]) / before["length"] > length_drift:
        return f"chain length drifted {before['length']:.1f} -> {now.length:.1f} tokens"
    return None


# --------------------------------------------------------------------------- proposers


def _strip(problems: Sequence[Problem], labels_visible: bool) -> list[Problem]:
    if labels_visible:
        return list(problems)
    return [dataclasses.replace(p, answer=None, chain=None) for p in problems]


def _cell_problems(ctx: ProposerContext, cell: Cell, n: int, purpose: str) -> list[Problem]:
    domain, level = cell
    return generate_problems(
        n,
        seed=derive_seed(ctx.seed, purpose, ctx.generation, domain, level),
        split="train",
        domains=[domain],
        difficulties=[level],
    )


def _spread(total: int, cells: Sequence[Cell]) -> list[int]:
    """`total` problems over `cells`, as evenly as possible (the first cells get the remainder)."""
    if not cells:
        return []
    q, r = divmod(total, len(cells))
    return [q + (i < r) for i in range(len(cells))]


@register_proposer("frontier")
def frontier(ctx: ProposerContext) -> Plan:
    """Each domain practises its current level while it is learnable, one level up once mastered."""
    ladder = list(ctx.ladder)
    state = {
        "levels": {d: int(ctx.state.get("levels", {}).get(d, ctx.start_level)) for d in ctx.domains},
        "cooldown": {d: int(ctx.state.get("cooldown", {}).get(d, 0)) for d in ctx.domains},
        "last": dict(ctx.state.get("last", {})),
    }
    for d, level in state["levels"].items():
        if level not in ladder:
            raise CurriculumError(f"curriculum state puts {d} at level {level}, not on the ladder {ladder}")
    probed: list[Cell] = []
    for d in ctx.domains:
        i = ladder.index(state["levels"][d])
        probed += [(d, lv) for lv in ladder[max(0, i - 1) : i + 2]]
    batches = [_strip(_cell_problems(ctx, c, ctx.probe_problems, "probe"), ctx.labels_visible) for c in probed]
    chains = ctx.probe([p for b in batches for p in b])
    stats: dict[Cell, CellStats] = {}
    at = 0
    for c, b in zip(probed, batches):
        stats[c] = cell_stats(b, chains[at : at + len(b)], ctx.labels_visible)
        at += len(b)
    score = {c: score_of(s) for c, s in stats.items()}

    def learnable(c: Cell) -> bool:
        return c in score and ctx.low < score[c] < ctx.high

    practise, mastered, events = [], [], []
    for d in ctx.domains:
        level = state["levels"][d]
        i = ladder.index(level)
        up = (d, ladder[i + 1]) if i + 1 < len(ladder) else None
        down = (d, ladder[i - 1]) if i > 0 else None
        mastered += [c for c in stats if c[0] == d and score[c] >= ctx.high and c[1] <= level]
        if learnable((d, level)):
            chosen: Cell | None = (d, level)
        elif score[(d, level)] >= ctx.high and up is not None and state["cooldown"][d] == 0:
            chosen = up if learnable(up) else None
            state["levels"][d] = up[1]
            events.append(f"{d}: level {level} mastered ({score[(d, level)]:.2f}), up to {up[1]}")
        elif score[(d, level)] <= ctx.low and down is not None:
            chosen = down if learnable(down) else None
            state["levels"][d] = down[1]
            events.append(f"{d}: level {level} too hard ({score[(d, level)]:.2f}), down to {down[1]}")
        else:
            chosen = None
        if chosen is not None:
            practise.append(chosen)
        state["cooldown"][d] = max(0, state["cooldown"][d] - 1)
    plan = Plan(
        problems=[],
        cells=practise,
        state=state,
        probe={cell_key(c): {**stats[c].to_json(), "score": round(score[c], 4)} for c in probed},
        events=events,
    )
    if not practise:
        plan.skipped = (
            f"no learnable cell: no family's level (or the level it moves to) scores strictly between "
            f"low ({ctx.low}) and high ({ctx.high}); probed: "
            f"{', '.join(f'{cell_key(c)} {score[c]:.2f}' for c in probed)}"
        )
        return plan
    replay_pool = sorted({c for c in mastered if c not in practise})
    n_replay = round(ctx.replay * ctx.n_problems) if replay_pool else 0
    full: list[Problem] = []
    for c, k in zip(practise, _spread(ctx.n_problems - n_replay, practise)):
        full += _cell_problems(ctx, c, k, "problems")
    for c, k in zip(replay_pool, _spread(n_replay, replay_pool)):
        full += _cell_problems(ctx, c, k, "replay")
    plan.problems = _strip(full, ctx.labels_visible)
    plan.truth = [p.answer for p in full]
    plan.replay = n_replay
    return plan


@register_proposer("agreement")
def agreement(ctx: ProposerContext) -> Plan:
    """Practise the rows of a probed pool whose agreement is learnable (no levels needed)."""
    state = {
        "cooldown": {"all": int(ctx.state.get("cooldown", {}).get("all", 0))},
        "last": dict(ctx.state.get("last", {})),
    }
    size = ctx.n_problems * ctx.probe_problems
    if ctx.dataset is not None:
        rng = random.Random(derive_seed(ctx.seed, "probe", ctx.generation))
        order = list(range(len(ctx.dataset)))
        rng.shuffle(order)
        pool_full = [ctx.dataset[i] for i in order[:size]]
    else:
        pool_full = generate_problems(
            size,
            seed=derive_seed(ctx.seed, "probe", ctx.generation),
            split="train",
            domains=list(ctx.domains),
            difficulties=list(ctx.ladder),
        )
    pool = _strip(pool_full, ctx.labels_visible)
    chains = ctx.probe(pool)
    per_row = [cell_stats([p], [row], ctx.labels_visible) for p, row in zip(pool, chains)]
    scores = [score_of(s) for s in per_row]
    pooled = cell_stats(pool, chains, ctx.labels_visible)
    learn = [i for i, s in enumerate(scores) if ctx.low < s < ctx.high]
    if state["cooldown"]["all"] > 0:  # backing off: the most agreed-on learnable rows first
        learn.sort(key=lambda i: -scores[i])
    mastered = [i for i, s in enumerate(scores) if s >= ctx.high]
    state["cooldown"]["all"] = max(0, state["cooldown"]["all"] - 1)
    probe = {
        "all:0": {
            **pooled.to_json(),
            "score": round(score_of(pooled), 4),
            "learnable": len(learn),
            "mastered": len(mastered),
            "too_hard": len(scores) - len(learn) - len(mastered),
        }
    }
    plan = Plan(problems=[], cells=[("all", 0)], state=state, probe=probe)
    if not learn:
        plan.cells = []
        plan.skipped = (
            f"no learnable problem: all {len(pool)} probed rows scored <= low ({ctx.low}) or >= high ({ctx.high})"
        )
        return plan
    n_replay = min(len(mastered), round(ctx.replay * ctx.n_problems))
    rows = learn[: ctx.n_problems - n_replay] + mastered[:n_replay]
    plan.problems = [pool[i] for i in rows]
    plan.truth = [pool_full[i].answer for i in rows]
    plan.replay = n_replay
    return plan


# --------------------------------------------------------------------------- after self-play


def after_self_play(
    plan: Plan, chains: Sequence[Sequence[Candidate]], backoff: Any, ladder: Sequence[int]
) -> dict[str, Any]:
    """The label-free signals of each practised cell; back-off where one collapsed. Returns the record's entry.

    `chains`: per problem of the plan, the self-play chains that label it. `backoff` is the
    config's :class:`~trainer.evolve.config.BackoffConfig`. Updates `plan.state`.
    """
    ladder = list(ladder)
    signals: dict[str, dict[str, Any]] = {}
    by_cell: dict[Cell, list[int]] = {}
    for i, p in enumerate(plan.problems):
        cell = (p.domain, p.difficulty) if plan.cells != [("all", 0)] else ("all", 0)
        if cell in plan.cells:
            by_cell.setdefault(cell, []).append(i)
    for cell, rows in sorted(by_cell.items()):
        stats = cell_stats([plan.problems[i] for i in rows], [chains[i] for i in rows], labels_visible=False)
        key = cell_key(cell)
        before = plan.state["last"].get(key)
        reason = (
            backoff_signal(before, stats, backoff.agreement_drop, backoff.margin_drop, backoff.length_drift)
            if before
            else None
        )
        signals[key] = {**stats.to_json(), **({"backoff": reason} if reason else {})}
        plan.state["last"][key] = stats.to_json()
        if reason is None:
            continue
        domain, level = cell
        plan.state["cooldown"][domain] = backoff.cooldown
        if domain in plan.state.get("levels", {}) and level in ladder and ladder.index(level) > 0:
            plan.state["levels"][domain] = ladder[ladder.index(level) - 1]
            plan.events.append(f"{domain}: back off from level {level} ({reason})")
        else:
            plan.events.append(f"{key}: back off ({reason})")
    return {
        "cells": [cell_key(c) for c in plan.cells],
        "replay": plan.replay,
        "probe": plan.probe,
        "signals": signals,
        "events": plan.events,
        "state": plan.state,
        **({"skipped": plan.skipped} if plan.skipped else {}),
    }


def start_level(configured: int | None, population: Any, ladder: Sequence[int]) -> int:
    """`curriculum.start_level`, else the level above the base's `trained_difficulties` (its
    ``substrate.json``), else the ladder's lowest."""
    if configured is not None:
        return configured
    info = population.base_model_path / "substrate.json"
    trained = json.loads(info.read_text()).get("trained_difficulties") if info.is_file() else None
    above = max(trained) + 1 if trained else None
    return above if above in ladder else ladder[0]


def curriculum_state(history: Sequence[Mapping[str, Any]], run_id: str, g: int) -> dict[str, Any]:
    """The proposer's state after the last generation of run `run_id` before `g` (empty at its start)."""
    for record in reversed(history):
        if record.get("run_id") == run_id and record.get("generation", g) < g and "curriculum" in record:
            return record["curriculum"]["state"]
    return {}
