"""An ensemble request's answer in OpenAI's shape: the winning chain as the content, the vote as `ensemble`.

One prompt: the vote is the response's top-level `ensemble`. Several prompts (text completions): one
choice per prompt, each carrying its own vote. Streamed: the role first, then each prompt's winning
chain in pieces as soon as its vote is in, its `ensemble` object in the chunk that ends its choice,
then the usage and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ensemble_serve.errors import ServiceUnavailableError
from ensemble_serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    DeltaMessage,
    EnsembleChain,
    EnsembleInfo,
    EnsembleOptions,
    FailedChain,
    ResponseMessage,
    UsageInfo,
    random_id,
)
from ensemble_serve.service.aio import cancel_all
from ensemble_serve.service.fanout import Chain
from ensemble_serve.service.plan import EnsemblePlan
from ensemble_serve.service.sse import SSE_DONE, sse
from ensemble_serve.service.vote import EnsembleOutcome

STREAM_PIECE_CHARS = 16  # the ensemble's answer is streamed in pieces of this many characters


def ensemble_info(outcome: EnsembleOutcome, opts: EnsembleOptions) -> EnsembleInfo:
    """The `ensemble` object: the vote, who was asked, what failed, and (when asked) every chain."""
    r = outcome.result
    chains_out = None
    if opts.return_chains:
        chains_out = [
            EnsembleChain(
                member=c.member,
                sample=c.sample,
                answer=cand.answer,
                status=cand.status,
                text=c.text,
                score=(outcome.scores[i] if outcome.scores else None),
                tokens=c.tokens,
            )
            for i, (c, cand) in enumerate(zip(outcome.chains, outcome.candidates))
        ]
    failed = [
        FailedChain(member=c.member, sample=c.sample, reason=c.error or "stopped early")
        for c in outcome.chains
        if c.error is not None or c.stopped
    ]
    return EnsembleInfo(
        answer=r.answer,
        agreement=r.agreement,
        votes=dict(r.votes),
        members=outcome.members,
        rule=r.rule,
        chains=chains_out,
        failed=failed,
        unavailable=outcome.unavailable,
        tokens_saved=outcome.tokens_saved,
        early_stopped=outcome.early_stopped,
        routing=outcome.routing,
        calibration=outcome.calibration,
        adaptive=outcome.adaptive,
        population=outcome.population,
    )


def winner_chain(outcome: EnsembleOutcome) -> Chain:
    """The chain that carries the consensus; with no answer at all, the first chain that answered."""
    if outcome.result.winner is not None:
        return outcome.chains[outcome.result.winner]
    answered = [c for c in outcome.chains if c.error is None and not c.stopped]
    if not answered:
        reasons = "; ".join(sorted({c.error or "stopped" for c in outcome.chains}))
        raise ServiceUnavailableError(f"every member failed to answer: {reasons}")
    return answered[0]


def usage_of(plans: list[EnsemblePlan], completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=sum(len(p.prompt_ids) for p in plans), completion_tokens=completion_tokens)


def ensemble_response(
    req: Any, plans: list[EnsemblePlan], outcomes: list[EnsembleOutcome], chat: bool, opts: EnsembleOptions
) -> ChatCompletionResponse | CompletionResponse:
    """One choice per prompt; the vote goes top-level for one prompt, into each choice for several."""
    usage = usage_of(plans, sum(o.completion_tokens for o in outcomes))
    bests = [winner_chain(o) for o in outcomes]
    infos = [ensemble_info(o, opts) for o in outcomes]
    if chat:
        best = bests[0]
        message = ResponseMessage(content=best.text)
        choice = ChatCompletionChoice(index=0, message=message, finish_reason=best.finish_reason or "stop")
        return ChatCompletionResponse(model=req.model, choices=[choice], usage=usage, ensemble=infos[0])
    several = len(outcomes) > 1
    choices = [
        CompletionChoice(
            index=i, text=b.text, finish_reason=b.finish_reason or "stop", ensemble=info if several else None
        )
        for i, (b, info) in enumerate(zip(bests, infos))
    ]
    return CompletionResponse(model=req.model, choices=choices, usage=usage, ensemble=None if several else infos[0])


async def stream_ensemble(
    req: Any,
    plans: list[EnsemblePlan],
    opts: EnsembleOptions,
    chat: bool,
    run: Callable[[EnsemblePlan], Awaitable[EnsembleOutcome]],
    observe: Callable[[float, int, int], None],
) -> AsyncIterator[str]:
    """The stream of an ensemble request: `run(plan)` fans out and votes; `observe(seconds, prompt, completion)`."""
    rid, created = random_id("chatcmpl" if chat else "cmpl"), int(time.time())
    started = time.perf_counter()
    chunk = _chunker(req, rid, created, chat)
    if chat:
        yield chunk(0, "", role=True)

    async def indexed(i: int, plan: EnsemblePlan) -> tuple[int, EnsembleOutcome]:
        return i, await run(plan)

    tasks = [asyncio.create_task(indexed(i, plan)) for i, plan in enumerate(plans)]
    completion_tokens = 0
    try:
        for next_done in asyncio.as_completed(tasks):  # each prompt's choice as soon as its vote is in
            i, outcome = await next_done
            completion_tokens += outcome.completion_tokens
            best = winner_chain(outcome)
            for k in range(0, len(best.text), STREAM_PIECE_CHARS):
                yield chunk(i, best.text[k : k + STREAM_PIECE_CHARS])
            info = ensemble_info(outcome, opts)
            yield chunk(i, "" if not chat else None, finish=best.finish_reason or "stop", ensemble=info)
    finally:
        await cancel_all(tasks)
    usage = usage_of(plans, completion_tokens)
    if req.stream_options and req.stream_options.include_usage:
        kind = ChatCompletionChunk if chat else CompletionChunk
        yield sse(kind(id=rid, created=created, model=req.model, choices=[], usage=usage))
    observe(time.perf_counter() - started, usage.prompt_tokens, usage.completion_tokens)
    yield SSE_DONE


def _chunker(req: Any, rid: str, created: int, chat: bool) -> Callable[..., str]:
    """One SSE chunk of choice `index` (chat: a delta; text: a piece of text)."""

    def chunk(index: int, text: str | None, finish: str | None = None, role: bool = False, **extra: Any) -> str:
        if chat:
            delta = DeltaMessage(role="assistant" if role else None, content=text)
            choice = ChatCompletionChunkChoice(index=index, delta=delta, finish_reason=finish)
            return sse(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[choice], **extra))
        choice = CompletionChoice(index=index, text=text or "", finish_reason=finish)
        return sse(CompletionChunk(id=rid, created=created, model=req.model, choices=[choice], **extra))

    return chunk
