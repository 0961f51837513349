"""Where the shipped default lives: the embedded sandbox substrate and its population.

``ensemble-serve up`` with no population serves :data:`EMBEDDED_POPULATION` under the model
name :data:`EMBEDDED_NAME`; the trainer (ablation starts, tests, benchmarks) starts from the same
folder. These are paths inside the installed package, defined once here so that both halves
read them from shared code.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EMBEDDED_NAME", "EMBEDDED_POPULATION", "EMBEDDED_ROOT", "EMBEDDED_SUBSTRATE"]

EMBEDDED_ROOT = Path(__file__).resolve().parent.parent / "embedded"
"""The folder of the shipped default: ``substrate/`` (the base model) and ``population/``."""
EMBEDDED_POPULATION = EMBEDDED_ROOT / "population"
EMBEDDED_SUBSTRATE = EMBEDDED_ROOT / "substrate"
EMBEDDED_NAME = "sandbox-ensemble"
"""The served model name of the embedded population."""
