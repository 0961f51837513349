"""One member, or the base model, answering like a plain vLLM model: sampling, `n`, stop, logprobs, streaming.

It needs the engine and the metrics, nothing of the population: the service has already told, from the
request's snapshot, which member (or the base, None) the request names.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from ensemble_serve.engine.base import Engine
from ensemble_serve.errors import InternalServerError
from ensemble_serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ResponseMessage,
    UsageInfo,
    random_id,
)
from ensemble_serve.service.aio import cancel_all
from ensemble_serve.service.logprobs import chat_logprobs, completion_logprobs
from ensemble_serve.service.metrics import Metrics
from ensemble_serve.service.sse import SSE_DONE, sse

Delta = tuple[int, str, list[int], Any, str | None]  # (choice index, new text, new token ids, new logprobs, finish)


class SingleModel:
    """Requests for one model: a member (its adapter) or the base (member None)."""

    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics

    def token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    # ------------------------------------------------------------------ whole responses

    async def chat(
        self, req: ChatCompletionRequest, prompt_ids: list[int], params: Any, member: str | None
    ) -> ChatCompletionResponse:
        started = time.perf_counter()
        outs = await self.run(prompt_ids, params, member)
        choices = [
            ChatCompletionChoice(
                index=o.index,
                message=ResponseMessage(content=o.text),
                logprobs=chat_logprobs(self.token_text, list(o.token_ids), o.logprobs) if req.logprobs else None,
                finish_reason=o.finish_reason,
            )
            for o in outs
        ]
        usage = UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=sum(len(o.token_ids) for o in outs))
        self._observe(member, started, usage)
        return ChatCompletionResponse(model=req.model, choices=choices, usage=usage)

    async def completion(
        self, req: CompletionRequest, prompts: list[list[int]], params: list[Any], member: str | None
    ) -> CompletionResponse:
        started = time.perf_counter()
        results = await asyncio.gather(*(self.run(ids, p, member) for ids, p in zip(prompts, params)))
        choices = []
        completion_tokens = 0
        for i, outs in enumerate(results):
            for o in outs:
                completion_tokens += len(o.token_ids)
                lps = None
                if req.logprobs is not None:
                    lps = completion_logprobs(self.token_text, list(o.token_ids), o.logprobs)
                choices.append(
                    CompletionChoice(
                        index=i * req.n + o.index, text=o.text, logprobs=lps, finish_reason=o.finish_reason
                    )
                )
        usage = UsageInfo(prompt_tokens=sum(map(len, prompts)), completion_tokens=completion_tokens)
        self._observe(member, started, usage)
        return CompletionResponse(model=req.model, choices=choices, usage=usage)

    async def run(self, prompt_ids: list[int], params: Any, member: str | None) -> list[Any]:
        """The finished completions of one engine request, by index."""
        # With n > 1 an engine output may carry only the completions that changed in
        # that step, so keep the latest state of each completion index.
        latest: dict[int, Any] = {}
        async for out in self.engine.generate(prompt_ids, params, member, self.engine.next_id("req")):
            for o in out.outputs:
                latest[o.index] = o
        n = getattr(params, "n", 1)
        if len(latest) != n:
            raise InternalServerError(f"the engine returned {len(latest)} of {n} completions")
        return [latest[i] for i in sorted(latest)]

    # ------------------------------------------------------------------ streams

    async def deltas(self, prompt_ids: list[int], params: Any, member: str | None) -> AsyncIterator[Delta]:
        """What each engine output adds, per choice, as vLLM produces it."""
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        async for out in self.engine.generate(prompt_ids, params, member, self.engine.next_id("req")):
            for o in out.outputs:
                t0, k0 = sent_text.get(o.index, 0), sent_tokens.get(o.index, 0)
                new_text, new_ids = o.text[t0:], list(o.token_ids[k0:])
                new_lps = o.logprobs[k0:] if o.logprobs is not None else None
                sent_text[o.index], sent_tokens[o.index] = len(o.text), len(o.token_ids)
                if new_text or new_ids or o.finish_reason is not None:
                    yield o.index, new_text, new_ids, new_lps, o.finish_reason

    async def stream_chat(
        self, req: ChatCompletionRequest, prompt_ids: list[int], params: Any, member: str | None
    ) -> AsyncIterator[str]:
        rid, created = random_id("chatcmpl"), int(time.time())
        started = time.perf_counter()

        def chunk(choices: list[ChatCompletionChunkChoice], usage: UsageInfo | None = None) -> str:
            return sse(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=choices, usage=usage))

        for i in range(req.n):
            yield chunk([ChatCompletionChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        generated = 0
        async for index, text, ids, lps, finish in self.deltas(prompt_ids, params, member):
            generated += len(ids)
            logprobs = chat_logprobs(self.token_text, ids, lps) if req.logprobs and ids else None
            delta = DeltaMessage(content=text)
            yield chunk([ChatCompletionChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)])
        usage = UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=generated)
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], usage)
        self._observe(member, started, usage)
        yield SSE_DONE

    async def stream_completion(
        self, req: CompletionRequest, prompts: list[list[int]], params: list[Any], member: str | None
    ) -> AsyncIterator[str]:
        """Every prompt's choices stream at once, interleaved as the engine produces them."""
        rid, created = random_id("cmpl"), int(time.time())
        started = time.perf_counter()
        generated = 0
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, ids: list[int], p: Any) -> None:
            try:
                async for item in self.deltas(ids, p, member):
                    await queue.put((i, item))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, ids, p)) for i, (ids, p) in enumerate(zip(prompts, params))]
        try:
            open_ = len(tasks)
            while open_:
                i, item = await queue.get()
                if item is None:
                    open_ -= 1
                    continue
                index, text, ids, lps, finish = item
                generated += len(ids)
                logprobs = completion_logprobs(self.token_text, ids, lps) if req.logprobs is not None and ids else None
                choice = CompletionChoice(index=i * req.n + index, text=text, logprobs=logprobs, finish_reason=finish)
                yield sse(CompletionChunk(id=rid, created=created, model=req.model, choices=[choice]))
            for t in tasks:
                t.result()  # surface an engine error
        finally:
            await cancel_all(tasks)
        usage = UsageInfo(prompt_tokens=sum(map(len, prompts)), completion_tokens=generated)
        if req.stream_options and req.stream_options.include_usage:
            yield sse(CompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage))
        self._observe(member, started, usage)
        yield SSE_DONE

    def _observe(self, member: str | None, started: float, usage: UsageInfo) -> None:
        kind = "base" if member is None else "member"
        self.metrics.observe_request(kind, time.perf_counter() - started, usage.prompt_tokens, usage.completion_tokens)
