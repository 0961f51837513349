"""Who answers one prompt of an ensemble request: the router's top-k, a mixture of them, or a selection.

A plan names the members (or the one mixed adapter) to fan out to, the vote weights the router gives
them, what `ensemble.routing` reports, and the members left out because they cannot be reached now.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ensemble_serve.errors import BadRequestError, MemberUnavailableError, NotFoundError
from ensemble_serve.protocol import ChatCompletionRequest, CompletionRequest, EnsembleOptions
from ensemble_serve.service.prompts import sampling_params
from ensemble_serve.shared.voting import get_vote_rule

if TYPE_CHECKING:  # pragma: no cover
    from ensemble_serve.service.service import EnsembleService


@dataclass
class EnsemblePlan:
    """Who answers one prompt of an ensemble request, and how."""

    prompt_ids: list[int]
    params: Any  # vllm.SamplingParams
    members: list[str]  # member names (or one mixed adapter's name in mixture mode)
    weights: dict[str, float] | None  # router gates of the chosen members, normalized; None: not routed
    routing: dict[str, Any] | None  # what `ensemble.routing` reports
    unavailable: list[str]  # members left out because they cannot be reached now
    vote_weights: dict[str, float] | None = None  # the calibrated vote's reliability weights; None: the rule's own
    calibration: dict[str, Any] | None = None  # what `ensemble.calibration` reports


class Planner:
    """Turns a prompt and the request's `ensemble` options into an :class:`EnsemblePlan`."""

    def __init__(self, service: EnsembleService):
        self.service = service

    async def plan(
        self, req: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int], text: str, opts: EnsembleOptions
    ) -> EnsemblePlan:
        svc = self.service
        down = set(svc.backend.unavailable_members())
        routing, weights, members = await self.route(text, opts, down)
        if opts.mode == "mixture":
            members, routing = await self.mixture(routing, weights, members)
            weights = None
        if members is None:
            members = self.select(opts, down)
        if isinstance(opts.members, list):
            unavailable = [m for m in opts.members if m in down]
        else:
            unavailable = [m for m in svc.population.names if m in down]
        # no logprobs: no vote rule needs the sampled tokens' log-probabilities, and asking costs ~10%
        params = sampling_params(req, prompt_ids, svc.backend.max_model_len, n=opts.samples_per_member)
        plan = EnsemblePlan(prompt_ids, params, members, weights, routing, unavailable)
        if get_vote_rule(opts.vote).by_reliability and opts.mode != "mixture":
            plan.vote_weights, plan.calibration = await asyncio.to_thread(svc.calibration.weights_for, text, members)
        return plan

    def select(self, opts: EnsembleOptions, down: set[str]) -> list[str]:
        """The members to ask when the router does not choose: a list by name, the top-k by fitness, or all.

        Members in `down` (unreachable now) are left out; MemberUnavailableError when none is left.
        """
        population = self.service.population
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
        k = opts.members if opts.members is not None else self.service.settings.default_members
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
        self, text: str, opts: EnsembleOptions, down: set[str]
    ) -> tuple[dict[str, Any] | None, dict[str, float] | None, list[str] | None]:
        """(routing info for the response, vote weights, members) from the router; Nones when not routed.

        The top-k are taken among the members that can be reached now (`down` are skipped).
        """
        if opts.route is False or isinstance(opts.members, list):
            return None, None, None
        routing = self.service.routing
        if routing.router is None:
            if routing.status == "none":
                if opts.route:
                    raise BadRequestError("this population has no router", param="ensemble.route")
                return None, None, None
            return {"used": False, "reason": routing.status}, None, None
        gates, problem = await asyncio.to_thread(routing.gates, text)
        if gates is None:
            self.service.metrics.route_fallbacks.inc()
            return {"used": False, "reason": f"router output unusable ({problem}); voted unrouted"}, None, None
        names = list(gates)  # the router's members: the population it was loaded with (a reload may be racing)
        k = opts.members if isinstance(opts.members, int) else (routing.top_k or self.service.settings.default_members)
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
        self, routing: dict[str, Any] | None, weights: dict[str, float] | None, members: list[str] | None
    ) -> tuple[list[str], dict[str, Any]]:
        """The routed members' updates mixed by their gates into one adapter (cached), served as the only 'member'."""
        svc = self.service
        if routing is None or not routing.get("used") or not weights or not members:
            why = (routing or {}).get("reason") or "the population has no router, or routing is off"
            raise BadRequestError(
                f"ensemble.mode 'mixture' needs the population's router ({why})", param="ensemble.mode"
            )
        mixing = svc.mixing
        if mixing is None:
            raise BadRequestError(
                "ensemble.mode 'mixture' needs the in-process engine (remote vLLM servers cannot load a mixed adapter)",
                param="ensemble.mode",
            )
        pairs = [(m, svc.population.member_dir(m)) for m in members]
        name, folder, created = await asyncio.to_thread(
            svc.mixture_cache().get_or_create, pairs, [weights[m] for m in members], "exact", None, mixing.max_lora_rank
        )
        # the engine keeps twice the cache's entries registered, so a request still holding an evicted
        # route's adapter finds its (private) snapshot, and the registry stays bounded
        mixing.register_extra(name, folder, keep=2 * svc.settings.mixture_cache)
        routing = {**routing, "mixture": {"adapter": name, "members": members, "cached": not created}}
        return [name], routing
