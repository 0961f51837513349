"""Adaptive fan-out: one plan's chains sampled in waves, most trusted members first, until the vote is settled.

    order (trust) -> wave 1 (one multi-LoRA batch) -> count answers -> stop? -> wave 2 -> ...

The stopping rule is `ensemble_serve.shared.voting.adaptive.stop_reason`. Each wave sends one
engine request per member it holds (with `n` = that member's chains in the wave), all at once, so
vLLM batches the wave; a member's later waves reuse its prefix cache for the prompt. A member that
fails is left out of the later waves. Cancelling the task (a client gone, a deadline, the drain)
aborts the wave in flight inside the engine.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ensemble_serve.protocol import AdaptiveOptions
from ensemble_serve.service.aio import cancel_all
from ensemble_serve.service.fanout import Chain, FanOut, Key
from ensemble_serve.shared.voting import Candidate
from ensemble_serve.shared.voting.adaptive import stop_reason, wave_order, waves


@dataclass
class WaveReport:
    """What `ensemble.adaptive` reports: the waves, the chains spent, why sampling stopped."""

    waves: int
    chains: int
    full_chains: int
    stopped: str
    leader_probability: float
    confidence: float
    wave_size: int
    tokens_saved: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Waves:
    """Runs one plan's fan-out in waves on a :class:`FanOut` (its engine, metrics, extraction and grouping)."""

    def __init__(self, fan_out: FanOut):
        self.fan_out = fan_out

    async def run(
        self,
        prompt_ids: list[int],
        params: Any,
        members: list[str],
        samples: int,
        adaptive: AdaptiveOptions,
        trust: dict[str, float],
        answer: Any,
    ) -> tuple[list[Chain], dict[Key, Candidate], WaveReport]:
        """The chains sampled (in trust order), their candidates, and the report."""
        order = wave_order(members, samples, trust)
        size = min(waves(len(order), adaptive.wave_size), len(order))
        chains: dict[Key, Chain] = {}
        settled: dict[Key, Candidate] = {}
        failed: set[str] = set()
        queue = list(order)
        count = 0
        reason, p = "exhausted", 0.5
        while queue:
            wave, queue = queue[:size], queue[size:]
            await self._wave(prompt_ids, params, wave, count, chains, failed)
            count += 1
            found = await asyncio.to_thread(lambda w=wave: [self.fan_out.candidate(chains[k]) for k in w])
            settled.update(zip(wave, found))
            queue = [k for k in queue if k[0] not in failed]
            decision, p = await asyncio.to_thread(self._decide, list(settled.values()), len(queue), adaptive, answer)
            if decision is not None:
                reason = decision
                break
        sampled = [k for k in order if k in chains]
        spent = [chains[k] for k in sampled]
        done = [c.tokens for c in spent if c.error is None]
        mean = sum(done) / len(done) if done else 0.0
        report = WaveReport(
            waves=count,
            chains=len(sampled),
            full_chains=len(order),
            stopped=reason,
            leader_probability=round(p, 6),
            confidence=adaptive.confidence,
            wave_size=size,
            tokens_saved=round(mean * (len(order) - len(sampled))),
        )
        return spent, settled, report

    async def _wave(
        self,
        prompt_ids: list[int],
        params: Any,
        wave: list[Key],
        index: int,
        chains: dict[Key, Chain],
        failed: set[str],
    ) -> None:
        """One wave: an engine request per member with its chains of the wave, all in flight together."""
        by_member: dict[str, list[int]] = {}
        for member, sample in wave:
            by_member.setdefault(member, []).append(sample)

        async def ask(member: str, samples: list[int]) -> None:
            mine = {j: Chain(member, sample) for j, sample in enumerate(samples)}
            chains.update({(member, c.sample): c for c in mine.values()})
            if await self.fan_out.generate(prompt_ids, _wave_params(params, len(samples), index), member, mine):
                failed.add(member)

        tasks = [asyncio.create_task(ask(m, s)) for m, s in by_member.items()]
        try:
            await asyncio.gather(*tasks)
        finally:
            await cancel_all(tasks)

    def _decide(
        self, candidates: list[Candidate], remaining: int, adaptive: AdaptiveOptions, answer: Any
    ) -> tuple[str | None, float]:
        groups, _ = self.fan_out.outcome_groups(candidates, answer)
        return stop_reason([len(g) for g in groups], remaining, adaptive.confidence)


def _wave_params(params: Any, n: int, wave: int) -> Any:
    """The request's sampling parameters for `n` chains of one member in wave `wave`.

    A seeded request gets seed + wave in later waves: the same seed again would repeat the
    member's first-wave samples (its chains within a wave differ by their index, as with `n`).
    """
    p = params.clone()
    p.n = n
    if p.seed is not None and wave:
        p.seed = p.seed + wave
    return p
