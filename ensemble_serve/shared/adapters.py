"""Members as vLLM `LoRARequest`s: public names, monotonic ids, private checked snapshots of the adapter files."""

from __future__ import annotations

import hashlib
import itertools
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from ensemble_serve.shared.population import Population

if TYPE_CHECKING:  # pragma: no cover
    from vllm.lora.request import LoRARequest


@dataclass
class AdapterRegistry:
    """Public member names -> `LoRARequest`s with monotonic integer ids.

    With `snapshot_root`, each member's adapter is first copied into a private folder
    of the server (named by the content's hash) and checked there, and vLLM loads
    that copy. vLLM reads adapter files lazily, and a corrupt file at that moment
    kills its engine core; a private, checked copy cannot change under it, whatever
    the trainer does to the population directory afterwards. A member keeps its id
    while its content is unchanged; new content gets a fresh id, so vLLM never
    confuses a reloaded member with its stale weights.
    """

    snapshot_root: Path | None = None
    keep_snapshots: int = 2  # per member: the current one and the one before (requests in flight)
    _by_name: dict[str, LoRARequest] = field(default_factory=dict)
    _digest: dict[str, str] = field(default_factory=dict)
    _snapshots: dict[str, list[Path]] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, name: str, path: Path, base_model_name: str | None = None) -> LoRARequest:
        from vllm.lora.request import LoRARequest

        digest = adapter_digest(path)
        with self._lock:
            current = self._by_name.get(name)
            if current is not None and self._digest.get(name) == digest:
                return current
        root = self.snapshot_root
        load_path = self._snapshot(root, name, Path(path), digest) if root is not None else Path(path)
        with self._lock:
            req = LoRARequest(name, next(self._ids), str(load_path), base_model_name=base_model_name)
            self._by_name[name] = req
            self._digest[name] = digest
            return req

    def _snapshot(self, root: Path, name: str, src: Path, digest: str) -> Path:
        dest = root / f"{name}-{digest[:16]}"
        if not dest.exists():
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for f in ADAPTER_FILES:
                if (src / f).is_file():
                    shutil.copyfile(src / f, tmp / f)
            if adapter_digest(tmp) != digest:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ValueError(f"adapter {src} changed while it was being loaded; try again")
            check_adapter_weights(tmp / "adapter_model.safetensors")
            tmp.rename(dest)
        kept = self._snapshots.setdefault(name, [])
        if dest not in kept:
            kept.append(dest)
        while len(kept) > self.keep_snapshots:
            shutil.rmtree(kept.pop(0), ignore_errors=True)
        return dest

    def forget(self, name: str) -> None:
        """Drop `name` and delete its private snapshots (new requests for it get a KeyError)."""
        with self._lock:
            self._by_name.pop(name, None)
            self._digest.pop(name, None)
            gone = self._snapshots.pop(name, [])
        for folder in gone:
            shutil.rmtree(folder, ignore_errors=True)

    def sync(self, population: Population) -> None:
        """Register every member of `population` and forget names it no longer has."""
        names = set(population.names)
        with self._lock:
            for gone in set(self._by_name) - names:
                del self._by_name[gone]
                self._digest.pop(gone, None)
        for name in population.names:
            self.register(name, population.member_dir(name), population.manifest.base_model.name)

    def get(self, name: str) -> LoRARequest:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown member {name!r}; known: {sorted(self._by_name)}") from None

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def requests(self) -> list[LoRARequest]:
        with self._lock:
            return list(self._by_name.values())


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_digest(folder: Path) -> str:
    """sha256 over an adapter folder's config and weights."""
    h = hashlib.sha256()
    for f in ADAPTER_FILES:
        h.update(f.encode())
        with open(Path(folder) / f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_adapter_weights(path: Path) -> None:
    """Open and read every tensor of a safetensors file (what vLLM would do), or raise ValueError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception as e:
        raise ValueError(f"{path}: unreadable adapter weights: {e}") from None
