"""The serving logic behind the OpenAI routes: which model a request names, and who answers it.

Routes (`ensemble_serve.http`) stay thin: they hand a validated request to :class:`EnsembleService` and
return what it gives back, a response model or an async iterator of SSE lines. Errors are the
exception types of `ensemble_serve.errors`; they become HTTP only at the boundary.

`model` names one of three kinds of served model:

- the ensemble (`ensemble.py`): the request fans out to members x samples, each chain's final answer
  is extracted, the chains are voted on, and the chain that best carries the consensus comes back with
  an `ensemble` object;
- a member (`single.py`): behaves like a plain vLLM LoRA model;
- the base model: no adapter.

The service holds what a population refresh replaces as one :class:`Served` snapshot (the population,
its router, reliability table and request defaults, the settings, the population's version). A request
takes the snapshot once, when it starts, and passes it to everything it does; a refresh builds the next
snapshot and swaps it in with one assignment. The parts below the service (`SingleModel`,
`EnsembleRequests`, its `Planner` and fan-out) get the engine, the metrics and the mixed adapters, never
the service. The engine is an `ensemble_serve.engine.base.Engine`; whether it can load mixed adapters is
checked once, here (`Mixtures`).

A refresh and the engine: the engine is told first (`Engine.set_population`), then the snapshot is
swapped. The engine resolves a member's name to its adapter when each engine request starts, so a
request that planned on the old snapshot and starts a chain after the engine switched gets the adapter
registered under that name now: the same one when the member's files did not change (the usual case: an
evolved generation's surviving members keep their folders), the new content when they did (the
in-process engine registers new content under a new LoRA id; remote servers serve what they loaded),
and a chain that fails (recorded in `ensemble.failed`, the others vote) when the member is gone.
Engine requests already running keep the adapter they started with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from ensemble_serve.engine.base import Engine
from ensemble_serve.errors import BadRequestError
from ensemble_serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from ensemble_serve.service.calibration import Calibration
from ensemble_serve.service.ensemble import EnsembleRequests
from ensemble_serve.service.metrics import Metrics
from ensemble_serve.service.mixtures import Mixtures
from ensemble_serve.service.prompts import chat_prompt_ids, completion_prompts, routing_text, sampling_params
from ensemble_serve.service.routing import Routing
from ensemble_serve.service.served import Served, ServeSettings, ensemble_defaults
from ensemble_serve.service.single import SingleModel
from ensemble_serve.shared.population import Population
from ensemble_serve.shared.voting import VOTE_RULES

__all__ = ["EnsembleService", "ServeSettings", "Served", "ensemble_defaults"]

log = logging.getLogger("ensemble_serve")


class EnsembleService:
    """Everything behind the OpenAI routes."""

    def __init__(self, backend: Engine, population: Population, settings: ServeSettings, metrics: Metrics):
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.served: Served = Served.load(population, settings)
        """What is served now; a request reads it once (see the module docstring)."""
        self.mixtures = Mixtures(backend, settings.mixture_cache)
        self.single = SingleModel(backend, metrics)
        self.ensemble = EnsembleRequests(backend, metrics, self.mixtures, settings.semantic_threshold)

    # ------------------------------------------------------------------ the current snapshot
    # for what is not a request (/health, /metrics, the watcher's log, /admin/population); a request
    # reads its own snapshot instead

    @property
    def population(self) -> Population:
        return self.served.population

    @property
    def routing(self) -> Routing:
        return self.served.routing

    @property
    def calibration(self) -> Calibration:
        return self.served.calibration

    def kind_of(self, model: str) -> str:
        """ "ensemble", "member" or "base" in the current population; NotFoundError for anything else."""
        return self.served.kind_of(model)

    def list_models(self) -> ModelList:
        served = self.served
        manifest = served.population.manifest
        base = served.base_name
        context = self.backend.max_model_len
        ensemble = {
            "members": served.population.names,
            "generation": manifest.generation,
            "population": served.about.model_dump(),
            "vote_rules": list(VOTE_RULES),
            "router": served.routing.status,
            "calibration": served.calibration.status,
        }
        cards = [
            ModelCard(id=served.settings.ensemble_name, root=base, max_model_len=context, ensemble=ensemble),
            ModelCard(id=base, root=base, max_model_len=context),
        ]
        cards += [ModelCard(id=m.name, root=m.path, parent=base, max_model_len=context) for m in manifest.members]
        return ModelList(data=cards)

    def can_mix(self) -> bool:
        """Whether `ensemble.mode: mixture` can be served now: a router, and an engine that loads mixed adapters."""
        return self.mixtures.can_mix(self.served)

    def close(self) -> None:
        """Remove the mixed adapters this server wrote."""
        self.mixtures.close()

    def set_population(self, population: Population) -> Served:
        """Serve `population` from now on: the engine first, then the new snapshot in one assignment.

        Raises (and keeps serving the old one) when the engine cannot take it; requests already
        running keep the snapshot they started with.
        """
        served = Served.load(population, self.settings, self.served)
        self.backend.set_population(population)
        self.served = served
        return served

    # ------------------------------------------------------------------ requests

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        served = self.served  # the request's one snapshot
        kind = served.kind_of(req.model)
        tokenizer = self.backend.tokenizer
        prompt_ids = await asyncio.to_thread(chat_prompt_ids, tokenizer, req)  # templates and tokenizers cost CPU
        if kind == "ensemble":
            return await self.ensemble.answer(served, req, [prompt_ids], [routing_text(req)], chat=True)
        member = _single_model(served, req, kind)
        params = sampling_params(req, prompt_ids, self.backend.max_model_len)
        if req.stream:
            return self.single.stream_chat(req, prompt_ids, params, member)
        return await self.single.chat(req, prompt_ids, params, member)

    async def completion(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        served = self.served  # the request's one snapshot
        kind = served.kind_of(req.model)
        prompts, texts = await asyncio.to_thread(completion_prompts, self.backend.tokenizer, req.prompts)
        if kind == "ensemble":
            return await self.ensemble.answer(served, req, prompts, texts, chat=False)
        member = _single_model(served, req, kind)
        params = [sampling_params(req, ids, self.backend.max_model_len) for ids in prompts]
        if req.stream:
            return self.single.stream_completion(req, prompts, params, member)
        return await self.single.completion(req, prompts, params, member)


def _single_model(served: Served, req: ChatCompletionRequest | CompletionRequest, kind: str) -> str | None:
    """The member asked for (None: the base model); `ensemble` options are only for the ensemble."""
    if req.ensemble is not None:
        raise BadRequestError(
            f"`ensemble` options need the ensemble model ({served.settings.ensemble_name})", param="ensemble"
        )
    return req.model if kind == "member" else None
