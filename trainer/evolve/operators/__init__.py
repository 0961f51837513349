"""Evolutionary operators on a population of LoRA adapters, each a named function in a registry.

Four kinds, looked up by name from the evolution config with `get_operator(kind, name)`; the
registries below are the one list of names, and the config checks its settings against them with
`check_setting` when it is read:

- selection `(fitness, k, rng, **opts) -> list[int]`: indices of k parents (repetition allowed);
  each rule's `opts` have a model in :data:`SELECTION_OPTIONS`, checked by `check_selection_options`;
- crossover `(parents, weights, rank, alpha, rng, *, rank_policy="error") -> LoraWeights`;
- mutation `(w, strength, rng) -> LoraWeights`;
- replacement `(fitness, n_offspring, elite) -> list[int]`: members the offspring replace.

Randomness: every random choice, index draws included, comes from the one `torch.Generator`
passed in (never the global torch, `random` or numpy state), and modules are visited in sorted
order, so the same seed gives the same result bit for bit and runs in parallel do not interfere.

Crossover and mutation work on each module's *update* dW = scale * B @ A, not on the factors:
the factors of an update are only defined up to an invertible R (B R, R^-1 A), so two adapters
trained independently have unrelated factor bases and averaging factors would mix noise. A
child is brought back to the requested rank and alpha with the truncated SVD of its update
(`ensemble_serve.shared.lora.refactor_low_rank`, which never forms the dense matrix).

Fitness is "higher is better" everywhere; NaN or infinite fitness is refused (`OperatorError`)
rather than sorted somewhere arbitrary.

Layout: :mod:`.selection`, :mod:`.crossover`, :mod:`.mutation`, :mod:`.replacement` hold the
operators, :mod:`.common` what they share; this module holds the registries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pydantic import ValidationError

from ensemble_serve.shared.lora import LoraWeights
from trainer.evolve.operators.common import OperatorError
from trainer.evolve.operators.crossover import (
    RANK_POLICIES,
    layer_wise,
    layer_wise_plan,
    svd_interpolate,
    weighted_average,
)
from trainer.evolve.operators.mutation import DROPOUT_MAX, dropout, gaussian, svd
from trainer.evolve.operators.replacement import generational, weakest
from trainer.evolve.operators.selection import (
    FitnessProportionalOptions,
    SelectionOptions,
    TournamentOptions,
    TruncationOptions,
    elites,
    fitness_proportional,
    tournament,
    truncation,
)

__all__ = [
    "CROSSOVER",
    "DROPOUT_MAX",
    "MUTATION",
    "RANK_POLICIES",
    "REGISTRIES",
    "REPLACEMENT",
    "SELECTION",
    "SELECTION_OPTIONS",
    "SKIP",
    "SKIPPABLE",
    "OperatorError",
    "check_selection_options",
    "check_setting",
    "dropout",
    "elites",
    "fitness_proportional",
    "gaussian",
    "generational",
    "get_operator",
    "layer_wise",
    "layer_wise_plan",
    "svd",
    "svd_interpolate",
    "tournament",
    "truncation",
    "weakest",
    "weighted_average",
]


SELECTION: dict[str, Callable[..., list[int]]] = {
    "truncation": truncation,
    "tournament": tournament,
    "fitness_proportional": fitness_proportional,
}
SELECTION_OPTIONS: dict[str, type[SelectionOptions]] = {
    "truncation": TruncationOptions,
    "tournament": TournamentOptions,
    "fitness_proportional": FitnessProportionalOptions,
}
"""The options each selection rule takes (its keyword-only parameters): the evolution config's `selection_options`."""
CROSSOVER: dict[str, Callable[..., LoraWeights]] = {
    "weighted_average": weighted_average,
    "svd_interpolate": svd_interpolate,
    "layer_wise": layer_wise,
}
MUTATION: dict[str, Callable[[LoraWeights, float, torch.Generator], LoraWeights]] = {
    "gaussian": gaussian,
    "dropout": dropout,
    "svd": svd,
}
REPLACEMENT: dict[str, Callable[[Sequence[float], int, Sequence[int]], list[int]]] = {
    "weakest": weakest,
    "generational": generational,
}
REGISTRIES: dict[str, dict[str, Any]] = {
    "selection": SELECTION,
    "crossover": CROSSOVER,
    "mutation": MUTATION,
    "replacement": REPLACEMENT,
}


SKIP = "none"
"""The `crossover` or `mutation` setting that skips the step: not an operator, so `get_operator` refuses it."""
SKIPPABLE = ("crossover", "mutation")


def get_operator(kind: str, name: str) -> Callable[..., Any]:
    """The operator `name` of `kind`; unknown names fail listing what exists (config typos surface early)."""
    if kind not in REGISTRIES:
        raise OperatorError(f"unknown operator kind {kind!r}; known kinds: {sorted(REGISTRIES)}")
    registry = REGISTRIES[kind]
    if name not in registry:
        raise OperatorError(f"unknown {kind} operator {name!r}; known: {sorted(registry)}")
    return registry[name]


def check_setting(kind: str, name: str) -> str:
    """`name` if the evolution config may set `kind` to it: an operator of that kind, or `none` where skippable."""
    if kind in SKIPPABLE and name == SKIP:
        return name
    try:
        get_operator(kind, name)
    except OperatorError as e:
        if kind in SKIPPABLE:
            raise OperatorError(f"{e}, or {SKIP!r} to skip the step") from None
        raise
    return name


def selection_options_help() -> str:
    """Each rule's options and defaults, as the config's field description lists them."""
    return "; ".join(
        f"{rule}: " + ", ".join(f"{k} (default {f.default:g})" for k, f in SELECTION_OPTIONS[rule].model_fields.items())
        for rule in SELECTION
    )


def check_selection_options(rule: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` as given, if selection `rule` takes them: known names, right types, in range.

    The refusal (:class:`OperatorError`) names the rule and each bad option, and for an option of
    another rule says whose it is, so `selection_options: {size: 3}` under `truncation` reads as
    the mix-up it is. The options are returned unchanged (not with the model's defaults filled in),
    so a config's dump, and the run's config hash, stay what they were.
    """
    get_operator("selection", rule)  # an unknown rule is refused listing the rules
    model = SELECTION_OPTIONS[rule]
    known = list(model.model_fields)
    problems = []
    for key in options:
        if key in model.model_fields:
            continue
        owners = [r for r, m in SELECTION_OPTIONS.items() if key in m.model_fields]
        whose = f" (an option of {', '.join(owners)})" if owners else ""
        problems.append(f"unknown option {key!r}{whose}")
    if not problems:
        try:
            model.model_validate(dict(options))
        except ValidationError as e:
            problems = [
                f"option {'.'.join(map(str, err['loc']))!r}: {err['msg']}, got {err['input']!r}" for err in e.errors()
            ]
    if problems:
        takes = ", ".join(f"{k} (default {model.model_fields[k].default:g})" for k in known) or "no options"
        raise OperatorError(f"selection {rule!r}: " + "; ".join(problems) + f"; {rule} takes {takes}")
    return dict(options)
