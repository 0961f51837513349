"""Committing a generation, durably: the adapters, the atomic manifest swap, the pending record.

Invariants: a generation is visible only once its manifest is swapped in
(:func:`ensemble_serve.shared.population.commit_generation`: new adapter folders first, then the
manifest); on any failure the previous generation stays intact and the error says so. Its history
record waits in ``evolve-pending.json`` (:data:`PENDING_FILE`), written before the swap, until
the held-out evaluation completes it: a process killed in between finds the record on restart
(:func:`read_pending`) and finishes it, and a stale one (the commit never happened, or the line
was already written) is discarded.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ensemble_serve.shared.fsutil import atomic_write_text
from ensemble_serve.shared.lora import LoraWeights, save_lora
from ensemble_serve.shared.population import (
    Manifest,
    Population,
    PopulationError,
    commit_generation,
    read_history,
    read_manifest,
)
from trainer.evolve.run import EvolveError

PENDING_FILE = "evolve-pending.json"


def write_generation(
    root: Path, manifest: Manifest, adapters: dict[str, LoraWeights], record: dict[str, Any]
) -> Population:
    """Write generation `manifest` (new adapters + atomic manifest swap); on failure the previous one stays."""
    g = manifest.generation
    try:
        with tempfile.TemporaryDirectory(prefix="ensemble-evolve-") as work:
            sources = {}
            for name, w in adapters.items():
                folder = Path(work) / name
                save_lora(w, folder)
                sources[name] = folder
            atomic_write_text(root / PENDING_FILE, json.dumps(record) + "\n")
            return commit_generation(root, manifest, sources)
    except (OSError, PopulationError) as e:
        if read_manifest(root).generation != g:
            (root / PENDING_FILE).unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise EvolveError(f"{root}: could not write generation {g} ({reason}); generation {g - 1} is intact") from e


def read_pending(root: Path, generation: int) -> dict[str, Any] | None:
    """The pending history record of committed `generation`, or None (a stale or unreadable one is removed)."""
    path = root / PENDING_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        path.unlink()
        return None
    if record.get("generation") != generation or has_record(root, generation):
        path.unlink()  # the commit did not happen, or the line was written: nothing to finish
        return None
    return record


def has_record(root: Path, generation: int) -> bool:
    """Whether ``history.jsonl`` of `root` has the line of `generation`."""
    return any(r.get("generation") == generation for r in read_history(root))
