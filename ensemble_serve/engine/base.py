"""What the service needs from an engine, declared once (as vLLM's `EngineClient` declares its capabilities).

Two engines implement :class:`Engine`: the in-process vLLM engine (`inprocess.AsyncEngine`) and remote
vLLM OpenAI servers (`remote.RemoteBackend`). The service calls nothing else on them.

Optional capabilities are protocols of their own, checked once when the service starts (never probed
per request):

* :class:`AdapterMixing`: load an adapter that is not a member (a routed mixture of members'
  updates) and say the largest rank it takes. The ensemble's `mode: mixture` needs it; only the
  in-process engine has it (a remote server loads adapters from its own disk).

Scoring continuations (prompt log-likelihoods, for cross votes) is part of :class:`Engine`: both
engines do it, each through a `ScoringGate` (see `gate.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ensemble_serve.shared.population import Population


@runtime_checkable
class Engine(Protocol):
    """Generation and scoring for one population's members (and its base model, member None)."""

    tokenizer: Any
    """The base model's tokenizer (Hugging Face); prompts reach the engine as token ids."""

    @property
    def max_model_len(self) -> int:
        """The context length, prompt and completion together."""
        ...

    @property
    def errored(self) -> bool:
        """True when the engine cannot serve at all (vLLM's engine died; remote: the last discovery failed)."""
        ...

    def next_id(self, prefix: str) -> str:
        """A request id unique within this engine."""
        ...

    def generate(self, prompt_ids: list[int], params: Any, member: str | None, request_id: str) -> AsyncIterator[Any]:
        """Stream cumulative outputs (shaped like vLLM's `RequestOutput`) for one request.

        `params` is a `vllm.SamplingParams`; cancelling the iteration aborts the request in the engine.
        """
        ...

    async def score(self, prompt_ids: list[int], continuations: Sequence[list[int]], member: str | None) -> list[float]:
        """Log-likelihood of each continuation after the prompt under `member` (prompt logprobs)."""
        ...

    def set_population(self, population: Population) -> None:
        """Serve `population` from now on (a refresh); ValueError when the engine cannot (another base, ...)."""
        ...

    async def warm(self) -> None:
        """Prepare before traffic: load the adapters now; start background work (remote liveness checks)."""
        ...

    def shutdown(self) -> None:
        """Stop the engine and release what it holds."""
        ...

    def unavailable_members(self) -> list[str]:
        """Members that cannot answer now (their server is down, or the engine died), in manifest order."""
        ...

    def health(self) -> dict[str, Any]:
        """Details for `/health` (remote: `{"servers": [...]}`)."""
        ...

    def inflight(self) -> int:
        """Generation requests inside the engine now (the `ensemble_engine_requests_inflight` gauge)."""
        ...


@runtime_checkable
class AdapterMixing(Protocol):
    """An engine that can serve an adapter that is not a member: a routed mixture of the members' updates."""

    @property
    def max_lora_rank(self) -> int:
        """The largest adapter rank the engine takes (a mixture is truncated to it)."""
        ...

    def register_extra(self, name: str, folder: Path, keep: int | None = None) -> None:
        """Serve the adapter in `folder` under `name`; keep at most `keep` such adapters registered."""
        ...
