"""The serving logic: resolve the model, fan out, vote, and build OpenAI-shaped responses.

Routes (`api.py`) stay thin: they hand a validated request to `EnsembleService`
and return what it gives back, a response model or an async iterator of SSE lines.
Errors are exceptions from `errors.py`; they become HTTP only at the boundary.

`model` names one of three kinds of served model:
- the ensemble: the request fans out to members x samples, each chain's final answer
  is extracted, the chains are voted on, and the chain that best carries the
  consensus comes back with an `ensemble` object;
- a member: behaves like a plain vLLM LoRA model;
- the base model: no adapter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ensemble_serve.errors import BadRequestError, InternalServerError, NotFoundError, ServiceUnavailableError
from ensemble_serve.metrics import Metrics
from ensemble_serve.population import Population
from ensemble_serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    EnsembleChain,
    EnsembleInfo,
    EnsembleOptions,
    FailedChain,
    ModelCard,
    ModelList,
    ResponseMessage,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
    chat_text,
    random_id,
    sampling_kwargs,
)
from ensemble_serve.voting import (
    Candidate,
    ExactGrouper,
    SemanticGrouper,
    VoteContext,
    VoteResult,
    candidate_from_text,
    decided,
    get_vote_rule,
    outcome_groups,
    remaining_weight,
    winner_key,
)

log = logging.getLogger("ensemble_serve")

STREAM_PIECE_CHARS = 16  # the ensemble's answer is streamed in pieces of this many characters


class Backend(Protocol):
    """What the service needs from an engine: the in-process vLLM engine or remote vLLM servers."""

    tokenizer: Any
    max_model_len: int

    def generate(
        self, prompt_ids: list[int], params: Any, member: str | None, request_id: str
    ) -> AsyncIterator[Any]: ...

    async def score(self, prompt_ids: list[int], continuations: Sequence[list[int]], member: str | None) -> list[float]:
        """Log-likelihood of each continuation after the prompt under `member`."""
        ...

    def next_id(self, prefix: str) -> str: ...

    def set_population(self, population: Population) -> None: ...


@dataclass(frozen=True)
class ServeSettings:
    """Names and defaults of what is served."""

    ensemble_name: str
    default_members: int | None = None  # None: all members
    semantic_threshold: float = 0.8
    route: bool = True  # use the population's router (when it has one) to pick and weight members
    mixture_cache: int = 32  # mixed adapters kept (ensemble.mode mixture)


@dataclass
class Routing:
    """The population's mixture router as the server holds it.

    `status` is "none" (the population has no router), "active", or "refused: <why>": a router
    that cannot be used (trained for another population, corrupt files...) is refused at load,
    and the ensemble then votes unrouted and says so in every response's `ensemble.routing`.
    """

    status: str = "none"
    router: Any = None
    features: Any = None
    top_k: int | None = None

    @classmethod
    def load(cls, population: Population, previous: Routing | None = None) -> Routing:
        entry = population.manifest.router
        if not entry:
            return cls()
        from ensemble_serve.router import RouterError, RouterFeatures, load_router

        folder = population.root / str(entry.get("path", "router"))
        try:
            router = load_router(
                folder, expected_members=population.names, base_model=population.manifest.base_model.name
            )
            if population.base_model_path is None:
                raise RouterError("the router needs the base model's folder for its features; the manifest has none")
            # a refresh (every evolve generation) keeps the base model's copy: the base cannot change under a server
            features = previous.features if previous is not None and previous.features is not None else None
            features = features or RouterFeatures(population.base_model_path)
        except (RouterError, OSError) as e:
            log.warning("router refused (%s); the ensemble votes unrouted", e)
            return cls(status=f"refused: {e}")
        top_k = entry.get("top_k")
        return cls(status="active", router=router, features=features, top_k=top_k if isinstance(top_k, int) else None)

    def gates(self, prompt: str) -> tuple[dict[str, float] | None, str | None]:
        """Gate per member for one prompt, or (None, why) when the router's output is unusable."""
        from ensemble_serve.router import safe_gates

        feats = self.features([prompt], self.router.feature)
        gates, problem = safe_gates(self.router, feats)
        if problem is not None:
            return None, problem
        return {m: float(g) for m, g in zip(self.router.members, gates[0].tolist())}, None


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
    stopped: bool = False  # aborted by early stop

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_logprob(self) -> float | None:
        if self.cumulative_logprob is None or not self.token_ids:
            return None
        return self.cumulative_logprob / len(self.token_ids)


