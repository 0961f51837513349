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

The service holds what a population refresh replaces: the population and its router. The engine is
an `ensemble_serve.engine.base.Engine`; whether it can load mixed adapters is checked once, here.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ensemble_serve.engine.base import AdapterMixing, Engine
from ensemble_serve.errors import BadRequestError, NotFoundError
from ensemble_serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EnsembleOptions,
    ModelCard,
    ModelList,
)
from ensemble_serve.service.calibration import Calibration
from ensemble_serve.service.ensemble import EnsembleRequests
from ensemble_serve.service.metrics import Metrics
from ensemble_serve.service.prompts import chat_prompt_ids, completion_prompts, routing_text, sampling_params
from ensemble_serve.service.routing import Routing
from ensemble_serve.service.single import SingleModel
from ensemble_serve.shared.mixture import MixtureCache
from ensemble_serve.shared.population import Population
from ensemble_serve.shared.voting import VOTE_RULES

log = logging.getLogger("ensemble_serve")


def ensemble_defaults(population: Population) -> EnsembleOptions:
    """The manifest's `ensemble_defaults` as options; a set the server cannot use is ignored, with a warning."""
    raw = population.manifest.ensemble_defaults
    if not raw:
        return EnsembleOptions()
    try:
        return EnsembleOptions.model_validate(raw)
    except (ValueError, TypeError) as e:
        log.warning("the manifest's ensemble_defaults are not usable (%s); requests get the built-in defaults", e)
        return EnsembleOptions()


@dataclass(frozen=True)
class ServeSettings:
    """Names and defaults of what is served."""

    ensemble_name: str
    default_members: int | None = None  # None: all members
    semantic_threshold: float = 0.8
    route: bool = True  # use the population's router (when it has one) to pick and weight members
    mixture_cache: int = 32  # mixed adapters kept (ensemble.mode mixture)


