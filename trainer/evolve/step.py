"""The evolutionary step: elites stay, selected parents make children, children replace members.

:func:`evolutionary_step` is pure given its inputs and (seed, generation): parent selection
draws from ``derive_seed(seed, "select", g)``, child k's crossover and mutation from
``derive_seed(seed, "child", g, k)``, so the same call makes the same children, bit for bit.
The operators are looked up by name in :mod:`trainer.evolve.operators`;
:func:`check_operators` refuses, before any work, settings the step would fail on later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from ensemble_serve.shared.lora import LoraWeights
from ensemble_serve.shared.population import Population
from trainer.evolve import operators
from trainer.evolve.config import EvolutionConfig, EvolveConfig
from trainer.evolve.run import EvolveError
from trainer.evolve.seeds import derive_seed


@dataclasses.dataclass
class Offspring:
    """A child of the evolutionary step, before it takes the slot of the member it replaces."""

    name: str
    weights: LoraWeights
    parents: list[str]
    operators: list[str]
    fitter: str
    """The fitter parent (ties: the lower index): the child takes its rank ratio and learning rate."""
    held_out: str | None = None
    """domain_loo scope: the domain held out of this child's parent selection."""


def evolutionary_step(
    names: Sequence[str],
    weights: dict[str, LoraWeights],
    fitness: dict[str, float],
    cfg: EvolveConfig,
    generation: int,
    held_out: Mapping[str, Mapping[str, float]] | None = None,
    niches: Mapping[str, str | None] | None = None,
) -> tuple[list[int], list[int], list[Offspring]]:
    """Elites, the indices the children replace, and the children (crossover + mutation).

    With ``held_out`` ({domain: fitness with that domain held out}, the domain_loo scope), child
    k of generation g is assigned domain ``sorted(held_out)[(g * offspring + k) % D]`` and its
    parents are selected (and crossed, weighted) on that fitness; elites and replacement use
    ``fitness``. With ``niches`` ({member: its focus domain or None}, the `niche` setting), the
    fittest member of every niche is kept like an elite, and a child's parents come from the niche
    of the slot it takes (when that niche has two members or more), so no specialist's slot goes to
    a copy of the best generalist. Pure given its inputs and (seed, generation): the same call makes the
    same children.
    """
    evo = cfg.evolution
    n = len(names)
    if not evo.enabled or evo.offspring == 0 or n < 2:
        return [], [], []
    fit = [fitness[m] for m in names]
    elite = operators.elites(fit, min(evo.elite, n))
    if niches:
        elite = sorted(set(elite) | set(niche_keepers(names, fit, niches)))
    n_off = min(evo.offspring, n - len(elite))
    if n_off <= 0:
        return elite, [], []
    replaced = operators.get_operator("replacement", evo.replacement)(fit, n_off, elite)
    select = operators.get_operator("selection", evo.selection)
    cross = None if evo.crossover == "none" else operators.get_operator("crossover", evo.crossover)
    mutate = None if evo.mutation == "none" else operators.get_operator("mutation", evo.mutation)
    rng = torch.Generator().manual_seed(derive_seed(cfg.seed, "select", generation))
    children = []
    held_domains = sorted(held_out) if held_out else []
    for k in range(len(replaced)):
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "child", generation, k))
        domain = held_domains[(generation * len(replaced) + k) % len(held_domains)] if held_domains else None
        fit = [fitness[m] for m in names] if domain is None else [held_out[domain][m] for m in names]
        pool = niche_pool(names, replaced[k], niches)
        if len(pool) == n:
            picks = select(fit, 2, rng, **evo.selection_options)
        elif len(pool) <= 2:  # a niche of two: its two members are the parents
            picks = sorted(pool, key=lambda i: (-fit[i], i))
        else:  # a niche smaller than the population: a tournament no larger than the niche
            options = dict(evo.selection_options)
            if "size" in options:
                options["size"] = min(int(options["size"]), len(pool))
            picks = [pool[i] for i in select([fit[i] for i in pool], 2, rng, **options)]
        parents = [names[i] for i in picks]
        fitter = max(picks, key=lambda i: (fit[i], -i))
        pw = weights[names[fitter]]
        rank = evo.child_rank or pw.rank
        alpha = pw.alpha / pw.rank * rank
        ops = []
        if cross is not None:
            shifted = [max(fit[i], 0.0) + 1e-6 for i in picks]
            child = cross([weights[p] for p in parents], shifted, rank, alpha, gen, rank_policy=evo.rank_policy)
            ops.append(evo.crossover)
        else:
            child = operators.get_operator("crossover", "weighted_average")([pw], [1.0], rank, alpha, gen)
            parents = [names[fitter]]
        if mutate is not None and evo.mutation_strength > 0:
            child = mutate(child, evo.mutation_strength, gen)
            ops.append(evo.mutation)
        children.append(
            Offspring(f"g{generation}c{k}", child, sorted(set(parents), key=parents.index), ops, names[fitter], domain)
        )
    return elite, replaced, children


