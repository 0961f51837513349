"""Evolution on the routing channel only: the reliability table's weights evolve, the members stay frozen.

The calibrated vote weighs each member's chain by log(p / (1 - p)) of its table entry for the
prompt's domain (:func:`ensemble_serve.shared.population.reliability.log_odds_weight`). `calibrate`
estimates p per member and domain; this evolves the table instead, as a genetic algorithm over the
entries' logits, so that the vote itself (not each member alone) is right as often as it can be:
a member that agrees with a stronger one can lose weight, a weak but independent one gain it. The
members' greedy chains on the calibration problems are computed once (members frozen), so a
generation costs votes only, with the vote rule the server runs.

Fit and check: the problems are cut in two halves by a stable hash of the prompt. Fitness is the
vote's accuracy on the fit half, ties broken by the smaller mean distance (in logits) from the
labelled table, the starting point. The evolved table is kept only when its vote beats the labelled
table's on the check half, which the search never saw; the report gives both figures. The comparison
leans towards the labelled table: its estimates counted the check half's answers too.

With the router (``routing_gates``), its per-member offsets evolve too: one number per member added to
the router's logits (its output layer's bias), which moves who is in each prompt's top-k. Fitness is then
the routed calibrated vote, the server's default request with ``route`` and ``members: k``: the members
of the top-k gates, each weighted by its table entry. The router's logits on the problems are computed
once (the router and the base model frozen), so a generation still costs votes only.

Deterministic: everything random comes from one generator seeded with the config's seed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ensemble_serve.shared.population.reliability import P_MAX, P_MIN, log_odds_weight
from ensemble_serve.shared.voting import Candidate, VoteContext, vote
from trainer.scoring import answer_is_right
from trainer.tasks.sandbox import Problem


@dataclass(frozen=True)
class RoutingResult:
    """What the search found: the evolved p per domain and member, and the figures that decide."""

    p: dict[str, dict[str, float]]
    fit_accuracy: dict[str, float]
    """The vote's accuracy on the fit half: ``start`` (the labelled table) and ``evolved``."""
    check_accuracy: dict[str, float]
    """The same on the check half (never seen by the search)."""
    best_per_generation: list[float]
    """The best fitness of each generation (fit half), for the record and the plot."""
    offsets: list[float] | None = None
    """With a router: the evolved per-member offsets of its logits (members in `cands` order), else None."""

    @property
    def kept(self) -> bool:
        """Whether the evolved table beats the labelled one where the search did not look."""
        return self.check_accuracy["evolved"] > self.check_accuracy["start"]


def halves(problems: Sequence[Problem]) -> tuple[list[int], list[int]]:
    """(fit, check) indices: a salted hash of each prompt decides its half. Salted, because the sandbox's
    train/held-out split is itself a function of the prompt's plain sha256 (its first byte), so every
    held-out prompt would land in one half of an unsalted cut."""
    fit, check = [], []
    for i, p in enumerate(problems):
        digest = hashlib.sha256(b"routing-halves:" + p.prompt.encode()).digest()
        (fit if digest[0] % 2 == 0 else check).append(i)
    return fit, check


@dataclass(frozen=True, eq=False)
class GateChoice:
    """The router's part of the routing channel: its logits on the problems, its gating rule, and k.

    ``logits`` is ``[N, M]`` (problems x members in `cands` order), computed once; ``gates`` turns
    logits into gates by the router's rule (softmax rows, or floored sigmoids at its temperature).
    A prompt's voters are the members of its `k` largest gates, ties to the lower index, as the server
    takes them; a row with a gate that is not finite is voted by every member (the server votes unrouted).
    """

    logits: np.ndarray
    gates: Callable[[np.ndarray], np.ndarray]
    k: int

    def __post_init__(self) -> None:
        if self.logits.ndim != 2:
            raise ValueError(f"router logits must be [problems, members], got shape {list(self.logits.shape)}")
        if not 1 <= self.k < self.logits.shape[1]:
            raise ValueError(
                f"the routed vote asks k={self.k} of {self.logits.shape[1]} members: with every member (or none) "
                "asked, the router's gates choose nothing to evolve"
            )

    def chosen(self, names: Sequence[str], offsets: np.ndarray | None = None) -> list[list[str]]:
        """Per problem, the names of its voters under the router's logits moved by `offsets` ``[M]``."""
        logits = self.logits if offsets is None else self.logits + offsets[None, :]
        gates = np.asarray(self.gates(logits), dtype=np.float64)
        out = []
        for row in gates:
            if not np.isfinite(row).all():
                out.append(list(names))
                continue
            top = sorted(np.argsort(-row, kind="stable")[: self.k])
            out.append([names[j] for j in top])
        return out


def _logit(p: float) -> float:
    q = min(max(p, P_MIN), P_MAX)
    return math.log(q / (1.0 - q))


