"""`MixtureCache`: a bounded, thread-safe LRU of mixed adapter folders on disk, one folder per route.

A repeated route is mixed once. Each entry is a standard PEFT adapter folder (same base model,
target modules and module prefixes as the members), so vLLM loads it like any member; its rank
is not padded up to a vLLM rank, since vLLM accepts any r up to ``max_lora_rank``. Entries are
written into a temp folder and renamed into place, so vLLM never sees a half-written adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ensemble_serve.shared.adapters import ADAPTER_FILES, adapter_digest
from ensemble_serve.shared.fsutil import fsync_dir, remove_tree, tmp_dir_beside
from ensemble_serve.shared.lora import LoraError, LoraWeights, load_lora, save_lora
from ensemble_serve.shared.mixture.mixing import (
    MixtureError,
    Mode,
    Weights,
    check_mode,
    check_rank,
    mix,
    normalise_weights,
)

__all__ = ["DEFAULT_DECIMALS", "MIX_NAME_PREFIX", "MixtureCache"]


MIX_NAME_PREFIX = "mix-"
"""Mixed adapters are named ``mix-<first 12 hex of the route key>`` (stable across processes)."""
DEFAULT_DECIMALS = 3
"""Decimals normalised weights are rounded to in the cache key: routes closer than this share an adapter."""

_KEY_HEX = 12
_KEY_VERSION = 1  # bump when the meaning of a key (or of the mixing) changes, so old entries never match
_ENTRY_RE = re.compile(rf"^{re.escape(MIX_NAME_PREFIX)}[0-9a-f]{{{_KEY_HEX}}}$")
_TMP_RE = re.compile(rf"^\.{re.escape(MIX_NAME_PREFIX)}[0-9a-f]{{{_KEY_HEX}}}\.tmp-")
_DIGEST_MEMO_MAX = 4096


@dataclass
class _Pending:
    """A mix being computed by one thread; the others asking for the same key wait on it instead of recomputing."""

    done: threading.Event
    result: tuple[str, Path] | None = None
    error: BaseException | None = None


def _identity(path: Path) -> tuple[int, int, int]:
    """(inode, size, mtime in ns): changes whenever the file is rewritten or atomically replaced."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


