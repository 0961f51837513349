"""The vote on one plan's chains: extract each chain's answer, group the answers, have jurors score them
(`cross`), and apply the vote rule. All of it runs off the event loop but the jurors' engine calls."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ensemble_serve.protocol import EnsembleOptions, PopulationVersion
from ensemble_serve.service.fanout import Chain
from ensemble_serve.shared.embeddings import default_embedder
from ensemble_serve.shared.voting import (
    Candidate,
    ExactGrouper,
    SemanticGrouper,
    VoteContext,
    VoteResult,
    candidate_from_text,
    get_vote_rule,
    outcome_groups,
    winner_key,
)
from ensemble_serve.shared.voting.answers import is_free_form

log = logging.getLogger("ensemble_serve")


@dataclass(kw_only=True)
class EnsembleOutcome:
    """One prompt's chains and their vote (built by keyword: most fields are lists or dicts of one kind)."""

    members: list[str]
    chains: list[Chain]
    candidates: list[Candidate]
    result: VoteResult
    scores: list[float | None] | None
    routing: dict[str, Any] | None = None
    unavailable: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    adaptive: dict[str, Any] | None = None  # the waves' report (ensemble.adaptive), None for a full fan-out
    population: PopulationVersion | None = None  # the population the plan was made from

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.chains)

    @property
    def early_stopped(self) -> bool:
        return any(c.stopped for c in self.chains)

    @property
    def tokens_saved(self) -> int | None:
        """Estimated tokens the stopped chains did not generate: the finished chains' mean length minus what each stopped chain had."""
        stopped = [c for c in self.chains if c.stopped]
        if not stopped:
            return None
        finished = [c.tokens for c in self.chains if not c.stopped and c.error is None]
        if not finished:
            return 0
        mean = sum(finished) / len(finished)
        return int(round(sum(max(0.0, mean - c.tokens) for c in stopped)))


class Voting:
    """Answer extraction, grouping and vote rules over chains, with the engine as the cross vote's jury."""

    def __init__(self, engine: Any, metrics: Any, semantic_threshold: float):
        self.engine, self.metrics, self.semantic_threshold = engine, metrics, semantic_threshold
        self._embedder: Any = None

    def grouper(self, opts: EnsembleOptions) -> Any:
        if not is_free_form(opts.answer):
            return ExactGrouper()
        if self._embedder is None:
            self._embedder = default_embedder()
        return SemanticGrouper(self._embedder, threshold=self.semantic_threshold)

    @staticmethod
    def candidate(c: Chain, opts: EnsembleOptions) -> Candidate:
        if c.error is not None or c.stopped:
            return Candidate(c.member, c.sample, c.text, None, "failed", c.tokens)
        finished = c.finish_reason != "length"
        return candidate_from_text(c.member, c.sample, c.text, c.tokens, opts.answer, c.mean_logprob, finished)

    async def vote(
        self,
        prompt_ids: list[int],
        chains: list[Chain],
        candidates: list[Candidate],
        opts: EnsembleOptions,
        weights: dict[str, float],
    ) -> tuple[VoteResult, list[float | None] | None]:
        """The vote result, and each candidate's group weight (None for candidates that did not vote)."""
        grouper = self.grouper(opts)
        rule = get_vote_rule(opts.vote)
        cross_scores = await self._jury(prompt_ids, chains, candidates, grouper) if rule.needs_jury else None
        ctx = VoteContext(member_weights=weights, grouper=grouper, cross_scores=cross_scores)
        result = await asyncio.to_thread(rule, candidates, ctx)
        if not result.votes:
            return result, None
        weight_of = {}
        for g, rep in zip(result.groups, result.votes):
            for i in g:
                weight_of[i] = result.votes[rep]
        return result, [weight_of.get(i) for i in range(len(candidates))]

    async def _jury(
        self, prompt_ids: list[int], chains: list[Chain], candidates: list[Candidate], grouper: Any
    ) -> dict[str, list[float]]:
        """Every answering member scores one chain per distinct answer (one adapter at a time: see ScoringGate)."""
        groups, _ = await asyncio.to_thread(outcome_groups, candidates, grouper)
        if len(groups) <= 1:
            return {m: [0.0] * len(groups) for m in {c.member for c in candidates}}
        key: Callable[[int], tuple] = winner_key(candidates)
        continuations = [chains[min(g, key=key)].token_ids for g in groups]
        scores: dict[str, list[float]] = {}
        for juror in sorted({c.member for c in chains if c.error is None}):
            try:
                scores[juror] = await self.engine.score(prompt_ids, continuations, juror)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a juror that cannot score sits this vote out
                log.warning("juror %s could not score: %s", juror, e)
                self.metrics.member_failures.labels(member=juror).inc()
                scores[juror] = [float("nan")] * len(groups)
        return scores
