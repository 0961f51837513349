"""Configs of the offline commands: YAML files go straight into frozen pydantic models.

Every field is documented where it is declared; the CLI help is generated from these
descriptions, and CLI flags override the file. One module per command (``substrate``, ``init``,
``evaluate``, ``evolve`` with its evolution and lifecycle sections, ``router``, ``ablate``) plus
``common`` (the frozen base and the shared checks). A name that picks code (a fitness term, an
operator, a rank policy, a reallocation, a fitness scope, a router variant) is checked against the
registry next to that code when the config is read; the refusal lists the names that exist.

Import from here: ``from trainer.config import EvolveConfig``.
"""

from ensemble_serve.shared.cliutil import ConfigError, load_config
from trainer.config.ablate import ABLATION_FACTORS, HARNESS_EVOLVE_KEYS, AblateConfig
from trainer.config.common import ALL_DOMAINS
from trainer.config.evaluate import EvalConfig
from trainer.config.evolve import EvolutionConfig, EvolveConfig, LifecycleConfig
from trainer.config.init import InitConfig
from trainer.config.router import RouterCommandConfig
from trainer.config.substrate import SubstrateConfig

__all__ = [
    "ABLATION_FACTORS",
    "ALL_DOMAINS",
    "HARNESS_EVOLVE_KEYS",
    "AblateConfig",
    "ConfigError",
    "EvalConfig",
    "EvolutionConfig",
    "EvolveConfig",
    "InitConfig",
    "LifecycleConfig",
    "RouterCommandConfig",
    "SubstrateConfig",
    "load_config",
]
