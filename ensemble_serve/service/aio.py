"""Small asyncio helpers of the service: cancel tasks (aborting their engine requests), run all or none."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any


async def cancel_all(tasks: Sequence[asyncio.Future]) -> None:
    """Cancel what still runs and wait for it; errors were already recorded by the tasks themselves."""
    for t in tasks:
        if not t.done():
            t.cancel()
    for t in tasks:
        try:
            await t
        except asyncio.CancelledError:
            pass
        except Exception:  # already recorded by the task itself
            pass


async def all_or_none(coros: Sequence[Any]) -> list[Any]:
    """Run coroutines concurrently; on the first failure cancel the others and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
        return [t.result() for t in tasks]
    finally:
        await cancel_all(tasks)
