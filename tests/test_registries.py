"""Every registry of names a user writes in a config: each name is documented, accepted, and typos are refused.

After mergekit's tests/test_merge_method_interface.py. A registry is one row of :data:`REGISTRIES`:
its names are read from the registry itself (never copied here), so an entry added to a registry is
covered as soon as it exists. For every registered name:

- README.md mentions it in backticks (a user can find it);
- the config that names it validates, given as a YAML file would give it (a dict);
- and a name that is not registered is refused when the config is read, with every valid name in
  the message.

Then a few interface checks, in the spirit of mergekit's: every registered router variant and
reallocation behaves as its registry promises.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lora_factories import make_lora
from pydantic import ValidationError

from ensemble_serve.protocol import EnsembleOptions
from ensemble_serve.shared.router import Router, RouterConfig, safe_gates
from ensemble_serve.shared.router.model import DEFAULT_FEATURE, ROUTER_VARIANTS
from ensemble_serve.shared.voting import VOTE_RULES
from ensemble_serve.shared.voting.answers import MODES
from trainer.evolve import operators
from trainer.evolve.config import EvolveConfig
from trainer.evolve.fitness import FITNESS_TERMS, SCOPES
from trainer.evolve.lifecycle import REALLOCATION
from trainer.router.config import RouterCommandConfig
from trainer.router.train import RouterTrainConfig
from trainer.study.ablate.config import ABLATION_FACTORS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
UNKNOWN = "no_such_name"


@dataclass(frozen=True)
class Registry:
    """One registry of names: where the names come from and how a config names one."""

    kind: str
    names: tuple[str, ...]
    """Every name the config accepts (the registry's keys, plus an off switch where there is one)."""
    build: Callable[[str], str]
    """Validate a config that names `name`, from the dict a YAML file would give; the name it holds then."""
    quoted: bool = True
    """Whether the refusal quotes the valid names ('a', 'b') or lists them bare (a, b)."""


def _evolution(key: str) -> Callable[[str], str]:
    return lambda name: getattr(EvolveConfig.model_validate({"evolution": {key: name}}).evolution, key)


# --------------------------------------------------------------------------- trainer registries

TRAINER_REGISTRIES = [
    Registry(
        "fitness term",
        tuple(FITNESS_TERMS),
        lambda name: next(iter(EvolveConfig.model_validate({"fitness": {name: 1.0}}).fitness)),
    ),
    Registry("fitness scope", SCOPES, lambda name: EvolveConfig.model_validate({"fitness_scope": name}).fitness_scope),
    Registry("selection", tuple(operators.SELECTION), _evolution("selection")),
    Registry("crossover", (*operators.CROSSOVER, operators.SKIP), _evolution("crossover")),
    Registry("mutation", (*operators.MUTATION, operators.SKIP), _evolution("mutation")),
    Registry("replacement", tuple(operators.REPLACEMENT), _evolution("replacement")),
    Registry("rank policy", operators.RANK_POLICIES, _evolution("rank_policy")),
    Registry(
        "reallocation",
        tuple(REALLOCATION),
        lambda name: (
            EvolveConfig.model_validate({"lifecycle": {"enabled": True, "reallocation": name}}).lifecycle.reallocation
        ),
    ),
    Registry(
        "router variant",
        tuple(ROUTER_VARIANTS),
        lambda name: RouterCommandConfig.model_validate({"variant": name}).variant,
    ),
    Registry(
        "router variant (training)",
        tuple(ROUTER_VARIANTS),
        lambda name: RouterTrainConfig.model_validate({"variant": name}).variant,
    ),
]

# --------------------------------------------------------------------------- ensemble_serve registries
# --------------------------------------------------------------------------- serving registries

# The names a request writes in its `ensemble` object: vote rules and answer modes, read from their registries.


def _ensemble_option(key: str) -> Callable[[str], str]:
    """A request's `ensemble` object naming `name` (what the openai client sends in `extra_body`)."""
    return lambda name: getattr(EnsembleOptions.model_validate({key: name}), key)


ENSEMBLE_REGISTRIES: list[Registry] = [
    Registry("vote rule", tuple(VOTE_RULES), _ensemble_option("vote"), quoted=False),
    Registry("answer mode", MODES, _ensemble_option("answer"), quoted=False),
]

REGISTRIES = TRAINER_REGISTRIES + ENSEMBLE_REGISTRIES
NAMED = [pytest.param(r, name, id=f"{r.kind}:{name}") for r in REGISTRIES for name in r.names]


# --------------------------------------------------------------------------- every name


@pytest.mark.parametrize(("registry", "name"), NAMED)
def test_every_registered_name_is_documented(registry: Registry, name: str) -> None:
    assert f"`{name}`" in README, f"README.md does not mention the {registry.kind} `{name}`"


@pytest.mark.parametrize(("registry", "name"), NAMED)
def test_every_registered_name_is_accepted_by_the_config(registry: Registry, name: str) -> None:
    assert registry.build(name) == name


@pytest.mark.parametrize("registry", REGISTRIES, ids=[r.kind for r in REGISTRIES])
def test_an_unknown_name_is_refused_listing_the_valid_ones(registry: Registry) -> None:
    with pytest.raises(ValidationError) as info:
        registry.build(UNKNOWN)
    message = str(info.value)
    assert UNKNOWN in message
    missing = [name for name in registry.names if (f"'{name}'" if registry.quoted else name) not in message]
    assert not missing, f"the refusal of an unknown {registry.kind} does not list {missing}: {message}"


def test_every_registry_has_names() -> None:
    for registry in REGISTRIES:
        assert registry.names and len(set(registry.names)) == len(registry.names), registry.kind


# --------------------------------------------------------------------------- names used elsewhere


def test_ablation_levels_are_registered_names() -> None:
    assert set(ABLATION_FACTORS["router"]) == set(ROUTER_VARIANTS)
    assert set(ABLATION_FACTORS["scope"]) == set(SCOPES)


def test_every_operator_is_found_by_get_operator() -> None:
    for kind, registry in operators.REGISTRIES.items():
        for name, fn in registry.items():
            assert operators.get_operator(kind, name) is fn
            assert operators.check_setting(kind, name) == name
        with pytest.raises(operators.OperatorError, match=re.escape(str(sorted(registry)))):
            operators.get_operator(kind, UNKNOWN)


# --------------------------------------------------------------------------- interfaces


@pytest.mark.parametrize("variant", list(ROUTER_VARIANTS))
def test_every_router_variant_gives_gates_the_server_accepts(variant: str) -> None:
    members = ["m00", "m01", "m02"]
    cfg = RouterConfig(variant=variant, members=members, input_dim=4, base_model="tiny-base")
    assert cfg.feature == DEFAULT_FEATURE[variant] == ROUTER_VARIANTS[variant].default_feature
    router = Router(cfg)
    assert (router.phi is not None) == ROUTER_VARIANTS[variant].floored
    gates, reason = safe_gates(router, torch.randn(5, 4, generator=torch.Generator().manual_seed(0)))
    assert reason is None and gates is not None and tuple(gates.shape) == (5, len(members))


@pytest.mark.parametrize("reallocation", list(REALLOCATION))
@pytest.mark.parametrize("svd_mutation", [0.0, 0.1])
def test_every_reallocation_gives_a_newborn_of_the_right_rank(reallocation: str, svd_mutation: float) -> None:
    dead, fittest = make_lora(4, seed=1), make_lora(8, seed=2)
    current = {"m01": fittest}
    weights, parents = REALLOCATION[reallocation](dead, "m01", current, svd_mutation, torch.Generator().manual_seed(0))
    assert parents in ([], ["m01"])
    assert weights.rank == (fittest.rank if parents else dead.rank)
    assert weights.modules() == dead.modules()
    assert all(weights.factors[m][0] is not fittest.factors[m][0] for m in weights.modules())  # never shared storage