def vote_accuracy(
    problems: Sequence[Problem],
    cands: Mapping[str, Sequence[Candidate]],
    p: Mapping[str, Mapping[str, float]],
    idx: Sequence[int],
    chosen: Sequence[Sequence[str]] | None = None,
) -> float:
    """The calibrated vote's accuracy on the problems `idx`, each member weighted by `p` of the problem's domain.

    Every member votes, or with `chosen` (per problem, e.g. :meth:`GateChoice.chosen`) only those."""
    if not idx:
        return 0.0
    right = 0
    for i in idx:
        d = problems[i].domain
        voters = list(cands) if chosen is None else chosen[i]
        weights = {m: log_odds_weight(p[d][m]) for m in voters}
        result = vote([cands[m][i] for m in voters], "calibrated", VoteContext(member_weights=weights))
        right += answer_is_right(result.answer, problems[i])
    return right / len(idx)


def _tournament(
    pop: Sequence[np.ndarray], scores: Sequence[tuple[float, float]], rng: np.random.Generator
) -> np.ndarray:
    """The fittest of three distinct entrants."""
    entrants = rng.choice(len(pop), 3, replace=False)
    return pop[max(entrants, key=lambda k: scores[k])]


def evolve_routing(
    problems: Sequence[Problem],
    cands: Mapping[str, Sequence[Candidate]],
    start: Mapping[str, Mapping[str, float]],
    generations: int,
    size: int = 12,
    sigma: float = 0.5,
    seed: int = 0,
    progress: bool = False,
    router: GateChoice | None = None,
) -> RoutingResult:
    """Evolve the table's p (per domain and member) from `start` for `generations` generations of `size`,
    and with `router` its per-member offsets from 0 (fitness: the routed calibrated vote).

    Elitism (the best two stay), tournaments of three, uniform crossover, and a Gaussian step of `sigma`
    on a quarter of the genes (logits) of each child."""
    if generations < 1 or size < 4:
        raise ValueError("routing evolution needs at least 1 generation and a population of at least 4")
    members = list(cands)
    domains = sorted(start)
    if router is not None and router.logits.shape != (len(problems), len(members)):
        raise ValueError(
            f"router logits of shape {list(router.logits.shape)} for {len(problems)} problems and {len(members)} members"
        )
    fit, check = halves(problems)
    table0 = np.array([[_logit(start[d][m]) for m in members] for d in domains])
    n_table = table0.size
    # one genome: the table's logits, then (with a router) one offset per member, starting at 0
    g0 = np.concatenate([table0.ravel(), np.zeros(len(members) if router is not None else 0)])
    rng = np.random.default_rng(seed)

    def table(g: np.ndarray) -> dict[str, dict[str, float]]:
        x = g[:n_table].reshape(table0.shape)
        return {
            d: {m: round(1.0 / (1.0 + math.exp(-x[i, j])), 6) for j, m in enumerate(members)}
            for i, d in enumerate(domains)
        }

    def accuracy(g: np.ndarray, idx: Sequence[int]) -> float:
        chosen = router.chosen(members, g[n_table:]) if router is not None else None
        return vote_accuracy(problems, cands, table(g), idx, chosen)

    def fitness(g: np.ndarray) -> tuple[float, float]:
        return accuracy(g, fit), -float(np.abs(g - g0).mean())

    pop = [g0] + [g0 + rng.normal(0.0, sigma, g0.shape) for _ in range(size - 1)]
    scores = [fitness(g) for g in pop]
    best = []
    for _ in tqdm(range(generations), desc="routing evolution", disable=not progress, unit="gen", leave=False):
        order = sorted(range(size), key=lambda k: scores[k], reverse=True)
        best.append(round(scores[order[0]][0], 4))

        children = []
        while len(children) < size - 2:
            a, b = (_tournament(pop, scores, rng) for _ in range(2))
            child = np.where(rng.random(g0.shape) < 0.5, a, b)
            mask = rng.random(g0.shape) < 0.25
            children.append(child + mask * rng.normal(0.0, sigma, g0.shape))
        pop = [pop[order[0]], pop[order[1]]] + children
        scores = [scores[order[0]], scores[order[1]]] + [fitness(g) for g in children]
    winner = pop[max(range(size), key=lambda k: scores[k])]
    best.append(round(max(scores)[0], 4))
    return RoutingResult(
        p=table(winner),
        fit_accuracy={"start": round(accuracy(g0, fit), 4), "evolved": round(accuracy(winner, fit), 4)},
        check_accuracy={"start": round(accuracy(g0, check), 4), "evolved": round(accuracy(winner, check), 4)},
        best_per_generation=best,
        offsets=[round(float(v), 6) for v in winner[n_table:]] if router is not None else None,
    )