class MixtureCache:
    """A bounded LRU of mixed adapter folders under `root`, one folder per route.

    The key is the sha256 of the route: the content digests of the members with a positive
    rounded weight, in order, their normalised weights rounded to `decimals`, the mode, the rank
    and the engine's max_rank (which can turn an exact request into a truncated one). Content
    digests, not member names, make a retrained member a new route; rounding lets gates that differ
    only in noise share an entry; zero-weight members are left out because they change nothing.
    The adapter is mixed from the rounded weights, so an entry depends only on its key.

    Entries are written into a temp folder beside their final name and renamed (atomic), so vLLM
    never sees a half-written adapter. The oldest entries' folders are deleted beyond `capacity`;
    keep it above the number of mixed adapters in use at once, since an evicted folder vanishes
    even if a request still means to load it. One cache per root: leftover ``mix-*`` folders from
    an earlier process are deleted on start, as nothing tracks them any more. Thread-safe; one
    thread computes a given key while the others asking for it wait for that result.
    """

    def __init__(self, root: str | os.PathLike[str], capacity: int = 32, *, decimals: int = DEFAULT_DECIMALS) -> None:
        self.capacity = check_rank(capacity, "capacity")
        if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 12:
            raise MixtureError(f"decimals must be an integer in [0, 12], got {decimals!r}")
        self.decimals = decimals
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.iterdir():
            if _ENTRY_RE.match(stale.name) or _TMP_RE.match(stale.name):
                remove_tree(stale)
        self._entries: OrderedDict[str, tuple[str, Path]] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._digests: dict[tuple[Any, ...], str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Entries held (their folders exist on disk)."""
        with self._lock:
            return len(self._entries)

    def names(self) -> list[str]:
        """Adapter names held, least recently used first."""
        with self._lock:
            return [name for name, _ in self._entries.values()]

    def get_or_create(
        self,
        members: Sequence[tuple[str, str | os.PathLike[str]]],
        weights: Weights,
        mode: Mode = "exact",
        rank: int | None = None,
        max_rank: int | None = None,
    ) -> tuple[str, Path, bool]:
        """(adapter name, folder, created) for this route, mixing and writing it only on a miss.

        `members` are (name, adapter folder) pairs; names label members in error messages only.
        """
        if isinstance(members, str | bytes) or not isinstance(members, Sequence) or not members:
            raise MixtureError("members must be a non-empty sequence of (name, folder) pairs")
        names = [str(name) for name, _ in members]
        rounded = [round(w, self.decimals) for w in normalise_weights(weights, names)]
        active = [i for i, w in enumerate(rounded) if w > 0]
        if not active:
            raise MixtureError(f"all weights round to zero at {self.decimals} decimals")
        check_mode(mode)
        if rank is not None:
            check_rank(rank, "rank")
        if max_rank is not None:
            check_rank(max_rank, "max_rank")
        route = {
            "version": _KEY_VERSION,
            "members": [[self._digest(names[i], members[i][1]), f"{rounded[i]:.{self.decimals}f}"] for i in active],
            "mode": mode,
            "rank": rank,
            "max_rank": max_rank,
        }
        key = hashlib.sha256(json.dumps(route, sort_keys=True).encode()).hexdigest()

        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit[0], hit[1], False
            pending = self._pending.get(key)
            owner = pending is None
            if pending is None:
                pending = self._pending[key] = _Pending(threading.Event())
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.result is not None
            return pending.result[0], pending.result[1], False

        name = f"{MIX_NAME_PREFIX}{key[:_KEY_HEX]}"
        folder = self.root / name
        evicted: list[Path] = []
        try:
            loaded = [self._load(names[i], members[i][1]) for i in active]
            mixed = mix(loaded, [rounded[i] for i in active], mode, rank, max_rank, names=[names[i] for i in active])
            self._write(mixed, folder)
            pending.result = (name, folder)
            with self._lock:
                self._entries[key] = (name, folder)
                self._pending.pop(key, None)
                while len(self._entries) > self.capacity:
                    _, (_, old) = self._entries.popitem(last=False)
                    evicted.append(old)
        except BaseException as e:
            pending.error = e
            with self._lock:
                self._pending.pop(key, None)
            raise
        finally:
            pending.done.set()
            for old in evicted:
                remove_tree(old)
        return name, folder, True

    def _write(self, mixed: LoraWeights, folder: Path) -> None:
        """Save into a temp folder beside `folder`, then rename: readers see the whole adapter or none."""
        tmp = tmp_dir_beside(folder)
        try:
            save_lora(mixed, tmp)
            remove_tree(folder)  # only an untracked leftover can be there: the calling thread owns the key
            os.rename(tmp, folder)
        except BaseException:
            remove_tree(tmp)
            raise
        fsync_dir(self.root)

    def _digest(self, name: str, folder: str | os.PathLike[str]) -> str:
        """The member folder's content digest, memoised on its files' identity so a cache hit does not re-hash weights."""
        path = Path(folder)
        try:
            stats = tuple((f, *_identity(path / f)) for f in ADAPTER_FILES)
        except OSError as e:
            raise MixtureError(f"member {name}: cannot read adapter folder {path}: {e}") from e
        memo_key = (str(path.resolve()), stats)
        with self._lock:
            known = self._digests.get(memo_key)
        if known is not None:
            return known
        try:
            digest = adapter_digest(path)
        except OSError as e:
            raise MixtureError(f"member {name}: cannot read adapter folder {path}: {e}") from e
        with self._lock:
            if len(self._digests) >= _DIGEST_MEMO_MAX:
                self._digests.clear()
            self._digests[memo_key] = digest
        return digest

    @staticmethod
    def _load(name: str, folder: str | os.PathLike[str]) -> LoraWeights:
        """Load a member, naming it in the error, so a bad route reads as a MixtureError like every other."""
        try:
            return load_lora(folder)
        except LoraError as e:
            raise MixtureError(f"member {name}: {e}") from e
