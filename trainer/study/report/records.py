"""The population history the report reads, type-checked: ``history.jsonl`` into :class:`GenerationRecord`.

Every history key except ``generation`` is optional (missing ones are empty). A field of the
wrong type raises :class:`ReportError` naming the generation; a generation recorded twice (a
resumed run) keeps its last record. ``population.json`` is optional too: without it (or when
it is invalid) the report uses the history alone.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ensemble_serve.shared.population import (
    HISTORY_FILE,
    MANIFEST_FILE,
    Manifest,
    PopulationError,
    read_history,
    read_manifest,
)

__all__ = [
    "HELDOUT_KEYS",
    "GenerationRecord",
    "MemberRecord",
    "ReportError",
    "load_records",
    "parse_records",
    "read_manifest_or_none",
]

logger = logging.getLogger(__name__)

#: Held-out scalar keys, in column order, with their display names.
HELDOUT_KEYS = (
    ("best_member", "best member"),
    ("mean_member", "mean member"),
    ("ensemble_vote", "ensemble vote"),
    ("oracle", "oracle"),
)


class ReportError(ValueError):
    """The history cannot be reported on (missing, empty, or a field of the wrong type)."""


@dataclass(frozen=True)
class MemberRecord:
    """One member as recorded in one generation's history line (or in population.json)."""

    name: str
    parents: tuple[str, ...] = ()
    born_generation: int | None = None
    rank: int | None = None
    fitness: float | None = None
    status: str | None = None
    heldout: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationRecord:
    """The fields of one history line the report uses, type-checked; missing ones are empty."""

    generation: int
    run_id: str | None = None
    labels: str | None = None
    fitness: dict[str, float] = field(default_factory=dict)
    diversity: dict[str, float] = field(default_factory=dict)
    members: tuple[MemberRecord, ...] = ()
    heldout: dict[str, float] = field(default_factory=dict)
    vote_agreement: tuple[float, ...] = ()
    ensemble_domains: dict[str, float] = field(default_factory=dict)
    levels: dict[str, dict[str, float]] = field(default_factory=dict)
    """Held-out figures per level ("3" -> {"ensemble_vote": ..., "best_member": ...})."""
    label_audit: dict[str, float] = field(default_factory=dict)
    """Label precision, recall and coverage against the hidden answers (reported only)."""
    backoffs: int = 0
    """Curriculum back-offs this generation."""
    skipped: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds per phase (propose, generate, score, validate, train, guard, evolve, eval)."""
    guard: dict[str, dict[str, float]] = field(default_factory=dict)
    """The forgetting guard's figures per member: {"before": ..., "after": ...} (no "after": did not train)."""
    rolled_back: tuple[str, ...] = ()
    """The members the guard rolled back this generation."""


