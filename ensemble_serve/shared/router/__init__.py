"""The mixture router: given a prompt, one weight (gate) per population member.

The server uses the gates to pick the top-k members a request fans out to and to weight their
votes. Two variants, ``softmax`` (the zero-sum baseline) and ``sigmoid_floor`` (parallel floored
gates, the rewrite the design is built on), chosen by :class:`RouterConfig` so that the ablation
harness can compare them.

- :mod:`.model`: the config (``router.json``), the temperature anneal and the ``torch`` module.
- :mod:`.features`: prompt features from the frozen base, computed the same way in training and serving.
- :mod:`.store`: the reserved ``router/`` folder of a population directory, written atomically
  and checked against the population on load.
- :mod:`.gates`: vetting gates before they steer a request, top-k and vote weights.

This package is the inference side; training lives in the trainer, which writes through
:func:`save_router`. Only torch, safetensors and pydantic are imported at module level;
transformers loads when :class:`RouterFeatures` is built. Nothing here imports the trainer.
"""

from ensemble_serve.shared.router.features import RouterFeatures
from ensemble_serve.shared.router.gates import normalised_weights, safe_gates, top_k
from ensemble_serve.shared.router.model import (
    DEFAULT_FEATURE,
    ROUTER_FORMAT_VERSION,
    ROUTER_VARIANTS,
    Router,
    RouterConfig,
    RouterError,
    RouterVariant,
    anneal_temperature,
)
from ensemble_serve.shared.router.store import (
    ROUTER_CONFIG,
    ROUTER_DIR,
    ROUTER_WEIGHTS,
    load_population_router,
    load_router,
    save_router,
)

__all__ = [
    "DEFAULT_FEATURE",
    "ROUTER_CONFIG",
    "ROUTER_DIR",
    "ROUTER_FORMAT_VERSION",
    "ROUTER_VARIANTS",
    "ROUTER_WEIGHTS",
    "Router",
    "RouterConfig",
    "RouterError",
    "RouterFeatures",
    "RouterVariant",
    "anneal_temperature",
    "load_population_router",
    "load_router",
    "normalised_weights",
    "safe_gates",
    "save_router",
    "top_k",
]