class EnsembleService:
    """Everything behind the OpenAI routes."""

    def __init__(self, backend: Engine, population: Population, settings: ServeSettings, metrics: Metrics):
        self.backend = backend
        self.population = population
        self.settings = settings
        self.metrics = metrics
        self.routing = Routing.load(population) if settings.route else Routing()
        self.calibration = Calibration.load(population, self.routing.features)
        self.defaults = ensemble_defaults(population)
        # a capability, checked once: only an engine that loads adapters can serve `mode: mixture`
        self.mixing: AdapterMixing | None = backend if isinstance(backend, AdapterMixing) else None
        self._mixtures: MixtureCache | None = None
        self.single = SingleModel(self)
        self.ensemble = EnsembleRequests(self)

    # ------------------------------------------------------------------ models

    @property
    def base_name(self) -> str:
        return self.population.manifest.base_model.name

    def kind_of(self, model: str) -> str:
        """ "ensemble", "member" or "base"; NotFoundError for anything else."""
        if model == self.settings.ensemble_name:
            return "ensemble"
        if model in self.population.names:
            return "member"
        if model == self.base_name:
            return "base"
        raise NotFoundError(
            f"The model `{model}` does not exist. Served: {self.settings.ensemble_name} (ensemble), "
            f"{', '.join(self.population.names)} (members), {self.base_name} (base).",
            param="model",
            code="model_not_found",
        )

    def list_models(self) -> ModelList:
        manifest = self.population.manifest
        context = self.backend.max_model_len
        ensemble = {
            "members": self.population.names,
            "generation": manifest.generation,
            "vote_rules": list(VOTE_RULES),
            "router": self.routing.status,
            "calibration": self.calibration.status,
        }
        cards = [
            ModelCard(id=self.settings.ensemble_name, root=self.base_name, max_model_len=context, ensemble=ensemble),
            ModelCard(id=self.base_name, root=self.base_name, max_model_len=context),
        ]
        cards += [
            ModelCard(id=m.name, root=m.path, parent=self.base_name, max_model_len=context) for m in manifest.members
        ]
        return ModelList(data=cards)

    def options(self, requested: EnsembleOptions | None, *, greedy: bool = False) -> EnsembleOptions:
        """The request's `ensemble` options, with the population's defaults for what it leaves unset.

        A default of several samples per member does not apply to a greedy request (temperature 0):
        greedy samples of one member are identical, so it gets one chain per member instead of a 400.
        A default `adaptive` does not apply to a request that asks for early stop or a mixture.
        """
        asked = requested.model_dump(include=requested.model_fields_set) if requested is not None else {}
        defaults = self.defaults.model_dump(include=self.defaults.model_fields_set)
        if greedy and "samples_per_member" not in asked and defaults.get("samples_per_member", 1) > 1:
            defaults["samples_per_member"] = 1
        if "adaptive" not in asked and (asked.get("early_stop") or asked.get("mode") == "mixture"):
            defaults.pop("adaptive", None)  # a default must not turn the request's own choice into a 400
        if not defaults:
            return requested if requested is not None else self.defaults
        return EnsembleOptions.model_validate({**defaults, **asked})

    def member_weights(self) -> dict[str, float]:
        """A `weighted` vote's member weights when no router weights them: the manifest's, else fitness."""
        manifest = self.population.manifest
        if manifest.voting_weights:
            return dict(manifest.voting_weights)
        return {m.name: max(m.fitness, 0.0) for m in manifest.members if m.fitness is not None}

    def can_mix(self) -> bool:
        """Whether `ensemble.mode: mixture` can be served: a router, and an engine that loads mixed adapters."""
        return self.routing.router is not None and self.mixing is not None

    def mixture_cache(self) -> MixtureCache:
        """The mixed adapters this server wrote (created at the first mixture request)."""
        if self._mixtures is None:
            root = tempfile.mkdtemp(prefix="ensemble-serve-mixtures-")
            self._mixtures = MixtureCache(root, capacity=self.settings.mixture_cache)
        return self._mixtures

    def close(self) -> None:
        """Remove the mixed adapters this server wrote."""
        if self._mixtures is not None:
            shutil.rmtree(self._mixtures.root, ignore_errors=True)

    def set_population(self, population: Population) -> None:
        routing = Routing.load(population, self.routing) if self.settings.route else Routing()
        calibration = Calibration.load(population, routing.features or self.calibration.features)
        self.backend.set_population(population)
        self.population, self.routing, self.calibration = population, routing, calibration
        self.defaults = ensemble_defaults(population)

    # ------------------------------------------------------------------ requests

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        kind = self.kind_of(req.model)
        tokenizer = self.backend.tokenizer
        prompt_ids = await asyncio.to_thread(chat_prompt_ids, tokenizer, req)  # templates and tokenizers cost CPU
        if kind == "ensemble":
            return await self.ensemble.answer(req, [prompt_ids], [routing_text(req)], chat=True)
        member = self._single_model(req, kind)
        params = sampling_params(req, prompt_ids, self.backend.max_model_len)
        if req.stream:
            return self.single.stream_chat(req, prompt_ids, params, member)
        return await self.single.chat(req, prompt_ids, params, member)

    async def completion(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        kind = self.kind_of(req.model)
        prompts, texts = await asyncio.to_thread(completion_prompts, self.backend.tokenizer, req.prompts)
        if kind == "ensemble":
            return await self.ensemble.answer(req, prompts, texts, chat=False)
        member = self._single_model(req, kind)
        params = [sampling_params(req, ids, self.backend.max_model_len) for ids in prompts]
        if req.stream:
            return self.single.stream_completion(req, prompts, params, member)
        return await self.single.completion(req, prompts, params, member)

    def _single_model(self, req: ChatCompletionRequest | CompletionRequest, kind: str) -> str | None:
        """The member asked for (None: the base model); `ensemble` options are only for the ensemble."""
        if req.ensemble is not None:
            raise BadRequestError(
                f"`ensemble` options need the ensemble model ({self.settings.ensemble_name})", param="ensemble"
            )
        return req.model if kind == "member" else None