def niche_keepers(names: Sequence[str], fit: Sequence[float], niches: Mapping[str, str | None]) -> list[int]:
    """The index of the fittest member of each niche (ties: the lower index); members without a niche have none."""
    best: dict[str, int] = {}
    for i, m in enumerate(names):
        niche = niches.get(m)
        if niche is not None and (niche not in best or fit[i] > fit[best[niche]]):
            best[niche] = i
    return sorted(best.values())


def niche_pool(names: Sequence[str], slot: int, niches: Mapping[str, str | None] | None) -> list[int]:
    """The members a child for `slot` may descend from: the slot's niche when it has two members or more,
    else everyone (so a niche's slot is refilled from that niche, not from a generalist)."""
    everyone = list(range(len(names)))
    niche = (niches or {}).get(names[slot])
    if niche is None:
        return everyone
    pool = [i for i, m in enumerate(names) if niches.get(m) == niche]
    return pool if len(pool) >= 2 else everyone


def check_operators(evo: EvolutionConfig, population: Population) -> None:
    """Refuse, before any work, operators, counts or a rank policy the step cannot use on these members."""
    if not evo.enabled:
        return
    for kind, name in (
        ("selection", evo.selection),
        ("crossover", evo.crossover),
        ("mutation", evo.mutation),
        ("replacement", evo.replacement),
    ):
        if name != "none" or kind in ("selection", "replacement"):
            try:
                operators.get_operator(kind, name)
            except operators.OperatorError as e:
                raise EvolveError(f"evolution.{kind}: {e}") from None
    if evo.rank_policy not in operators.RANK_POLICIES:
        *first, last = operators.RANK_POLICIES
        raise EvolveError(f"evolution.rank_policy must be {', '.join(first)} or {last}, got {evo.rank_policy!r}")
    n = len(population.manifest.members)
    free = n - min(evo.elite, n)
    size = evo.selection_options.get("size")
    if evo.selection == "tournament" and size is not None and size > n and min(evo.offspring, free) > 0:
        raise EvolveError(
            f"evolution.selection_options.size {size} is larger than the population ({n} members): "
            f"a tournament draws without replacement; use a size from 1 to {n}"
        )
    if evo.replacement == "generational" and evo.offspring and min(evo.offspring, free) != free:
        raise EvolveError(
            f"replacement generational replaces every non-elite member: with {n} members and elite "
            f"{evo.elite}, offspring must be {free} (got {evo.offspring})"
        )
    if evo.crossover not in ("svd_interpolate", "layer_wise") or evo.rank_policy != "error":
        return
    ranks = {m.rank for m in population.manifest.members}
    if evo.crossover == "layer_wise" and evo.child_rank:
        ranks.add(evo.child_rank)  # layer_wise copies a parent's factors: the child must have its rank
    if len(ranks) > 1:
        raise EvolveError(
            f"crossover {evo.crossover} needs equal ranks, but the members' (and child) ranks are {sorted(ranks)}; "
            "set evolution.rank_policy to truncate or pad, or use crossover weighted_average"
        )