class _Checker:
    """Type checks for one history record; every error names the generation."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, expected: str, value: Any) -> ReportError:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return ReportError(
            f"{HISTORY_FILE}, {self.where}: `{key}` must be {expected}, got {type(value).__name__} {shown}"
        )

    def number(self, value: Any, key: str) -> float | None:
        """A finite float, or None for a missing/null/non-finite value."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, "a number", value)
        x = float(value)
        return x if math.isfinite(x) else None

    def integer(self, value: Any, key: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "an integer", value)
        return value

    def string(self, value: Any, key: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(key, "a string", value)
        return value

    def mapping(self, value: Any, key: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, "an object", value)
        return value

    def sequence(self, value: Any, key: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            raise self.fail(key, "a list", value)
        return list(value)

    def number_map(self, value: Any, key: str) -> dict[str, float]:
        """An object of numbers; null and non-finite values are dropped."""
        out: dict[str, float] = {}
        for k, v in self.mapping(value, key).items():
            x = self.number(v, f"{key}.{k}")
            if x is not None:
                out[str(k)] = x
        return out


def _parse_member(c: _Checker, raw: Any, key: str) -> MemberRecord:
    if not isinstance(raw, Mapping):
        raise c.fail(key, "an object", raw)
    name = c.string(raw.get("name"), f"{key}.name")
    if not name:
        raise c.fail(f"{key}.name", "a non-empty string", raw.get("name"))
    key = f"members[{name}]"
    parents = tuple(
        p
        for i, x in enumerate(c.sequence(raw.get("parents"), f"{key}.parents"))
        if (p := c.string(x, f"{key}.parents[{i}]"))
    )
    return MemberRecord(
        name=name,
        parents=parents,
        born_generation=c.integer(raw.get("born_generation"), f"{key}.born_generation"),
        rank=c.integer(raw.get("rank"), f"{key}.rank"),
        fitness=c.number(raw.get("fitness"), f"{key}.fitness"),
        status=c.string(raw.get("status"), f"{key}.status"),
        heldout=c.number_map(raw.get("heldout"), f"{key}.heldout"),
    )


def _parse_record(raw: Mapping[str, Any], index: int, previous: int | None) -> GenerationRecord:
    """Check and convert one history line (``index`` is 1-based, for messages)."""
    gen_raw = raw.get("generation")
    if gen_raw is None:
        generation = 0 if previous is None else previous + 1
        logger.warning("%s: record %d has no `generation`; taking it as generation %d", HISTORY_FILE, index, generation)
    elif isinstance(gen_raw, bool) or not isinstance(gen_raw, int):
        raise ReportError(
            f"{HISTORY_FILE}, record {index}: `generation` must be an integer, got {type(gen_raw).__name__} {gen_raw!r}"
        )
    else:
        generation = gen_raw
    c = _Checker(f"generation {generation}")
    members = [_parse_member(c, m, f"members[{i}]") for i, m in enumerate(c.sequence(raw.get("members"), "members"))]
    heldout_raw = c.mapping(raw.get("heldout"), "heldout")
    heldout: dict[str, float] = {}
    for k in ("problems", *(k for k, _ in HELDOUT_KEYS)):
        x = c.number(heldout_raw.get(k), f"heldout.{k}")
        if x is not None:
            heldout[k] = x
    guard_raw = c.mapping(raw.get("guard"), "guard")
    votes = (
        c.number(v, f"heldout.vote_agreement[{i}]")
        for i, v in enumerate(c.sequence(heldout_raw.get("vote_agreement"), "heldout.vote_agreement"))
    )
    return GenerationRecord(
        generation=generation,
        run_id=None if raw.get("run_id") is None else str(raw.get("run_id")),
        labels=None if raw.get("labels") is None else str(raw.get("labels")),
        fitness=c.number_map(raw.get("fitness"), "fitness"),
        diversity=c.number_map(raw.get("diversity"), "diversity"),
        members=tuple(members),
        heldout=heldout,
        vote_agreement=tuple(v for v in votes if v is not None),
        ensemble_domains=c.number_map(heldout_raw.get("ensemble_domains"), "heldout.ensemble_domains"),
        levels={
            str(lv): c.number_map(v, f"heldout.levels.{lv}")
            for lv, v in c.mapping(heldout_raw.get("levels"), "heldout.levels").items()
        },
        label_audit=c.number_map(
            {k: v for k, v in c.mapping(raw.get("labels_audit"), "labels_audit").items() if k != "cells"},
            "labels_audit",
        ),
        backoffs=sum(
            "back off" in str(e)
            for e in c.sequence(c.mapping(raw.get("curriculum"), "curriculum").get("events"), "curriculum.events")
        ),
        skipped=raw.get("skipped") is not None,
        seconds=c.number_map(raw.get("seconds"), "seconds"),
        guard={
            str(m): c.number_map(
                {k: x for k, x in c.mapping(v, f"guard.members.{m}").items() if k in ("before", "after")},
                f"guard.members.{m}",
            )
            for m, v in c.mapping(guard_raw.get("members"), "guard.members").items()
        },
        rolled_back=tuple(
            str(c.string(m, f"guard.rolled_back[{i}]"))
            for i, m in enumerate(c.sequence(guard_raw.get("rolled_back"), "guard.rolled_back"))
        ),
    )


def parse_records(records: Sequence[Mapping[str, Any]]) -> list[GenerationRecord]:
    """Type-check raw history records and return them sorted by generation.

    When a generation appears more than once (a resumed run re-recorded it),
    the last record wins. Raises :class:`ReportError` for a field of the
    wrong type, naming the generation.
    """
    by_gen: dict[int, GenerationRecord] = {}
    previous: int | None = None
    for i, raw in enumerate(records, start=1):
        if not isinstance(raw, Mapping):
            raise ReportError(f"{HISTORY_FILE}, record {i}: expected a JSON object, got {type(raw).__name__}")
        rec = _parse_record(raw, i, previous)
        if rec.generation in by_gen:
            logger.warning(
                "%s: generation %d recorded more than once; using the last record", HISTORY_FILE, rec.generation
            )
        by_gen[rec.generation] = rec
        previous = rec.generation
    return [by_gen[g] for g in sorted(by_gen)]


def load_records(population_dir: str | os.PathLike[str]) -> list[GenerationRecord]:
    """Read and check ``<population_dir>/history.jsonl``; :class:`ReportError` if it is missing or empty."""
    root = Path(population_dir)
    if not root.is_dir():
        raise ReportError(f"{root}: population directory not found")
    try:
        raw = read_history(root)
    except PopulationError as e:
        raise ReportError(str(e)) from e
    if not raw:
        raise ReportError(f"{root / HISTORY_FILE}: no history yet: run `ensemble-train evolve` first")
    return parse_records(raw)


def read_manifest_or_none(root: Path) -> tuple[Manifest | None, str | None]:
    """The manifest, or None and a note when it is missing or invalid (the report still uses the history)."""
    if not (root / MANIFEST_FILE).is_file():
        return None, f"{MANIFEST_FILE} not found"
    try:
        return read_manifest(root), None
    except PopulationError as e:
        logger.warning("report without the manifest: %s", e)
        return None, f"{MANIFEST_FILE} could not be read: {e}"