def _sse(payload: Any) -> str:
    body = payload.model_dump_json(exclude_none=True) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EnsembleService:
    """Everything behind the OpenAI routes."""

    def __init__(self, backend: Backend, population: Population, settings: ServeSettings, metrics: Metrics):
        self.backend = backend
        self.population = population
        self.settings = settings
        self.metrics = metrics
        self._embedder: Any = None
        self.routing = Routing.load(population) if settings.route else Routing()
        self._mixtures: Any = None

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
        cards = [
            ModelCard(
                id=self.settings.ensemble_name,
                root=self.base_name,
                max_model_len=self.backend.max_model_len,
                ensemble={
                    "members": self.population.names,
                    "generation": manifest.generation,
                    "vote_rules": ["majority", "weighted", "cross"],
                    "router": self.routing.status,
                },
            ),
            ModelCard(id=self.base_name, root=self.base_name, max_model_len=self.backend.max_model_len),
        ]
        cards += [
            ModelCard(id=m.name, root=m.path, parent=self.base_name, max_model_len=self.backend.max_model_len)
            for m in manifest.members
        ]
        return ModelList(data=cards)

    def close(self) -> None:
        """Remove the mixed adapters this server wrote."""
        if self._mixtures is not None:
            import shutil

            shutil.rmtree(self._mixtures.root, ignore_errors=True)

    def set_population(self, population: Population) -> None:
        routing = Routing.load(population, self.routing) if self.settings.route else Routing()
        self.backend.set_population(population)
        self.population, self.routing = population, routing

    # ------------------------------------------------------------------ prompts

    def _chat_prompt_ids(self, req: ChatCompletionRequest) -> list[int]:
        tok = self.backend.tokenizer
        try:
            text = tok.apply_chat_template(chat_text(req.messages), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that refuses the conversation (e.g. roles out of order)
            raise BadRequestError(f"the chat template refused these messages: {e}", param="messages") from None
        return tok.encode(text, add_special_tokens=False)

    def _completion_prompt_ids(self, prompt: str) -> list[int]:
        return self.backend.tokenizer.encode(prompt, add_special_tokens=True)

    def _params(self, req: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int], **overrides: Any) -> Any:
        from vllm import SamplingParams

        kw = sampling_kwargs(req, max_model_len=self.backend.max_model_len, prompt_tokens=len(prompt_ids))
        kw.update(overrides)
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            raise BadRequestError(str(e)) from None

    # ------------------------------------------------------------------ chat

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        kind = self.kind_of(req.model)
        prompt_ids = self._chat_prompt_ids(req)
        if kind == "ensemble":
            return await self._ensemble(req, prompt_ids, chat=True)
        if req.ensemble is not None:
            raise BadRequestError(
                f"`ensemble` options need the ensemble model ({self.settings.ensemble_name})", param="ensemble"
            )
        member = req.model if kind == "member" else None
        params = self._params(req, prompt_ids)
        if req.stream:
            return self._stream_single_chat(req, prompt_ids, params, member)
        started = time.perf_counter()
        outs = await self._run_single(prompt_ids, params, member)
        choices = [
            ChatCompletionChoice(
                index=o.index,
                message=ResponseMessage(content=o.text),
                logprobs=self._chat_logprobs(o) if req.logprobs else None,
                finish_reason=o.finish_reason,
            )
            for o in outs
        ]
        usage = UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=sum(len(o.token_ids) for o in outs))
        self.metrics.observe_request(kind, time.perf_counter() - started, usage.prompt_tokens, usage.completion_tokens)
        return ChatCompletionResponse(model=req.model, choices=choices, usage=usage)

    async def completion(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        kind = self.kind_of(req.model)
        prompts = [self._completion_prompt_ids(p) for p in req.prompts]
        if kind == "ensemble":
            if len(prompts) != 1:
                raise BadRequestError("the ensemble answers one prompt per request", param="prompt")
            return await self._ensemble(req, prompts[0], chat=False)
        if req.ensemble is not None:
            raise BadRequestError(
                f"`ensemble` options need the ensemble model ({self.settings.ensemble_name})", param="ensemble"
            )
        member = req.model if kind == "member" else None
        params = [self._params(req, ids) for ids in prompts]
        if req.stream:
            return self._stream_single_completion(req, prompts, params, member)
        started = time.perf_counter()
        results = await asyncio.gather(*(self._run_single(ids, p, member) for ids, p in zip(prompts, params)))
        choices = []
        completion_tokens = 0
        for i, outs in enumerate(results):
            for o in outs:
                completion_tokens += len(o.token_ids)
                choices.append(
                    CompletionChoice(
                        index=i * req.n + o.index,
                        text=o.text,
                        logprobs=self._completion_logprobs(o) if req.logprobs is not None else None,
                        finish_reason=o.finish_reason,
                    )
                )
        usage = UsageInfo(prompt_tokens=sum(map(len, prompts)), completion_tokens=completion_tokens)
        self.metrics.observe_request(kind, time.perf_counter() - started, usage.prompt_tokens, usage.completion_tokens)
        return CompletionResponse(model=req.model, choices=choices, usage=usage)

    # ------------------------------------------------------------------ single model

    async def _run_single(self, prompt_ids: list[int], params: Any, member: str | None) -> list[Any]:
        # With n > 1 an engine output may carry only the completions that changed in
        # that step, so keep the latest state of each completion index.
        latest: dict[int, Any] = {}
        async for out in self.backend.generate(prompt_ids, params, member, self.backend.next_id("req")):
            for o in out.outputs:
                latest[o.index] = o
        n = getattr(params, "n", 1)
        if len(latest) != n:
            raise InternalServerError(f"the engine returned {len(latest)} of {n} completions")
        return [latest[i] for i in sorted(latest)]

    async def _stream_deltas(
        self, prompt_ids: list[int], params: Any, member: str | None
    ) -> AsyncIterator[tuple[int, str, list[int], Any, str | None]]:
        """(choice index, new text, new token ids, new logprobs, finish reason) as vLLM produces them."""
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        async for out in self.backend.generate(prompt_ids, params, member, self.backend.next_id("req")):
            for o in out.outputs:
                t0, k0 = sent_text.get(o.index, 0), sent_tokens.get(o.index, 0)
                new_text, new_ids = o.text[t0:], list(o.token_ids[k0:])
                new_lps = o.logprobs[k0:] if o.logprobs is not None else None
                sent_text[o.index], sent_tokens[o.index] = len(o.text), len(o.token_ids)
                if new_text or new_ids or o.finish_reason is not None:
                    yield o.index, new_text, new_ids, new_lps, o.finish_reason

    def _stream_single_chat(
        self, req: ChatCompletionRequest, prompt_ids: list[int], params: Any, member: str | None
    ) -> AsyncIterator[str]:
        async def events() -> AsyncIterator[str]:
            rid, created = random_id("chatcmpl"), int(time.time())
            started = time.perf_counter()
            for i in range(req.n):
                yield _sse(
                    ChatCompletionChunk(
                        id=rid,
                        created=created,
                        model=req.model,
                        choices=[ChatCompletionChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))],
                    )
                )
            generated = 0
            async for index, text, ids, lps, finish in self._stream_deltas(prompt_ids, params, member):
                generated += len(ids)
                logprobs = self._chat_logprobs_from(ids, lps) if req.logprobs and ids else None
                yield _sse(
                    ChatCompletionChunk(
                        id=rid,
                        created=created,
                        model=req.model,
                        choices=[
                            ChatCompletionChunkChoice(
                                index=index, delta=DeltaMessage(content=text), logprobs=logprobs, finish_reason=finish
                            )
                        ],
                    )
                )
            if req.stream_options and req.stream_options.include_usage:
                yield _sse(
                    ChatCompletionChunk(
                        id=rid,
                        created=created,
                        model=req.model,
                        choices=[],
                        usage=UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=generated),
                    )
                )
            self.metrics.observe_request(
                self.kind_of(req.model), time.perf_counter() - started, len(prompt_ids), generated
            )
            yield SSE_DONE

        return events()

    def _stream_single_completion(
        self, req: CompletionRequest, prompts: list[list[int]], params: list[Any], member: str | None
    ) -> AsyncIterator[str]:
        async def events() -> AsyncIterator[str]:
            rid, created = random_id("cmpl"), int(time.time())
            started = time.perf_counter()
            generated = 0
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i: int, ids: list[int], p: Any) -> None:
                try:
                    async for item in self._stream_deltas(ids, p, member):
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
                    logprobs = self._completion_logprobs_from(ids, lps) if req.logprobs is not None and ids else None
                    yield _sse(
                        CompletionChunk(
                            id=rid,
                            created=created,
                            model=req.model,
                            choices=[
                                CompletionChoice(
                                    index=i * req.n + index, text=text, logprobs=logprobs, finish_reason=finish
                                )
                            ],
                        )
                    )
                for t in tasks:
                    t.result()  # surface an engine error
            finally:
                await _cancel(tasks)
            if req.stream_options and req.stream_options.include_usage:
                yield _sse(
                    CompletionChunk(
                        id=rid,
                        created=created,
                        model=req.model,
                        choices=[],
                        usage=UsageInfo(prompt_tokens=sum(map(len, prompts)), completion_tokens=generated),
                    )
                )
            self.metrics.observe_request(
                self.kind_of(req.model), time.perf_counter() - started, sum(map(len, prompts)), generated
            )
            yield SSE_DONE

        return events()

    # ------------------------------------------------------------------ logprobs

    def _token_text(self, token_id: int) -> str:
        return self.backend.tokenizer.decode([token_id])

    def _chat_logprobs_from(self, ids: Sequence[int], lps: Sequence[Any] | None) -> ChatLogprobs:
        content = []
        for tid, entry in zip(ids, lps or [None] * len(ids)):
            entry = entry or {}
            chosen = entry.get(tid)
            tops = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
            text = self._token_text(tid)
            content.append(
                TokenLogprob(
                    token=text,
                    logprob=chosen.logprob if chosen else float("-inf"),
                    bytes=list(text.encode()),
                    top_logprobs=[
                        TopLogprob(
                            token=self._token_text(t), logprob=lp.logprob, bytes=list(self._token_text(t).encode())
                        )
                        for t, lp in tops
                        if lp.rank and lp.rank > 0
                    ],
                )
            )
        return ChatLogprobs(content=content)

    def _chat_logprobs(self, o: Any) -> ChatLogprobs:
        return self._chat_logprobs_from(list(o.token_ids), o.logprobs)

    def _completion_logprobs_from(
        self, ids: Sequence[int], lps: Sequence[Any] | None, offset: int = 0
    ) -> CompletionLogprobs:
        out = CompletionLogprobs()
        pos = offset
        for tid, entry in zip(ids, lps or [None] * len(ids)):
            entry = entry or {}
            text = self._token_text(tid)
            out.tokens.append(text)
            out.token_logprobs.append(entry[tid].logprob if tid in entry else None)
            out.top_logprobs.append(
                {self._token_text(t): lp.logprob for t, lp in entry.items() if lp.rank and lp.rank > 0} or None
            )
            out.text_offset.append(pos)
            pos += len(text)
        return out

    def _completion_logprobs(self, o: Any) -> CompletionLogprobs:
        return self._completion_logprobs_from(list(o.token_ids), o.logprobs)

    # ------------------------------------------------------------------ ensemble

    def _select_members(self, opts: EnsembleOptions) -> list[str]:
        members = self.population.manifest.members
        if isinstance(opts.members, list):
            unknown = [m for m in opts.members if m not in self.population.names]
            if unknown:
                raise NotFoundError(
                    f"unknown member(s) {unknown}; members: {', '.join(self.population.names)}",
                    param="ensemble.members",
                    code="model_not_found",
                )
            return list(opts.members)
        k = opts.members if opts.members is not None else self.settings.default_members
        if k is None:
            return [m.name for m in members]
        if k > len(members):
            raise BadRequestError(
                f"ensemble.members={k} but the ensemble has {len(members)} members", param="ensemble.members"
            )
        ranked = sorted(members, key=lambda m: -(m.fitness if m.fitness is not None else float("-inf")))
        chosen = {m.name for m in ranked[:k]}
        return [m.name for m in members if m.name in chosen]  # manifest order

    def _member_weights(self) -> dict[str, float]:
        manifest = self.population.manifest
        if manifest.voting_weights:
            return dict(manifest.voting_weights)
        return {m.name: max(m.fitness, 0.0) for m in manifest.members if m.fitness is not None}

    def _grouper(self, opts: EnsembleOptions) -> Any:
        if opts.answer == "text":
            if self._embedder is None:
                from ensemble_serve.embeddings import default_embedder

                self._embedder = default_embedder()
            return SemanticGrouper(self._embedder, threshold=self.settings.semantic_threshold)
        return ExactGrouper()

    async def _ensemble(self, req: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int], chat: bool):
        opts = req.ensemble or EnsembleOptions()
        if req.n != 1:
            raise BadRequestError(
                "n must be 1 for the ensemble model (it returns one consensus answer); "
                "use ensemble.samples_per_member for more chains per member",
                param="n",
            )
        if chat and req.logprobs:
            raise BadRequestError("logprobs are not available for the ensemble model; ask a member", param="logprobs")
        if not chat and req.logprobs is not None:
            raise BadRequestError("logprobs are not available for the ensemble model; ask a member", param="logprobs")
        routing, weights, members = await self._route(req, opts, chat)
        if opts.mode == "mixture":
            members, routing = await self._mixture(opts, routing, weights, members)
            weights = None
        if members is None:
            members = self._select_members(opts)
        if opts.samples_per_member > 1 and req.temperature is not None and req.temperature < 1e-5:
            raise BadRequestError(
                "samples_per_member > 1 needs sampling (temperature > 0): greedy samples of one member are identical",
                param="ensemble.samples_per_member",
            )
        params = self._params(req, prompt_ids, n=opts.samples_per_member, logprobs=0)
        get_vote_rule(opts.vote)  # validated by the protocol too; keeps a registry miss loud
        if req.stream:
            return self._stream_ensemble(req, prompt_ids, params, members, opts, chat, weights, routing)
        started = time.perf_counter()
        outcome = await self._fan_out_and_vote(prompt_ids, params, members, opts, weights, routing)
        self.metrics.observe_request(
            "ensemble", time.perf_counter() - started, len(prompt_ids), outcome.completion_tokens
        )
        return self._ensemble_response(req, prompt_ids, outcome, chat)

    async def _route(
        self, req: Any, opts: EnsembleOptions, chat: bool
    ) -> tuple[dict[str, Any] | None, dict[str, float] | None, list[str] | None]:
        """(routing info for the response, vote weights, members) from the router; Nones when not routed."""
        if opts.route is False or isinstance(opts.members, list):
            return None, None, None
        routing = self.routing
        if routing.router is None:
            if routing.status == "none":
                if opts.route:
                    raise BadRequestError("this population has no router", param="ensemble.route")
                return None, None, None
            return {"used": False, "reason": routing.status}, None, None
        prompt = _routing_prompt(req, chat)
        gates, problem = await asyncio.to_thread(routing.gates, prompt)
        if gates is None:
            self.metrics.route_fallbacks.inc()
            return {"used": False, "reason": f"router output unusable ({problem}); voted unrouted"}, None, None
        names = list(gates)  # the router's members: the population it was loaded with (a reload may be racing)
        k = opts.members if isinstance(opts.members, int) else (routing.top_k or self.settings.default_members)
        k = len(names) if k is None else k
        if k > len(names):
            raise BadRequestError(
                f"ensemble.members={k} but the ensemble has {len(names)} members", param="ensemble.members"
            )
        ranked = sorted(range(len(names)), key=lambda i: (-gates[names[i]], i))
        chosen = sorted(ranked[:k])
        total = sum(gates[names[i]] for i in chosen)
        weights = {names[i]: (gates[names[i]] / total if total > 0 else 1.0 / k) for i in chosen}
        info = {"used": True, "top_k": k, "gates": {m: round(g, 4) for m, g in gates.items()}}
        return info, weights, [names[i] for i in chosen]

    async def _mixture(
        self,
        opts: EnsembleOptions,
        routing: dict[str, Any] | None,
        weights: dict[str, float] | None,
        members: list[str] | None,
    ) -> tuple[list[str], dict[str, Any]]:
        """The routed members' updates mixed by their gates into one adapter (cached), served as the only 'member'."""
        if routing is None or not routing.get("used") or not weights or not members:
            why = (routing or {}).get("reason") or "the population has no router, or routing is off"
            raise BadRequestError(
                f"ensemble.mode 'mixture' needs the population's router ({why})", param="ensemble.mode"
            )
        register = getattr(self.backend, "register_extra", None)
        max_rank = getattr(self.backend, "max_lora_rank", None)
        if register is None or max_rank is None:
            raise BadRequestError(
                "ensemble.mode 'mixture' needs the in-process engine (remote vLLM servers cannot load a mixed adapter)",
                param="ensemble.mode",
            )
        if self._mixtures is None:
            from ensemble_serve.mixture import MixtureCache

            self._mixtures = MixtureCache(
                tempfile.mkdtemp(prefix="ensemble-serve-mixtures-"), capacity=self.settings.mixture_cache
            )
        pairs = [(m, self.population.member_dir(m)) for m in members]
        name, folder, created = await asyncio.to_thread(
            self._mixtures.get_or_create, pairs, [weights[m] for m in members], "exact", None, max_rank
        )
        # the engine keeps twice the cache's entries registered, so a request still holding an evicted
        # route's adapter finds its (private) snapshot, and the registry stays bounded
        register(name, folder, keep=2 * self.settings.mixture_cache)
        routing = {**routing, "mixture": {"adapter": name, "members": members, "cached": not created}}
        return [name], routing

    async def _fan_out_and_vote(
        self,
        prompt_ids: list[int],
        params: Any,
        members: list[str],
        opts: EnsembleOptions,
        weights: dict[str, float] | None = None,
        routing: dict[str, Any] | None = None,
    ) -> EnsembleOutcome:
        chains = await self._fan_out(prompt_ids, params, members, opts, weights)
        candidates = [self._candidate(c, opts) for c in chains]
        result, scores = await self._vote(prompt_ids, chains, candidates, opts, weights)
        if opts.mode != "mixture":  # per-member vote metrics are for members, not for mixed adapters
            self.metrics.observe_vote(result, candidates)
        return EnsembleOutcome(members, chains, candidates, result, scores, routing)

    def _candidate(self, c: Chain, opts: EnsembleOptions) -> Candidate:
        if c.error is not None or c.stopped:
            return Candidate(c.member, c.sample, c.text, None, "failed", c.tokens)
        return candidate_from_text(c.member, c.sample, c.text, c.tokens, opts.answer, c.mean_logprob)

    async def _fan_out(
        self,
        prompt_ids: list[int],
        params: Any,
        members: list[str],
        opts: EnsembleOptions,
        route_weights: dict[str, float] | None = None,
    ) -> list[Chain]:
        """All members x samples in flight at once (vLLM batches them); optional early stop."""
        s = opts.samples_per_member
        chains = {(m, i): Chain(m, i) for m in members for i in range(s)}
        done: set[tuple[str, int]] = set()
        weights = (route_weights or self._member_weights()) if opts.vote == "weighted" else {}
        stop_event = asyncio.Event()

        async def run(member: str) -> None:
            try:
                async for out in self.backend.generate(
                    prompt_ids, params, member, self.backend.next_id(f"ens-{member}")
                ):
                    for o in out.outputs:
                        c = chains[(member, o.index)]
                        c.text, c.token_ids = o.text, list(o.token_ids)
                        c.cumulative_logprob = o.cumulative_logprob
                        if o.finish_reason is not None and (member, o.index) not in done:
                            c.finish_reason = o.finish_reason
                            done.add((member, o.index))
                            if opts.early_stop and self._vote_is_settled(chains, done, opts, weights):
                                stop_event.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # one member failing must not fail the request
                log.warning("member %s failed: %s", member, e)
                self.metrics.member_failures.labels(member=member).inc()
                for i in range(s):
                    if (member, i) not in done:
                        chains[(member, i)].error = f"{type(e).__name__}: {e}"
                        done.add((member, i))

        tasks = [asyncio.create_task(run(m)) for m in members]
        waiter = asyncio.create_task(stop_event.wait())
        try:
            pending = set(tasks)
            while pending:
                finished, pending = await asyncio.wait(pending | {waiter}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(waiter)
                if waiter in finished:
                    break
        finally:
            waiter.cancel()
            await _cancel(tasks)  # aborts whatever still runs inside vLLM
        for key, c in chains.items():
            if key not in done:
                c.stopped = True
        return [chains[(m, i)] for m in members for i in range(s)]

    def _vote_is_settled(self, chains: dict, done: set, opts: EnsembleOptions, weights: dict[str, float]) -> bool:
        if opts.vote == "cross":
            return False  # the jury can overturn any count
        finished = [self._candidate(chains[k], opts) for k in sorted(done)]
        grouper = ExactGrouper() if opts.answer != "text" else self._grouper(opts)
        groups, reps = outcome_groups(finished, grouper)
        tally: dict[str, float] = {}
        for g, rep in zip(groups, reps):
            tally[rep] = sum(weights.get(finished[i].member, 1.0) if opts.vote == "weighted" else 1.0 for i in g)
        pending = [k[0] for k in chains if k not in done]
        return decided(tally, remaining_weight(pending, opts.vote, weights))

    async def _vote(
        self,
        prompt_ids: list[int],
        chains: list[Chain],
        candidates: list[Candidate],
        opts: EnsembleOptions,
        route_weights: dict[str, float] | None = None,
    ) -> tuple[VoteResult, list[float] | None]:
        grouper = self._grouper(opts)
        weights = route_weights or self._member_weights()
        cross_scores = None
        group_scores = None
        if opts.vote == "cross":
            groups, _ = outcome_groups(candidates, grouper)
            if len(groups) > 1:
                key = winner_key(candidates)
                continuations = [chains[min(g, key=key)].token_ids for g in groups]
                jurors = sorted({c.member for c in chains if c.error is None})
                cross_scores = {}
                for juror in jurors:  # one adapter at a time: see ScoringGate
                    try:
                        cross_scores[juror] = await self.backend.score(prompt_ids, continuations, juror)
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:  # a juror that cannot score sits this vote out
                        log.warning("juror %s could not score: %s", juror, e)
                        self.metrics.member_failures.labels(member=juror).inc()
                        cross_scores[juror] = [float("nan")] * len(groups)
            else:
                cross_scores = {m: [0.0] * len(groups) for m in {c.member for c in candidates}}
        ctx = VoteContext(member_weights=weights, grouper=grouper, cross_scores=cross_scores)
        result = get_vote_rule(opts.vote)(candidates, ctx)
        if result.votes:
            weight_of = {}
            for g, rep in zip(result.groups, result.votes):
                for i in g:
                    weight_of[i] = result.votes[rep]
            group_scores = [weight_of.get(i) for i in range(len(candidates))]
        return result, group_scores

    def _ensemble_info(self, outcome: EnsembleOutcome, opts: EnsembleOptions) -> EnsembleInfo:
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
            tokens_saved=outcome.tokens_saved,
            early_stopped=outcome.early_stopped,
            routing=outcome.routing,
        )

    def _winner_chain(self, outcome: EnsembleOutcome) -> Chain:
        if outcome.result.winner is not None:
            return outcome.chains[outcome.result.winner]
        answered = [c for c in outcome.chains if c.error is None and not c.stopped]
        if not answered:
            reasons = "; ".join(sorted({c.error or "stopped" for c in outcome.chains}))
            raise ServiceUnavailableError(f"every member failed to answer: {reasons}")
        return answered[0]

    def _ensemble_response(self, req: Any, prompt_ids: list[int], outcome: EnsembleOutcome, chat: bool) -> Any:
        opts = req.ensemble or EnsembleOptions()
        best = self._winner_chain(outcome)
        usage = UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=outcome.completion_tokens)
        info = self._ensemble_info(outcome, opts)
        finish = best.finish_reason or "stop"
        if chat:
            choice = ChatCompletionChoice(index=0, message=ResponseMessage(content=best.text), finish_reason=finish)
            return ChatCompletionResponse(model=req.model, choices=[choice], usage=usage, ensemble=info)
        choice = CompletionChoice(index=0, text=best.text, finish_reason=finish)
        return CompletionResponse(model=req.model, choices=[choice], usage=usage, ensemble=info)

    def _stream_ensemble(
        self,
        req: Any,
        prompt_ids: list[int],
        params: Any,
        members: list[str],
        opts: EnsembleOptions,
        chat: bool,
        weights: dict[str, float] | None = None,
        routing: dict[str, Any] | None = None,
    ):
        """Streams once the vote is in: the role first, then the winning chain in pieces, then `ensemble` and usage."""

        async def events() -> AsyncIterator[str]:
            rid, created = random_id("chatcmpl" if chat else "cmpl"), int(time.time())
            started = time.perf_counter()

            def chunk(text: str | None, finish: str | None = None, role: bool = False, **extra: Any) -> str:
                if chat:
                    delta = DeltaMessage(role="assistant" if role else None, content=text)
                    return _sse(
                        ChatCompletionChunk(
                            id=rid,
                            created=created,
                            model=req.model,
                            choices=[ChatCompletionChunkChoice(index=0, delta=delta, finish_reason=finish)],
                            **extra,
                        )
                    )
                return _sse(
                    CompletionChunk(
                        id=rid,
                        created=created,
                        model=req.model,
                        choices=[CompletionChoice(index=0, text=text or "", finish_reason=finish)],
                        **extra,
                    )
                )

            if chat:
                yield chunk("", role=True)
            outcome = await self._fan_out_and_vote(prompt_ids, params, members, opts, weights, routing)
            best = self._winner_chain(outcome)
            for i in range(0, len(best.text), STREAM_PIECE_CHARS):
                yield chunk(best.text[i : i + STREAM_PIECE_CHARS])
            yield chunk(
                "" if not chat else None,
                finish=best.finish_reason or "stop",
                ensemble=self._ensemble_info(outcome, opts),
            )
            if req.stream_options and req.stream_options.include_usage:
                usage = UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=outcome.completion_tokens)
                if chat:
                    yield _sse(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage))
                else:
                    yield _sse(CompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage))
            self.metrics.observe_request(
                "ensemble", time.perf_counter() - started, len(prompt_ids), outcome.completion_tokens
            )
            yield SSE_DONE

        return events()


