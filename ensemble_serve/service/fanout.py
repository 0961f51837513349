"""One plan's fan-out: every member x sample in flight at once (vLLM batches them), with optional early stop.

A member whose generation fails is recorded on its chains and the others go on; with early stop,
the chains still running are aborted once no outcome of theirs can change the vote. Extraction of
a finished chain's answer and the settledness check run off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ensemble_serve.protocol import EnsembleOptions
from ensemble_serve.service.aio import cancel_all
from ensemble_serve.shared.voting import (
    Candidate,
    ExactGrouper,
    decided,
    get_vote_rule,
    outcome_groups,
    remaining_weight,
)
from ensemble_serve.shared.voting.answers import is_free_form

log = logging.getLogger("ensemble_serve")

Key = tuple[str, int]  # (member, sample)


@dataclass
class Chain:
    """One member sample as it comes back from the engine."""

    member: str
    sample: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cumulative_logprob: float | None = None
    error: str | None = None
    exception: Exception | None = None  # what made the chain fail (client errors are re-raised as such)
    stopped: bool = False  # aborted by early stop

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_logprob(self) -> float | None:
        if self.cumulative_logprob is None or not self.token_ids:
            return None
        return self.cumulative_logprob / len(self.token_ids)


class FanOut:
    """The chains of one plan. `candidate(chain)` extracts an answer; `grouper()` groups answers (text mode)."""

    def __init__(self, engine: Any, metrics: Any, candidate: Any, grouper: Any):
        self.engine, self.metrics, self.candidate, self.grouper = engine, metrics, candidate, grouper

    async def run(
        self, prompt_ids: list[int], params: Any, members: list[str], opts: EnsembleOptions, weights: dict[str, float]
    ) -> tuple[list[Chain], dict[Key, Candidate]]:
        """The chains, and (with early stop) the candidates already extracted from the finished ones.

        `weights` are the member weights a `weighted` vote uses (early stop counts with them).
        """
        s = opts.samples_per_member
        chains = {(m, i): Chain(m, i) for m in members for i in range(s)}
        settled: dict[Key, Candidate] = {}  # the candidate of every chain that finished or failed, extracted once
        stop = asyncio.Event()
        early = opts.early_stop and not get_vote_rule(opts.vote).needs_jury  # a jury can overturn any count

        async def finished(key: Key) -> None:
            settled[key] = await asyncio.to_thread(self.candidate, chains[key])
            done = [settled[k] for k in sorted(settled)]
            pending = [k[0] for k in chains if k not in settled]
            if await asyncio.to_thread(self.settled, done, pending, opts, weights):
                stop.set()

        async def run_member(member: str) -> None:
            mine = {i: chains[(member, i)] for i in range(s)}
            on_finish = (lambda i: finished((member, i))) if early else None
            for i in await self.generate(prompt_ids, params, member, mine, on_finish):
                settled.setdefault((member, i), self.candidate(chains[(member, i)]))

        await _until_done_or(stop, [asyncio.create_task(run_member(m)) for m in members])
        for c in chains.values():
            if c.finish_reason is None and c.error is None:
                c.stopped = True
                settled.pop((c.member, c.sample), None)
        return [chains[(m, i)] for m in members for i in range(s)], settled

    async def generate(
        self,
        prompt_ids: list[int],
        params: Any,
        member: str,
        chains: dict[int, Chain],
        on_finish: Callable[[int], Awaitable[None]] | None = None,
    ) -> list[int]:
        """One engine request of `member` filling `chains` (by output index); the indices that failed.

        A member whose generation fails has the error recorded on its unfinished chains (the
        request goes on with the others); `on_finish(index)` is awaited as each chain finishes.
        """
        seen: set[int] = set()
        try:
            async for out in self.engine.generate(prompt_ids, params, member, self.engine.next_id(f"ens-{member}")):
                for o in out.outputs:
                    c = chains[o.index]
                    c.text, c.token_ids = o.text, list(o.token_ids)
                    c.cumulative_logprob = o.cumulative_logprob
                    if o.finish_reason is not None and o.index not in seen:
                        c.finish_reason = o.finish_reason
                        seen.add(o.index)
                        if on_finish is not None:
                            await on_finish(o.index)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one member failing must not fail the request
            log.warning("member %s failed: %s", member, e)
            self.metrics.member_failures.labels(member=member).inc()
            failed = [i for i in chains if i not in seen]
            for i in failed:
                chains[i].error = f"{type(e).__name__}: {e}"
                chains[i].exception = e
            return failed
        return []

    def settled(
        self, finished: list[Candidate], pending: list[str], opts: EnsembleOptions, weights: dict[str, float]
    ) -> bool:
        """Whether the chains still running (one entry per chain: its member) can no longer change the winner."""
        rule = get_vote_rule(opts.vote)
        groups, reps = self.outcome_groups(finished, opts.answer)
        tally: dict[str, float] = {}
        for g, rep in zip(groups, reps):
            tally[rep] = sum(weights.get(finished[i].member, 1.0) if rule.weighs_members else 1.0 for i in g)
        return decided(tally, remaining_weight(pending, opts.vote, weights))

    def outcome_groups(self, candidates: list[Candidate], answer: Any) -> tuple[list[list[int]], list[str]]:
        """The candidates' answer groups as the vote will form them: by meaning for free-form answers, else exactly."""
        return outcome_groups(candidates, self.grouper() if is_free_form(answer) else ExactGrouper())


async def _until_done_or(stop: asyncio.Event, tasks: list[asyncio.Task]) -> None:
    """Wait for every task, or for `stop`; then cancel what still runs (aborting it inside the engine)."""
    waiter = asyncio.create_task(stop.wait())
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending | {waiter}, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(waiter)
            if waiter in done:
                break
    finally:
        waiter.cancel()
        await cancel_all(tasks)
