"""The scoring gate: keeps prompt-logprob scoring alone in a (CPU) vLLM engine step."""

from __future__ import annotations

import asyncio


class ScoringGate:
    """Keeps prompt-logprob scoring alone in the engine.

    vLLM's CPU backend crashes its engine core when a request with `prompt_logprobs`
    under a LoRA adapter shares an engine step with any other request: its LoRA
    logits path indexes adapters per request while the prompt logits have a row per
    prompt token (`einsum(): subscript b has size 2 ...`, then `EngineDeadError`).
    With a single request in the step the index broadcasts and all is well. So every
    engine request goes through this gate: generation holds it shared; scoring holds
    it exclusively and sends its requests one at a time. While scoring waits for
    in-flight generation to drain, new generation waits too (writer preference), so
    scoring cannot starve.
    """

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    async def acquire_shared(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1

    async def release_shared(self) -> None:
        async with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    async def acquire_exclusive(self) -> None:
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writer = True

    async def release_exclusive(self) -> None:
        async with self._cond:
            self._writer = False
            self._cond.notify_all()

    @property
    def state(self) -> tuple[int, bool]:
        """(generation requests inside, scoring inside): for tests and metrics."""
        return self._readers, self._writer
