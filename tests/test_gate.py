"""ScoringGate: prompt-logprob scoring never shares the engine with other requests."""

from __future__ import annotations

import asyncio

from ensemble_serve.engine.gate import ScoringGate


def test_scoring_waits_for_generation_to_drain_and_blocks_new_generation():
    async def scenario() -> list[str]:
        gate, log = ScoringGate(), []

        async def generate(name: str, hold: float) -> None:
            await gate.acquire_shared()
            log.append(f"+{name}")
            await asyncio.sleep(hold)
            log.append(f"-{name}")
            await gate.release_shared()

        async def score(name: str) -> None:
            await gate.acquire_exclusive()
            readers, writer = gate.state
            log.append(f"+{name}:{readers}:{writer}")
            await asyncio.sleep(0.01)
            log.append(f"-{name}")
            await gate.release_exclusive()

        first = asyncio.create_task(generate("g1", 0.05))
        await asyncio.sleep(0.01)
        scorer = asyncio.create_task(score("s"))
        await asyncio.sleep(0.01)
        late = asyncio.create_task(generate("g2", 0.0))  # arrives while scoring waits: must wait too
        await asyncio.gather(first, scorer, late)
        return log

    log = asyncio.run(scenario())
    assert log == ["+g1", "-g1", "+s:0:True", "-s", "+g2", "-g2"]


def test_generation_runs_concurrently_and_two_scorers_never_overlap():
    async def scenario() -> tuple[int, int]:
        gate = ScoringGate()
        inside, most_readers, writers_inside, most_writers = 0, 0, 0, 0

        async def generate() -> None:
            nonlocal inside, most_readers
            await gate.acquire_shared()
            inside += 1
            most_readers = max(most_readers, inside)
            await asyncio.sleep(0.01)
            inside -= 1
            await gate.release_shared()

        async def score() -> None:
            nonlocal writers_inside, most_writers
            await gate.acquire_exclusive()
            writers_inside += 1
            most_writers = max(most_writers, writers_inside + inside)
            await asyncio.sleep(0.005)
            writers_inside -= 1
            await gate.release_exclusive()

        await asyncio.gather(
            *(generate() for _ in range(5)), *(score() for _ in range(3)), *(generate() for _ in range(5))
        )
        return most_readers, most_writers

    most_readers, most_writers = asyncio.run(scenario())
    assert most_readers >= 2  # generation is shared
    assert most_writers == 1  # a scorer is always alone in the engine
