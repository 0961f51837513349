"""The next generation's manifest: who stays, who is born, what the lifecycle changed.

After the gradient phase and the evolutionary step, :func:`next_manifest` lays out generation
g: survivors keep their slot (a member that trained gets the new folder ``members/<name>-g<g>``;
the previous generation's folder stays intact), each child takes the slot of the member it
replaces, with the mean fitness of its parents. :func:`run_lifecycle` then runs the adapter
lifecycle (:mod:`trainer.evolve.lifecycle`) on that population, and :func:`apply_lifecycle`
writes its effects in. Both return the manifest, the adapters that need writing, and one
history entry per slot; a manifest that would be invalid (a name clash) is refused with
:class:`EvolveError` before anything is written.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ensemble_serve.shared.lora import LoraWeights
from ensemble_serve.shared.population import Manifest, Member, Population
from trainer.evolve import operators
from trainer.evolve.config import EvolveConfig
from trainer.evolve.lifecycle import LifecycleResult, lifecycle_step
from trainer.evolve.run import EvolveError
from trainer.evolve.seeds import derive_seed
from trainer.evolve.step import Offspring


def next_manifest(
    pop: Population,
    g: int,
    trained: dict[str, LoraWeights],
    losses: dict[str, list[float]],
    fitness: dict[str, float],
    elite: list[int],
    replaced: list[int],
    children: list[Offspring],
    seed: int,
    config_hash: str,
) -> tuple[Manifest, dict[str, LoraWeights], list[dict[str, Any]]]:
    """Generation `g`: survivors with their fitness and (when trained) new weights, children in their slots."""
    new_members: list[Member] = []
    adapters: dict[str, LoraWeights] = {}
    info: list[dict[str, Any]] = []
    child_for = dict(zip(replaced, children))
    for i, m in enumerate(pop.manifest.members):
        if i in child_for:
            child = child_for[i]
            member = _child_member(child, m, pop.member(child.fitter), fitness, g, seed)
            adapters[child.name] = child.weights
            status, ops = "child", child.operators
        else:
            member = _survivor_member(m, g, fitness[m.name], losses[m.name])
            if losses[m.name]:
                adapters[m.name] = trained[m.name]
            status, ops = ("elite" if i in elite else "survivor"), []
        new_members.append(member)
        info.append(
            {
                "name": member.name,
                "parents": list(member.parents),
                "born_generation": member.born_generation,
                "rank": member.rank,
                "fitness": member.fitness,
                "status": status,
                "operators": ops,
                "scored_fitness": None if status == "child" else round(fitness[member.name], 6),
                "train_steps": len(losses.get(member.name, [])),
            }
        )
    manifest = pop.manifest.model_copy(
        update={
            "generation": g,
            "members": new_members,
            "config_hash": config_hash,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    return _validated(manifest, g), adapters, info


def _child_member(
    child: Offspring, replaced: Member, parent: Member, fitness: dict[str, float], g: int, seed: int
) -> Member:
    """The manifest entry of a child: its parents' mean fitness, the fitter parent's learning rate,
    the focus domain (niche) of the slot it takes."""
    inherited = sum(fitness[p] for p in child.parents) / len(child.parents)
    return Member(
        name=child.name,
        rank=child.weights.rank,
        alpha=child.weights.alpha,
        fitness=round(inherited, 6),
        parents=child.parents,
        born_generation=g,
        seed=derive_seed(seed, "child", g, child.name),
        info={
            **({"lr": parent.info["lr"]} if parent.info.get("lr") is not None else {}),
            "operators": child.operators,
            "replaced": replaced.name,
            **({"focus_domain": replaced.info["focus_domain"]} if replaced.info.get("focus_domain") else {}),
            "fitness_inherited": True,
            **({"selected_with_held_out": child.held_out} if child.held_out else {}),
        },
    )


def _survivor_member(m: Member, g: int, fitness: float, losses: list[float]) -> Member:
    """A member that stays: this generation's fitness, its last loss, a new folder when it trained."""
    return m.model_copy(
        update={
            "path": f"members/{m.name}-g{g}" if losses else m.path,
            "fitness": round(fitness, 6),
            "info": {**m.info, "train_loss": losses[-1] if losses else None},
        }
    )


