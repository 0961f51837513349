"""``label_peers: routed``: the routed ensemble labels each problem, as the server's routed request would ask it.

With labels hidden, a problem's label is the confident majority of the chains of the members the
population's router sends it to: its top-k gates for the prompt (the router of the population as the
run starts, the one ``ensemble-serve up`` loads, on the same base-model features). The members then
learn from the chains that reach that label: distillation toward the routed ensemble's consensus, the
ensemble teaching its members. Unlike ``label_peers: niche`` it needs no ``focus_domain``: any
population with a router can run it (a user's own adapters, routed by ``ensemble-train router``).

The router is frozen for the run and its gates are positional: slot i's gate goes to the member now in
slot i (evolution's children and the lifecycle's newborns take the slots of the members they replace,
and with ``niche: true`` their focus family too). k is ``label_top_k``, else the population's default
request's ``members``, else the router's ``top_k``, else 2; never more than the population.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ensemble_serve.shared.population import Population
from ensemble_serve.shared.router import RouterError, RouterFeatures, load_population_router, top_k
from trainer.evolve.config import EvolveConfig
from trainer.tasks.sandbox import Problem

__all__ = ["RoutedPeers", "RoutedPeersError", "routed_summary"]

DEFAULT_TOP_K = 2


class RoutedPeersError(ValueError):
    """A population that cannot label by its router: none, unreadable, or for another number of members."""


class RoutedPeers:
    """The population's router and its features (a copy of the base model), frozen for the run."""

    def __init__(self, population: Population, cfg: EvolveConfig) -> None:
        entry = population.manifest.router
        if not entry:
            raise RoutedPeersError(
                "label_peers: routed labels each problem by the population's router, and this population has none "
                "(train one with `ensemble-train router`, or use label_peers: niche or all)"
            )
        if population.base_model_path is None:
            raise RoutedPeersError("label_peers: routed needs the base model's folder (the router's features)")
        try:
            self.router = load_population_router(population, check_members=False)  # positional: counted below
        except RouterError as e:
            raise RoutedPeersError(f"label_peers: routed: the population's router cannot be used: {e}") from None
        n = len(population.names)
        if len(self.router.members) != n:
            raise RoutedPeersError(
                f"label_peers: routed: the router has {len(self.router.members)} gates and the population "
                f"{n} members; its gates are positional, so retrain it for this population (`ensemble-train router`)"
            )
        defaults = population.manifest.ensemble_defaults or {}
        k = cfg.label_top_k or defaults.get("members") or entry.get("top_k") or DEFAULT_TOP_K
        self.k = max(1, min(int(k), n))
        self.features = RouterFeatures(population.base_model_path)

    def groups(self, problems: Sequence[Problem], names: Sequence[str]) -> list[list[str]]:
        """Per problem, the members in the slots of its top-k gates (highest gate first)."""
        if not problems:
            return []
        if len(names) != len(self.router.members):
            raise RoutedPeersError(
                f"label_peers: routed: the population now has {len(names)} members, the router "
                f"{len(self.router.members)} gates"
            )
        with torch.inference_mode():
            gates = self.router(self.features([p.prompt for p in problems], self.router.feature))
        # a prompt whose gates are not finite is labelled by every member (as the server votes unrouted)
        return [[names[i] for i in top_k(row, self.k)] if torch.isfinite(row).all() else list(names) for row in gates]


def routed_summary(
    problems: Sequence[Problem], groups: Sequence[Sequence[str]], focus: Mapping[str, str | None], k: int
) -> dict[str, Any]:
    """For the history: k, and how many of the labelling members are the problem's family's specialists."""
    pairs = [(p.domain, m) for p, group in zip(problems, groups) for m in group]
    known = [(d, m) for d, m in pairs if focus.get(m)]
    return {
        "top_k": k,
        "problems": len(groups),
        "own_family_share": round(sum(focus[m] == d for d, m in known) / len(known), 4) if known else None,
    }