@dataclass
class EnsembleOutcome:
    members: list[str]
    chains: list[Chain]
    candidates: list[Candidate]
    result: VoteResult
    scores: list[float | None] | None
    routing: dict[str, Any] | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.chains)

    @property
    def early_stopped(self) -> bool:
        return any(c.stopped for c in self.chains)

    @property
    def tokens_saved(self) -> int | None:
        """Estimated tokens the stopped chains did not generate: the finished chains' mean length minus what each stopped chain had."""
        stopped = [c for c in self.chains if c.stopped]
        if not stopped:
            return None
        finished = [c.tokens for c in self.chains if not c.stopped and c.error is None]
        if not finished:
            return 0
        mean = sum(finished) / len(finished)
        return int(round(sum(max(0.0, mean - c.tokens) for c in stopped)))


def _routing_prompt(req: Any, chat: bool) -> str:
    """The text the router sees: the last user message (the task), or the completion prompt."""
    if not chat:
        return req.prompt if isinstance(req.prompt, str) else str(req.prompt)
    for m in reversed(chat_text(req.messages)):
        if m["role"] == "user":
            return m["content"]
    return chat_text(req.messages)[-1]["content"] if req.messages else ""


async def _cancel(tasks: Sequence[asyncio.Task]) -> None:
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
