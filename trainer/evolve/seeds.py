"""Seeds of an evolve run: every random draw derives from the run seed and a path of names.

Invariant: :func:`derive_seed` is a pure function of its arguments (SHA-256 of their text), so
the same (seed, phase, generation, member, ...) gives the same seed in every process, on every
machine and after a resume. It depends on nothing else in the project, so every module that
draws (the loop's phases, the lifecycle, the ablation harness) can import it without a cycle.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from the run seed and a path of names (stable across processes and machines)."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF
