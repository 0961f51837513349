"""An ensemble request from start to answer: check, plan each prompt, fan out, vote, respond.

    request -> plan (members, routing, mixture) -> fan-out (engine) -> vote (extraction, grouping, rule) -> response

Several prompts of one text completion request are planned and voted on separately, concurrently.
A request reads the population only through the :class:`Served` snapshot it is given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from ensemble_serve.engine.base import Engine
from ensemble_serve.errors import BadRequestError
from ensemble_serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EnsembleOptions,
)
from ensemble_serve.service.aio import all_or_none
from ensemble_serve.service.fanout import Chain, FanOut
from ensemble_serve.service.metrics import Metrics
from ensemble_serve.service.mixtures import Mixtures
from ensemble_serve.service.plan import EnsemblePlan, Planner
from ensemble_serve.service.respond import ensemble_response, stream_ensemble
from ensemble_serve.service.served import Served
from ensemble_serve.service.vote import EnsembleOutcome, Voting
from ensemble_serve.service.waves import WaveReport, Waves
from ensemble_serve.shared.voting import get_vote_rule

Request = ChatCompletionRequest | CompletionRequest


class EnsembleRequests:
    """Answers requests for the ensemble model: the engine, the metrics and the mixed adapters, nothing else."""

    def __init__(self, engine: Engine, metrics: Metrics, mixtures: Mixtures, semantic_threshold: float):
        self.engine, self.metrics = engine, metrics
        self.planner = Planner(engine, metrics, mixtures)
        self.voting = Voting(engine, metrics, semantic_threshold)

    async def answer(
        self, served: Served, req: Request, prompts: list[list[int]], texts: list[str], chat: bool
    ) -> ChatCompletionResponse | CompletionResponse | AsyncIterator[str]:
        """Fan each prompt out to the chosen members and vote; several prompts are voted on separately."""
        opts = served.options(req.ensemble, greedy=req.asks_greedy)
        check(req, opts)
        plans = [await self.planner.plan(served, req, ids, text, opts) for ids, text in zip(prompts, texts)]
        for plan in plans:
            check_plan(plan, opts)
        if req.stream:
            return stream_ensemble(req, plans, opts, chat, lambda plan: self.run(plan, opts), self._observe)
        started = time.perf_counter()
        outcomes = await all_or_none([self.run(plan, opts) for plan in plans])
        completion_tokens = sum(o.completion_tokens for o in outcomes)
        self._observe(time.perf_counter() - started, sum(len(p.prompt_ids) for p in plans), completion_tokens)
        return ensemble_response(req, plans, outcomes, chat, opts)

    async def run(self, plan: EnsemblePlan, opts: EnsembleOptions) -> EnsembleOutcome:
        """One prompt: fan out, extract the answers (off the event loop), vote."""
        weights = plan.vote_weights
        fan_out = FanOut(
            self.engine,
            self.metrics,
            lambda c: self.voting.candidate(c, opts),
            lambda: self.voting.grouper(opts),
        )
        counted = weights if get_vote_rule(opts.vote).weighs_members else {}
        members, report = plan.members, None
        if opts.adaptive is not None:
            chains, settled, waves = await Waves(fan_out).run(
                plan.prompt_ids,
                plan.params,
                plan.members,
                opts.samples_per_member,
                opts.adaptive,
                plan.trust,
                opts.answer,
            )
            members = [m for m in plan.members if any(c.member == m for c in chains)]
            report = waves.as_dict()
            self._observe_waves(waves)
        else:
            chains, settled = await fan_out.run(plan.prompt_ids, plan.params, plan.members, opts, counted)
        candidates = await asyncio.to_thread(
            lambda: [settled.get((c.member, c.sample)) or self.voting.candidate(c, opts) for c in chains]
        )
        _raise_if_the_client_is_at_fault(chains)
        result, scores = await self.voting.vote(plan.prompt_ids, chains, candidates, opts, weights)
        if opts.mode != "mixture":  # per-member vote metrics are for members, not for mixed adapters
            self.metrics.observe_vote(result, candidates)
        return EnsembleOutcome(
            members=members,
            chains=chains,
            candidates=candidates,
            result=result,
            scores=scores,
            routing=plan.routing,
            unavailable=plan.unavailable,
            calibration=plan.calibration,
            adaptive=report,
            population=plan.population,
        )

    def _observe_waves(self, waves: WaveReport) -> None:
        m = self.metrics
        m.adaptive_waves.inc(waves.waves)
        m.adaptive_chains.labels(kind="spent").inc(waves.chains)
        m.adaptive_chains.labels(kind="saved").inc(waves.full_chains - waves.chains)
        m.adaptive_stops.labels(reason=waves.stopped).inc()

    def _observe(self, seconds: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.observe_request("ensemble", seconds, prompt_tokens, completion_tokens)


def check(req: Request, opts: EnsembleOptions) -> None:
    """What the ensemble refuses whatever the population: n > 1, logprobs, several greedy samples per member."""
    if req.n != 1:
        raise BadRequestError(
            "n must be 1 for the ensemble model (it returns one consensus answer); "
            "use ensemble.samples_per_member for more chains per member",
            param="n",
        )
    asked_logprobs = req.logprobs if isinstance(req, ChatCompletionRequest) else req.logprobs is not None
    if asked_logprobs:
        raise BadRequestError("logprobs are not available for the ensemble model; ask a member", param="logprobs")
    if opts.samples_per_member > 1 and req.asks_greedy:
        raise BadRequestError(
            "samples_per_member > 1 needs sampling (temperature > 0): greedy samples of one member are identical",
            param="ensemble.samples_per_member",
        )
    get_vote_rule(opts.vote)  # validated by the protocol too; keeps a registry miss loud


def check_plan(plan: EnsemblePlan, opts: EnsembleOptions) -> None:
    """What depends on the members chosen: an adaptive wave no larger than the full fan-out."""
    if opts.adaptive is not None and opts.adaptive.wave_size is not None:
        total = len(plan.members) * opts.samples_per_member
        if opts.adaptive.wave_size > total:
            raise BadRequestError(
                f"ensemble.adaptive.wave_size={opts.adaptive.wave_size} but the fan-out has {total} chains "
                f"({len(plan.members)} members x {opts.samples_per_member} samples)",
                param="ensemble.adaptive.wave_size",
            )


def _raise_if_the_client_is_at_fault(chains: list[Chain]) -> None:
    """When every chain failed because the engine refused the request itself (a 400), that is the answer."""
    errors = [c.exception for c in chains]
    if errors and all(isinstance(e, BadRequestError) for e in errors):
        raise errors[0]
