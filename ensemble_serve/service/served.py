"""What is served, as one immutable snapshot: the population and everything read from it.

A request takes the service's :class:`Served` once, when it starts (``served = service.served``), and
hands that object to everything it does: the model names it accepts, its `ensemble` options, the
plan (members, router, reliability table), the vote's weights, the response's `ensemble.population`.
A population refresh builds a new :class:`Served` off to the side and swaps it in with one
assignment, so a request never sees two populations, whatever it awaits in between.

`version` names the snapshot's population: ``"<generation>-<12 hex digits>"``, the digits a sha256 of
the manifest as it was read (every field of `population.json`: members, weights, defaults, router,
reliability table). Two manifests of one generation that differ in anything (e.g. new defaults set
with `ensemble-serve defaults`) get different versions; the same manifest read twice gets the same.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from ensemble_serve.errors import NotFoundError
from ensemble_serve.protocol import EnsembleOptions, PopulationVersion
from ensemble_serve.service.calibration import Calibration
from ensemble_serve.service.routing import Routing
from ensemble_serve.shared.population import Population

log = logging.getLogger("ensemble_serve")

VERSION_HEX = 12  # hex digits of the manifest's sha256 in a version


@dataclass(frozen=True)
class ServeSettings:
    """Names and defaults of what is served."""

    ensemble_name: str
    default_members: int | None = None  # None: all members
    semantic_threshold: float = 0.8
    route: bool = True  # use the population's router (when it has one) to pick and weight members
    mixture_cache: int = 32  # mixed adapters kept (ensemble.mode mixture)


def population_version(population: Population) -> str:
    """``"<generation>-<sha256 of the manifest, first 12 hex digits>"``: which population answered."""
    digest = hashlib.sha256(population.manifest.model_dump_json().encode()).hexdigest()
    return f"{population.manifest.generation}-{digest[:VERSION_HEX]}"


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
class Served:
    """One population as served: its router, reliability table, request defaults, the settings, its version."""

    population: Population
    routing: Routing
    calibration: Calibration
    defaults: EnsembleOptions
    settings: ServeSettings
    version: str

    @classmethod
    def load(cls, population: Population, settings: ServeSettings, previous: Served | None = None) -> Served:
        """Read what `population` carries (router, reliability table, defaults); the slow part of a refresh.

        `previous` lends its base-model feature extractor (the base model cannot change under a server).
        """
        if settings.route:
            routing = Routing.load(population, previous.routing if previous is not None else None)
        else:
            routing = Routing()
        features = routing.features or (previous.calibration.features if previous is not None else None)
        return cls(
            population=population,
            routing=routing,
            calibration=Calibration.load(population, features),
            defaults=ensemble_defaults(population),
            settings=settings,
            version=population_version(population),
        )

    # ------------------------------------------------------------------ names

    @property
    def generation(self) -> int:
        return self.population.manifest.generation

    @property
    def about(self) -> PopulationVersion:
        """What `ensemble.population` reports: the generation and the version."""
        return PopulationVersion(generation=self.generation, version=self.version)

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

    # ------------------------------------------------------------------ a request's options and weights

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
        """The population's member weights: the manifest's `voting_weights`, else each member's fitness (>= 0).

        What a `weighted` vote counts with when no router weighs the prompt's members (see
        `EnsemblePlan.vote_weights`).
        """
        manifest = self.population.manifest
        if manifest.voting_weights:
            return dict(manifest.voting_weights)
        return {m.name: max(m.fitness, 0.0) for m in manifest.members if m.fitness is not None}
