"""The factorial design of an ablation: its cells, every switch's level in a cell, and their names.

A cell is one combination of the varied factors' levels (:data:`trainer.config.ABLATION_FACTORS`,
reference level first); a switch the ablation neither varies nor fixes takes its
:data:`DEFAULT_LEVELS` level. Cells that differ only in the router share an evolve *stage*
(:data:`STAGE_FACTORS`), and :func:`plan` keeps them adjacent so that the stage runs once.
:func:`config_hash` names what changes a cell's result: an ablation folder holds one hash.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from trainer.study.ablate.config import ABLATION_FACTORS, DEFAULT_LEVELS, AblateConfig

__all__ = [
    "DEFAULT_LEVELS",
    "STAGE_FACTORS",
    "AblationError",
    "Cell",
    "cell_id",
    "config_hash",
    "design_cells",
    "levels_of",
    "plan",
    "stage_id",
]

STAGE_FACTORS = ("init", "evolution", "scope", "lifecycle", "inheritance", "alignment")
"""The switches that change the evolve run (the router only changes what is trained on its result)."""

PROBE_FACTORS = ("inheritance", "alignment")
"""Stage switches named in a stage's folder only away from their default level (older folders keep their names)."""


class AblationError(ValueError):
    """An ablation that cannot run or be reported: its folder holds another config, or no cell finished."""


def design_cells(factors: Sequence[str], design: str) -> list[dict[str, bool]]:
    """The cells of a two-level design, as {factor: on}: full 2^k, or the half fraction I = product of all.

    The half fraction keeps the cells whose levels, coded -1/+1, multiply to +1 (the principal
    fraction), so every main effect is balanced over the other factors.
    """
    cells = [dict(zip(factors, bits)) for bits in itertools.product((False, True), repeat=len(factors))]
    if design == "full":
        return cells
    if design == "half":
        return [c for c in cells if math.prod(1 if on else -1 for on in c.values()) == 1]
    raise AblationError(f"unknown design {design!r}; known: full, half")


def levels_of(cfg: AblateConfig, cell: Mapping[str, bool]) -> dict[str, str]:
    """Every switch's level in a cell: the cell's for varied factors, else fixed, else the default."""
    out = {}
    for name, (ref, test) in ABLATION_FACTORS.items():
        if name in cell:
            out[name] = test if cell[name] else ref
        else:
            out[name] = cfg.fixed.get(name, DEFAULT_LEVELS[name])
    return out


def cell_id(levels: Mapping[str, str], factors: Sequence[str]) -> str:
    """Folder-safe name of a cell from its varied factors' levels, e.g. ``router-softmax__scope-global``."""
    return "__".join(f"{f}-{levels[f]}" for f in factors)


def stage_id(levels: Mapping[str, str]) -> str:
    """Folder-safe name of an evolve stage: its stage switches' levels (a probe's only away from its default)."""
    return "__".join(
        f"{f}-{levels[f]}" for f in STAGE_FACTORS if f not in PROBE_FACTORS or levels[f] != DEFAULT_LEVELS[f]
    )


@dataclass(frozen=True)
class Cell:
    """One cell of the design: its coded levels (varied factors), every switch's level, and its names."""

    coded: tuple[tuple[str, bool], ...]
    levels: dict[str, str]
    id: str
    stage: str


def plan(cfg: AblateConfig) -> list[Cell]:
    """The design's cells, ordered so that cells sharing an evolve stage are adjacent."""
    cells = []
    for c in design_cells(cfg.factors, cfg.design):
        levels = levels_of(cfg, c)
        cells.append(Cell(tuple(sorted(c.items())), levels, cell_id(levels, cfg.factors), stage_id(levels)))
    return sorted(cells, key=lambda c: (c.stage, c.id))


def config_hash(cfg: AblateConfig) -> str:
    """Hash of everything that changes a cell's result (not the seeds, the folder, or what only the report reads)."""
    payload = cfg.model_dump(mode="json", exclude={"seeds", "out", "threads", "gpu_memory_utilization", "interactions"})
    if payload.get("base_perturbation") is None:  # off: the hash of a config from before the probe existed
        payload.pop("base_perturbation", None)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
