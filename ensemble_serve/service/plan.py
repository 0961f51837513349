"""Who answers one prompt of an ensemble request: the router's top-k, a mixture of them, or a selection.

A plan names the members (or the one mixed adapter) to fan out to, the weights they carry, what
`ensemble.routing` reports, the members left out because they cannot be reached now, and the
population version it was made from. Everything it reads of the population comes from the request's
:class:`~ensemble_serve.service.served.Served` snapshot, passed in: a refresh during the request
changes nothing of it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ensemble_serve.engine.base import Engine
from ensemble_serve.errors import BadRequestError, MemberUnavailableError, NotFoundError
from ensemble_serve.protocol import ChatCompletionRequest, CompletionRequest, EnsembleOptions, PopulationVersion
from ensemble_serve.service.metrics import Metrics
from ensemble_serve.service.mixtures import Mixtures
from ensemble_serve.service.prompts import sampling_params
from ensemble_serve.service.served import Served
from ensemble_serve.shared.voting import get_vote_rule


@dataclass(kw_only=True)
class EnsemblePlan:
    """Who answers one prompt of an ensemble request, and how.

    Member weights come from three sources, most specific first: `reliability` (the `calibrated`
    vote's weights for the prompt's domain), `gates` (the router's, for this prompt) and
    `population_weights` (the manifest's `voting_weights`, else fitness). :attr:`vote_weights` and
    :attr:`trust` read them in that one order.
    """

    prompt_ids: list[int]
    params: Any  # vllm.SamplingParams
    members: list[str]  # member names (or one mixed adapter's name in mixture mode)
    population: PopulationVersion  # the population the plan was made from
    routing: dict[str, Any] | None = None  # what `ensemble.routing` reports
    unavailable: list[str] = field(default_factory=list)  # members left out because they cannot be reached now
    gates: dict[str, float] | None = None  # router gates of the chosen members, normalized; None: not routed
    reliability: dict[str, float] | None = None  # the calibrated vote's weights; None: the rule does not ask
    population_weights: dict[str, float] = field(default_factory=dict)  # Served.member_weights()
    calibration: dict[str, Any] | None = None  # what `ensemble.calibration` reports

    @property
    def vote_weights(self) -> dict[str, float]:
        """The member weights the vote counts with: the first source that is there.

        An empty reliability table is there: a `calibrated` vote without a usable table counts every
        chain the same (and says so in `ensemble.calibration`) rather than borrowing other weights.
        Members a source does not list weigh 1.0.
        """
        return next(w for w in (self.reliability, self.gates, self.population_weights) if w is not None)

    @property
    def trust(self) -> dict[str, float]:
        """Who adaptive fan-out asks first (`ensemble.adaptive`): the first source that says something.

        The same order as :attr:`vote_weights`, so the waves start with the members whose votes count
        most; unlike the vote, an empty source is skipped, because "every chain the same" says nothing
        about whom to ask first, and the next source (gates, else the population's) still does.
        """
        return next((w for w in (self.reliability, self.gates, self.population_weights) if w), {})


class Planner:
    """Turns a prompt, the request's `ensemble` options and its snapshot of the population into an :class:`EnsemblePlan`."""

    def __init__(self, engine: Engine, metrics: Metrics, mixtures: Mixtures):
        self.engine, self.metrics, self.mixtures = engine, metrics, mixtures

    async def plan(
        self,
        served: Served,
        req: ChatCompletionRequest | CompletionRequest,
        prompt_ids: list[int],
        text: str,
        opts: EnsembleOptions,
    ) -> EnsemblePlan:
        down = set(self.engine.unavailable_members())
        routing, gates, members = await self.route(served, text, opts, down)
        if opts.mode == "mixture":
            members, routing = await self.mixture(served, routing, gates, members)
            gates = None
        if members is None:
            members = self.select(served, opts, down)
        asked = opts.members if isinstance(opts.members, list) else served.population.names
        # no logprobs: no vote rule needs the sampled tokens' log-probabilities, and asking costs ~10%
        params = sampling_params(req, prompt_ids, self.engine.max_model_len, n=opts.samples_per_member)
        reliability, calibration = None, None
        if get_vote_rule(opts.vote).by_reliability and opts.mode != "mixture":
            reliability, calibration = await asyncio.to_thread(served.calibration.weights_for, text, members)
        return EnsemblePlan(
            prompt_ids=prompt_ids,
            params=params,
            members=members,
            population=served.about,
            routing=routing,
            unavailable=[m for m in asked if m in down],
            gates=gates,
            reliability=reliability,
            population_weights=served.member_weights(),
            calibration=calibration,
        )

    def select(self, served: Served, opts: EnsembleOptions, down: set[str]) -> list[str]:
        """The members to ask when the router does not choose: a list by name, the top-k by fitness, or all.

        Members in `down` (unreachable now) are left out; MemberUnavailableError when none is left.
        """
        population = served.population
        members = population.manifest.members
        if isinstance(opts.members, list):
            unknown = [m for m in opts.members if m not in population.names]
            if unknown:
                raise NotFoundError(
                    f"unknown member(s) {unknown}; members: {', '.join(population.names)}",
                    param="ensemble.members",
                    code="model_not_found",
                )
            chosen = [m for m in opts.members if m not in down]
            if not chosen:
                raise MemberUnavailableError(f"none of the members {opts.members} can be reached now")
            return chosen
        k = opts.members if opts.members is not None else served.settings.default_members
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

    async def route(
        self, served: Served, text: str, opts: EnsembleOptions, down: set[str]
    ) -> tuple[dict[str, Any] | None, dict[str, float] | None, list[str] | None]:
        """(routing info for the response, gates of the chosen members, members) from the router; Nones when not routed.

        The top-k are taken among the members that can be reached now (`down` are skipped).
        """
        if opts.route is False or isinstance(opts.members, list):
            return None, None, None
        routing = served.routing
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
        names = list(gates)  # the router's members: the snapshot's population (it was loaded with it)
        k = opts.members if isinstance(opts.members, int) else (routing.top_k or served.settings.default_members)
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

    async def mixture(
        self,
        served: Served,
        routing: dict[str, Any] | None,
        gates: dict[str, float] | None,
        members: list[str] | None,
    ) -> tuple[list[str], dict[str, Any]]:
        """The routed members' updates mixed by their gates into one adapter (cached), served as the only 'member'."""
        if routing is None or not routing.get("used") or not gates or not members:
            why = (routing or {}).get("reason") or "the population has no router, or routing is off"
            raise BadRequestError(
                f"ensemble.mode 'mixture' needs the population's router ({why})", param="ensemble.mode"
            )
        mixing = self.mixtures.mixing
        if mixing is None:
            raise BadRequestError(
                "ensemble.mode 'mixture' needs the in-process engine (remote vLLM servers cannot load a mixed adapter)",
                param="ensemble.mode",
            )
        pairs = [(m, served.population.member_dir(m)) for m in members]
        name, folder, created = await asyncio.to_thread(
            self.mixtures.cache.get_or_create, pairs, [gates[m] for m in members], "exact", None, mixing.max_lora_rank
        )
        # the engine keeps twice the cache's entries registered, so a request still holding an evicted
        # route's adapter finds its (private) snapshot, and the registry stays bounded
        mixing.register_extra(name, folder, keep=2 * self.mixtures.capacity)
        routing = {**routing, "mixture": {"adapter": name, "members": members, "cached": not created}}
        return [name], routing
