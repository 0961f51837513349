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

from ensemble_serve.errors import (
    BadRequestError,
    InternalServerError,
    MemberUnavailableError,
    NotFoundError,
    ServiceUnavailableError,
)
from ensemble_serve.service.metrics import Metrics
from ensemble_serve.shared.population import Population
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
from ensemble_serve.shared.voting.rules import (
    VOTE_RULES,
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
        from ensemble_serve.shared.router import RouterError, RouterFeatures, load_router

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
        from ensemble_serve.shared.router import safe_gates

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
    exception: Exception | None = None  # what made the chain fail (client errors are re-raised as such)
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
                    "vote_rules": list(VOTE_RULES),
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

    def can_mix(self) -> bool:
        """Whether `ensemble.mode: mixture` can be served: a router, and an engine that loads mixed adapters."""
        return self.routing.router is not None and hasattr(self.backend, "register_extra")

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

    def _completion_prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A text prompt tokenized, or a token-id prompt checked against the vocabulary."""
        tok = self.backend.tokenizer
        if isinstance(prompt, str):
            return tok.encode(prompt, add_special_tokens=True)
        vocab = len(tok)
        bad = next((t for t in prompt if t >= vocab), None)
        if bad is not None:
            raise BadRequestError(
                f"token id {bad} is out of range: the model's vocabulary has {vocab} tokens", param="prompt"
            )
        return list(prompt)

    def _completion_prompts(self, prompts: list[str | list[int]]) -> tuple[list[list[int]], list[str]]:
        """Token ids of every prompt, and the text of each (what the router reads)."""
        ids = [self._completion_prompt_ids(p) for p in prompts]
        tok = self.backend.tokenizer
        texts = [p if isinstance(p, str) else tok.decode(i, skip_special_tokens=True) for p, i in zip(prompts, ids)]
        return ids, texts

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
        prompt_ids = await asyncio.to_thread(self._chat_prompt_ids, req)  # templates and tokenizers cost CPU
        if kind == "ensemble":
            return await self._ensemble(req, [prompt_ids], [_routing_prompt(req)], chat=True)
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
        prompts, texts = await asyncio.to_thread(self._completion_prompts, req.prompts)
        if kind == "ensemble":
            return await self._ensemble(req, prompts, texts, chat=False)
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

    def _select_members(self, opts: EnsembleOptions, down: set[str]) -> list[str]:
        """The members to ask when the router does not choose: a list by name, the top-k by fitness, or all.

        Members in `down` (unreachable now) are left out; ServiceUnavailable when none is left.
        """
        members = self.population.manifest.members
        if isinstance(opts.members, list):
            unknown = [m for m in opts.members if m not in self.population.names]
            if unknown:
                raise NotFoundError(
                    f"unknown member(s) {unknown}; members: {', '.join(self.population.names)}",
                    param="ensemble.members",
                    code="model_not_found",
                )
            chosen = [m for m in opts.members if m not in down]
            if not chosen:
                raise MemberUnavailableError(f"none of the members {opts.members} can be reached now")
            return chosen
        k = opts.members if opts.members is not None else self.settings.default_members
        if k is not None and k > len(members):
            raise BadRequestError(
                f"ensemble.members={k} but the ensemble has {len(members)} members", param="ensemble.members"
            )
        reachable = [m for m in members if m.name not in down]
        if not reachable:
            raise MemberUnavailableError("no member of the ensemble can be reached now")
        if k is None:
            return [m.name for m in reachable]
        ranked = sorted(reachable, key=lambda m: -(m.fitness if m.fitness is not None else float("-inf")))
        chosen = {m.name for m in ranked[:k]}
        return [m.name for m in reachable if m.name in chosen]  # manifest order

    def _member_weights(self) -> dict[str, float]:
        manifest = self.population.manifest
        if manifest.voting_weights:
            return dict(manifest.voting_weights)
        return {m.name: max(m.fitness, 0.0) for m in manifest.members if m.fitness is not None}

    def _grouper(self, opts: EnsembleOptions) -> Any:
        if opts.answer == "text":
            if self._embedder is None:
                from ensemble_serve.shared.embeddings import default_embedder

                self._embedder = default_embedder()
            return SemanticGrouper(self._embedder, threshold=self.settings.semantic_threshold)
        return ExactGrouper()

    def _check_ensemble_request(self, req: ChatCompletionRequest | CompletionRequest, opts: EnsembleOptions) -> None:
        if req.n != 1:
            raise BadRequestError(
                "n must be 1 for the ensemble model (it returns one consensus answer); "
                "use ensemble.samples_per_member for more chains per member",
                param="n",
            )
        asked_logprobs = req.logprobs if isinstance(req, ChatCompletionRequest) else req.logprobs is not None
        if asked_logprobs:
            raise BadRequestError("logprobs are not available for the ensemble model; ask a member", param="logprobs")
        if opts.samples_per_member > 1 and req.temperature is not None and req.temperature < 1e-5:
            raise BadRequestError(
                "samples_per_member > 1 needs sampling (temperature > 0): greedy samples of one member are identical",
                param="ensemble.samples_per_member",
            )
        get_vote_rule(opts.vote)  # validated by the protocol too; keeps a registry miss loud

    async def _ensemble(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        prompts: list[list[int]],
        texts: list[str],
        chat: bool,
    ) -> ChatCompletionResponse | CompletionResponse | AsyncIterator[str]:
        """Fan each prompt out to the chosen members and vote; several prompts are voted on separately."""
        opts = req.ensemble or EnsembleOptions()
        self._check_ensemble_request(req, opts)
        plans = [await self._plan(req, ids, text, opts) for ids, text in zip(prompts, texts)]
        if req.stream:
            return self._stream_ensemble(req, plans, opts, chat)
        started = time.perf_counter()
        outcomes = await _all_or_none([self._fan_out_and_vote(plan, opts) for plan in plans])
        self.metrics.observe_request(
            "ensemble",
            time.perf_counter() - started,
            sum(len(p.prompt_ids) for p in plans),
            sum(o.completion_tokens for o in outcomes),
        )
        return self._ensemble_response(req, plans, outcomes, chat)

    async def _plan(
        self, req: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int], text: str, opts: EnsembleOptions
    ) -> EnsemblePlan:
        """Who answers one prompt (router, mixture or selection), with which weights and sampling parameters."""
        down = set(self.backend.unavailable_members())
        routing, weights, members = await self._route(text, opts, down)
        if opts.mode == "mixture":
            members, routing = await self._mixture(opts, routing, weights, members)
            weights = None
        if members is None:
            members = self._select_members(opts, down)
        if isinstance(opts.members, list):
            unavailable = [m for m in opts.members if m in down]
        else:
            unavailable = [m for m in self.population.names if m in down]
        # no logprobs: no vote rule needs the sampled tokens' log-probabilities, and asking costs ~10%
        params = self._params(req, prompt_ids, n=opts.samples_per_member)
        return EnsemblePlan(prompt_ids, params, members, weights, routing, unavailable)

    async def _route(
        self, text: str, opts: EnsembleOptions, down: set[str]
    ) -> tuple[dict[str, Any] | None, dict[str, float] | None, list[str] | None]:
        """(routing info for the response, vote weights, members) from the router; Nones when not routed.

        The top-k are taken among the members that can be reached now (`down` are skipped).
        """
        if opts.route is False or isinstance(opts.members, list):
            return None, None, None
        routing = self.routing
        if routing.router is None:
            if routing.status == "none":
                if opts.route:
                    raise BadRequestError("this population has no router", param="ensemble.route")
                return None, None, None
            return {"used": False, "reason": routing.status}, None, None
        gates, problem = await asyncio.to_thread(routing.gates, text)
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
        reachable = [i for i in range(len(names)) if names[i] not in down]
        if not reachable:
            raise MemberUnavailableError("no member of the ensemble can be reached now")
        ranked = sorted(reachable, key=lambda i: (-gates[names[i]], i))
        chosen = sorted(ranked[:k])
        k = len(chosen)
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
            from ensemble_serve.shared.mixture import MixtureCache

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

    async def _fan_out_and_vote(self, plan: EnsemblePlan, opts: EnsembleOptions) -> EnsembleOutcome:
        chains, cached = await self._fan_out(plan.prompt_ids, plan.params, plan.members, opts, plan.weights)
        # extraction, grouping and voting run off the event loop: no request's CPU work delays another
        candidates = await asyncio.to_thread(
            lambda: [cached.get((c.member, c.sample)) or self._candidate(c, opts) for c in chains]
        )
        _raise_if_the_client_is_at_fault(chains)
        result, scores = await self._vote(plan.prompt_ids, chains, candidates, opts, plan.weights)
        if opts.mode != "mixture":  # per-member vote metrics are for members, not for mixed adapters
            self.metrics.observe_vote(result, candidates)
        return EnsembleOutcome(plan.members, chains, candidates, result, scores, plan.routing, plan.unavailable)

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
    ) -> tuple[list[Chain], dict[tuple[str, int], Candidate]]:
        """All members x samples in flight at once (vLLM batches them); optional early stop.

        Returns the chains and, with early stop, the candidates already extracted from the finished ones.
        """
        s = opts.samples_per_member
        chains = {(m, i): Chain(m, i) for m in members for i in range(s)}
        # with early stop: the candidate of every chain that finished or failed, extracted once
        settled: dict[tuple[str, int], Candidate] = {}
        weights = (route_weights or self._member_weights()) if opts.vote == "weighted" else {}
        stop_event = asyncio.Event()

        async def finished(key: tuple[str, int]) -> None:
            settled[key] = await asyncio.to_thread(self._candidate, chains[key], opts)
            done = [settled[k] for k in sorted(settled)]
            pending = [k[0] for k in chains if k not in settled]
            if await asyncio.to_thread(self._vote_is_settled, done, pending, opts, weights):
                stop_event.set()

        async def run(member: str) -> None:
            seen: set[int] = set()
            try:
                async for out in self.backend.generate(
                    prompt_ids, params, member, self.backend.next_id(f"ens-{member}")
                ):
                    for o in out.outputs:
                        c = chains[(member, o.index)]
                        c.text, c.token_ids = o.text, list(o.token_ids)
                        c.cumulative_logprob = o.cumulative_logprob
                        if o.finish_reason is not None and o.index not in seen:
                            c.finish_reason = o.finish_reason
                            seen.add(o.index)
                            if opts.early_stop and opts.vote != "cross":  # the jury can overturn any count
                                await finished((member, o.index))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # one member failing must not fail the request
                log.warning("member %s failed: %s", member, e)
                self.metrics.member_failures.labels(member=member).inc()
                for i in range(s):
                    if i not in seen:
                        chains[(member, i)].error = f"{type(e).__name__}: {e}"
                        chains[(member, i)].exception = e
                        settled.setdefault((member, i), self._candidate(chains[(member, i)], opts))

        tasks = [asyncio.create_task(run(m)) for m in members]
        waiter = asyncio.create_task(stop_event.wait())
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending | {waiter}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(waiter)
                if waiter in done:
                    break
        finally:
            waiter.cancel()
            await _cancel(tasks)  # aborts whatever still runs inside vLLM
        for c in chains.values():
            if c.finish_reason is None and c.error is None:
                c.stopped = True
                settled.pop((c.member, c.sample), None)
        return [chains[(m, i)] for m in members for i in range(s)], settled

    def _vote_is_settled(
        self, finished: list[Candidate], pending: list[str], opts: EnsembleOptions, weights: dict[str, float]
    ) -> bool:
        """Whether the chains still running (one entry per chain: its member) can no longer change the winner."""
        grouper = ExactGrouper() if opts.answer != "text" else self._grouper(opts)
        groups, reps = outcome_groups(finished, grouper)
        tally: dict[str, float] = {}
        for g, rep in zip(groups, reps):
            tally[rep] = sum(weights.get(finished[i].member, 1.0) if opts.vote == "weighted" else 1.0 for i in g)
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
            groups, _ = await asyncio.to_thread(outcome_groups, candidates, grouper)
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
        result = await asyncio.to_thread(get_vote_rule(opts.vote), candidates, ctx)
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
            unavailable=outcome.unavailable,
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

    def _ensemble_response(
        self, req: Any, plans: list[EnsemblePlan], outcomes: list[EnsembleOutcome], chat: bool
    ) -> ChatCompletionResponse | CompletionResponse:
        """One choice per prompt; the vote goes top-level for one prompt, into each choice for several."""
        opts = req.ensemble or EnsembleOptions()
        usage = UsageInfo(
            prompt_tokens=sum(len(p.prompt_ids) for p in plans),
            completion_tokens=sum(o.completion_tokens for o in outcomes),
        )
        bests = [self._winner_chain(o) for o in outcomes]
        infos = [self._ensemble_info(o, opts) for o in outcomes]
        if chat:
            best = bests[0]
            choice = ChatCompletionChoice(
                index=0, message=ResponseMessage(content=best.text), finish_reason=best.finish_reason or "stop"
            )
            return ChatCompletionResponse(model=req.model, choices=[choice], usage=usage, ensemble=infos[0])
        several = len(outcomes) > 1
        choices = [
            CompletionChoice(
                index=i, text=b.text, finish_reason=b.finish_reason or "stop", ensemble=info if several else None
            )
            for i, (b, info) in enumerate(zip(bests, infos))
        ]
        return CompletionResponse(model=req.model, choices=choices, usage=usage, ensemble=None if several else infos[0])

    def _stream_ensemble(self, req: Any, plans: list[EnsemblePlan], opts: EnsembleOptions, chat: bool):
        """Streams once each vote is in: the role first, then each prompt's winning chain in pieces, then its
        `ensemble` object (in the chunk that ends its choice) and the usage."""

        async def events() -> AsyncIterator[str]:
            rid, created = random_id("chatcmpl" if chat else "cmpl"), int(time.time())
            started = time.perf_counter()

            def chunk(index: int, text: str | None, finish: str | None = None, role: bool = False, **extra: Any) -> str:
                if chat:
                    delta = DeltaMessage(role="assistant" if role else None, content=text)
                    return _sse(
                        ChatCompletionChunk(
                            id=rid,
                            created=created,
                            model=req.model,
                            choices=[ChatCompletionChunkChoice(index=index, delta=delta, finish_reason=finish)],
                            **extra,
                        )
                    )
                return _sse(
                    CompletionChunk(
                        id=rid,
                        created=created,
                        model=req.model,
                        choices=[CompletionChoice(index=index, text=text or "", finish_reason=finish)],
                        **extra,
                    )
                )

            if chat:
                yield chunk(0, "", role=True)

            async def indexed(i: int, plan: EnsemblePlan) -> tuple[int, EnsembleOutcome]:
                return i, await self._fan_out_and_vote(plan, opts)

            tasks = [asyncio.create_task(indexed(i, plan)) for i, plan in enumerate(plans)]
            completion_tokens = 0
            try:
                for next_done in asyncio.as_completed(tasks):  # each prompt's choice as soon as its vote is in
                    i, outcome = await next_done
                    completion_tokens += outcome.completion_tokens
                    best = self._winner_chain(outcome)
                    for k in range(0, len(best.text), STREAM_PIECE_CHARS):
                        yield chunk(i, best.text[k : k + STREAM_PIECE_CHARS])
                    yield chunk(
                        i,
                        "" if not chat else None,
                        finish=best.finish_reason or "stop",
                        ensemble=self._ensemble_info(outcome, opts),
                    )
            finally:
                await _cancel(tasks)
            if req.stream_options and req.stream_options.include_usage:
                usage = UsageInfo(
                    prompt_tokens=sum(len(p.prompt_ids) for p in plans), completion_tokens=completion_tokens
                )
                if chat:
                    yield _sse(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage))
                else:
                    yield _sse(CompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage))
            self.metrics.observe_request(
                "ensemble", time.perf_counter() - started, sum(len(p.prompt_ids) for p in plans), completion_tokens
            )
            yield SSE_DONE

        return events()


@dataclass
class EnsemblePlan:
    """Who answers one prompt of an ensemble request, and how."""

    prompt_ids: list[int]
    params: Any  # vllm.SamplingParams
    members: list[str]  # member names (or one mixed adapter's name in mixture mode)
    weights: dict[str, float] | None  # router gates of the chosen members, normalized; None: not routed
    routing: dict[str, Any] | None  # what `ensemble.routing` reports
    unavailable: list[str]  # members left out because they cannot be reached now


@dataclass
class EnsembleOutcome:
    members: list[str]
    chains: list[Chain]
    candidates: list[Candidate]
    result: VoteResult
    scores: list[float | None] | None
    routing: dict[str, Any] | None = None
    unavailable: list[str] = field(default_factory=list)

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


def _raise_if_the_client_is_at_fault(chains: list[Chain]) -> None:
    """When every chain failed because the engine refused the request itself (a 400), that is the answer."""
    errors = [c.exception for c in chains]
    if errors and all(isinstance(e, BadRequestError) for e in errors):
        raise errors[0]


def _routing_prompt(req: ChatCompletionRequest) -> str:
    """The text the router sees for a chat: the last user message (the task)."""
    for m in reversed(chat_text(req.messages)):
        if m["role"] == "user":
            return m["content"]
    return chat_text(req.messages)[-1]["content"] if req.messages else ""


async def _all_or_none(coros: Sequence[Any]) -> list[Any]:
    """Run coroutines concurrently; on the first failure cancel the others and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
        return [t.result() for t in tasks]
    finally:
        await _cancel(tasks)


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
