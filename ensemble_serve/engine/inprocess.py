"""The in-process engine: vLLM's `AsyncLLM` over one population, for the server."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ensemble_serve.engine.gate import ScoringGate
from ensemble_serve.errors import ServiceUnavailableError
from ensemble_serve.shared.adapters import AdapterRegistry
from ensemble_serve.shared.engine_config import EngineConfig, engine_kwargs, no_vllm
from ensemble_serve.shared.population import Population

if TYPE_CHECKING:  # pragma: no cover
    from vllm import SamplingParams


class AsyncEngine:
    """vLLM's `AsyncLLM` over one population, for the server.

    Requests are token-id prompts with a member name (or None for the base model).
    Cancelling the iteration of `generate` aborts the request inside vLLM.
    Scoring with prompt logprobs runs through `ScoringGate`, one adapter at a time.
    """

    def __init__(self, population: Population, cfg: EngineConfig | None = None):
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ModuleNotFoundError as e:
            raise no_vllm(e) from None

        self.cfg = cfg or EngineConfig()
        self.population = population
        self._snapshot_dir = Path(tempfile.mkdtemp(prefix="ensemble-serve-adapters-"))
        self.registry = AdapterRegistry(snapshot_root=self._snapshot_dir)
        self.registry.sync(population)
        self._extras: OrderedDict[str, None] = OrderedDict()  # registered non-members, least recently used first
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(population, self.cfg)))
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len: int = self.llm.model_config.max_model_len
        self.gate = ScoringGate()
        self._ids = itertools.count()

    def next_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def set_population(self, population: Population) -> None:
        """Serve `population` from now on; requests in flight keep the adapters they started with."""
        if population.manifest.base_model.sha256 != self.population.manifest.base_model.sha256 or (
            population.base_model_path != self.population.base_model_path
        ):
            raise ValueError(
                f"{population.root}: the base model changed; a new base model needs a restart of the server"
            )
        too_big = [
            m.name for m in population.manifest.members if m.rank > self.llm.vllm_config.lora_config.max_lora_rank
        ]
        if too_big:
            raise ValueError(
                f"{population.root}: members {too_big} exceed the engine's max_lora_rank; restart with a larger one"
            )
        self.registry.sync(population)
        self.population = population

    async def generate(self, prompt_ids: list[int], params: SamplingParams, member: str | None, request_id: str):
        """Stream `RequestOutput`s (cumulative) for one request."""
        from vllm.v1.engine.exceptions import EngineDeadError

        lora = None if member is None else self.registry.get(member)
        await self.gate.acquire_shared()
        try:
            async for out in self.llm.generate({"prompt_token_ids": prompt_ids}, params, request_id, lora_request=lora):
                yield out
        except EngineDeadError:
            raise ServiceUnavailableError("the engine is not running (it died; see the server log)") from None
        finally:
            await self.gate.release_shared()

    async def score(self, prompt_ids: list[int], continuations: Sequence[list[int]], member: str | None) -> list[float]:
        """Log-likelihood (summed token log-probabilities) of each continuation after the prompt, under one member.

        Uses vLLM's prompt logprobs with the engine to itself, one request at a time
        (see `ScoringGate`): each request is one prefill of prompt + continuation.
        """
        from vllm import SamplingParams

        lora = None if member is None else self.registry.get(member)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        n = len(prompt_ids)

        async def one(cont: list[int]) -> float:
            ids = list(prompt_ids) + list(cont)
            last = None
            async for out in self.llm.generate(
                {"prompt_token_ids": ids}, params, self.next_id("score"), lora_request=lora
            ):
                last = out
            lps = last.prompt_logprobs if last is not None else None
            if not lps or not cont:
                return float("-inf")
            total = 0.0
            for pos in range(n, len(ids)):
                entry = lps[pos]
                total += entry[ids[pos]].logprob if entry and ids[pos] in entry else float("-inf")
            return total

        await self.gate.acquire_exclusive()
        try:
            return [await one(c) for c in continuations]  # never two in one engine step
        finally:
            await self.gate.release_exclusive()

    @property
    def max_lora_rank(self) -> int:
        return self.llm.vllm_config.lora_config.max_lora_rank

    def register_extra(self, name: str, folder: Path, keep: int | None = None) -> None:
        """Serve an adapter that is not a member (a routed mixture) under `name` until the next refresh.

        With `keep`, at most that many extras stay registered: the least recently used is forgotten
        (its private snapshot deleted), so a server answering many distinct routes does not grow.
        """
        if name not in self.registry.names():
            self.registry.register(name, folder, self.population.manifest.base_model.name)
        self._extras[name] = None
        self._extras.move_to_end(name)
        while keep is not None and len(self._extras) > keep:
            old, _ = self._extras.popitem(last=False)
            self.registry.forget(old)

    async def check_health(self) -> None:
        await self.llm.check_health()

    @property
    def errored(self) -> bool:
        return self.llm.errored

    def inflight(self) -> int:
        return self.gate.state[0]

    def unavailable_members(self) -> list[str]:
        """Members that cannot answer now: all of them once the engine has died, else none."""
        return list(self.population.names) if self.errored else []

    def health(self) -> dict[str, Any]:
        """Details for `/health`: the in-process engine has no servers to report."""
        return {"engine": "dead" if self.errored else "running"}

    async def warm(self) -> None:
        """Load every registered adapter into vLLM now rather than at its first request."""
        for req in self.registry.requests():
            await self.llm.add_lora(req)

    def shutdown(self) -> None:
        self.llm.shutdown()
        shutil.rmtree(self._snapshot_dir, ignore_errors=True)