def run_lifecycle(
    pop: Population,
    g: int,
    trained: dict[str, LoraWeights],
    fitness: dict[str, float],
    replaced: list[int],
    children: list[Offspring],
    cfg: EvolveConfig,
) -> LifecycleResult:
    """The lifecycle step on the population as it will be committed: children in their slots, at age 0.

    Children carry the mean fitness of their parents (as the manifest records it) so the
    step is defined for them, but at age 0 they never die. The elites are the top
    `evolution.elite` by this generation's fitness, the same members `evolutionary_step`
    keeps, and protected even when evolution itself is off.
    """
    if not cfg.lifecycle.enabled:
        return LifecycleResult()
    names = list(pop.names)
    weights = dict(trained)
    fit = dict(fitness)
    ages = {m.name: g - m.born_generation for m in pop.manifest.members}
    for i, child in zip(replaced, children):
        names[i] = child.name
        weights[child.name] = child.weights
        fit[child.name] = sum(fitness[p] for p in child.parents) / len(child.parents)
        ages[child.name] = 0
    elite = operators.elites([fitness[m] for m in pop.names], min(cfg.evolution.elite, len(names)))
    return lifecycle_step(
        names,
        {m: weights[m] for m in names},
        {m: fit[m] for m in names},
        {m: ages[m] for m in names},
        elite,
        cfg.lifecycle,
        g,
        cfg.seed,
    )


def apply_lifecycle(
    manifest: Manifest,
    adapters: dict[str, LoraWeights],
    info: list[dict[str, Any]],
    life: LifecycleResult,
    g: int,
    cfg: EvolveConfig,
) -> tuple[Manifest, dict[str, LoraWeights], list[dict[str, Any]]]:
    """The next generation's manifest, adapters and history entries with the lifecycle's effects.

    Changed members get a new folder `members/<name>-g<g>` (unless they already have one
    this generation: trained members and children); dead members give their slot to the
    newborns, whose status is "reallocated"; survivors' status becomes "inherited" or
    "mutated" (their entry's `lifecycle` lists every event).
    """
    if life.empty:
        return manifest, adapters, info
    members = list(manifest.members)
    adapters = dict(adapters)
    info = [dict(x) for x in info]
    index = {m.name: i for i, m in enumerate(members)}
    received = set(life.inherited.values())
    for name, w in life.changed.items():
        i = index[name]
        if name not in adapters:  # its folder belongs to the previous generation, which must stay intact
            members[i] = members[i].model_copy(update={"path": f"members/{name}-g{g}"})
        adapters[name] = w
        events = [e for e, hit in (("inherited", name in received), ("mutated", name in life.mutated)) if hit]
        info[i].update(
            status=events[0],
            lifecycle=events,
            operators=[*info[i]["operators"], *(["svd"] if name in life.mutated else [])],
        )
    for slot, name, w, parents in life.newborn:
        dead = members[slot]
        source = members[index[parents[0]]] if parents else dead
        members[slot], info[slot] = _newborn(name, w, list(parents), dead, source, g, cfg)
        adapters.pop(dead.name, None)
        adapters[name] = w
    return _validated(manifest.model_copy(update={"members": members}), g), adapters, info


def _newborn(
    name: str, w: LoraWeights, parents: list[str], dead: Member, source: Member, g: int, cfg: EvolveConfig
) -> tuple[Member, dict[str, Any]]:
    """The manifest entry and history entry of a member re-seeded into `dead`'s slot (from `source`, or fresh)."""
    member = Member(
        name=name,
        rank=w.rank,
        alpha=w.alpha,
        fitness=source.fitness if parents else None,
        parents=list(parents),
        born_generation=g,
        seed=derive_seed(cfg.seed, "newborn", g, name),
        info={
            **({"lr": source.info["lr"]} if source.info.get("lr") is not None else {}),
            "lifecycle": "reallocated",
            "replaced": dead.name,
            **({"focus_domain": dead.info["focus_domain"]} if dead.info.get("focus_domain") else {}),
            **({"fitness_inherited": True} if parents else {}),
        },
    )
    entry = {
        "name": name,
        "parents": list(parents),
        "born_generation": g,
        "rank": w.rank,
        "fitness": member.fitness,
        "status": "reallocated",
        "lifecycle": ["reallocated"],
        "operators": ["svd"] if parents and cfg.lifecycle.svd_mutation > 0 else [],
        "scored_fitness": None,
        "train_steps": 0,
        "replaced": dead.name,
    }
    return member, entry


def _validated(manifest: Manifest, g: int) -> Manifest:
    """`manifest` re-validated as a whole; a clash (e.g. a new name that a member has) is an EvolveError."""
    try:
        return Manifest.model_validate(manifest.model_dump())
    except ValueError as e:
        raise EvolveError(f"generation {g} would be invalid: {e}") from e
