"""Unit tests of `ensemble_serve.shared.mixture` on small, realistic PEFT adapters (no model, no engine).

Adapters are built as PEFT lays them out (key names, config keys) and parsed through the same
code path as an adapter folder; the builder is a trimmed copy of the one in `test_operators`, so
these tests do not pull in the trainer.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from lora_factories import BASE, TOL, make_lora

import ensemble_serve.shared.mixture.cache as mixture
from ensemble_serve.shared.lora import CONFIG_FILE, LoraWeights, load_lora, save_lora
from ensemble_serve.shared.mixture import (
    MixtureCache,
    MixtureError,
    mix,
    mix_exact,
    mix_truncated,
    mixture_cost,
    truncation_error,
    vllm_rank,
)


def weighted_sum(members: list[LoraWeights], weights: list[float]) -> dict[str, torch.Tensor]:
    """The dense reference the mixture must reproduce: sum_i w_i dW_i with weights normalised."""
    total = sum(weights)
    return {m: sum(w / total * x.delta(m) for x, w in zip(members, weights)) for m in members[0].modules()}


def assert_update(x: LoraWeights, expected: dict[str, torch.Tensor]) -> None:
    assert x.modules() == sorted(expected)
    for m in x.modules():
        torch.testing.assert_close(x.delta(m), expected[m], **TOL)


@pytest.fixture
def pair() -> list[LoraWeights]:
    """Members of ranks 4 and 8 with different alphas (so their scales differ: 2.0 and 0.625)."""
    return [make_lora(4, seed=1, alpha=8), make_lora(8, seed=2, alpha=5)]


# --------------------------------------------------------------------------- exact


def test_exact_equals_weighted_sum(pair: list[LoraWeights]) -> None:
    mixed = mix_exact(pair, [0.25, 0.75])
    assert mixed.rank == 12
    assert mixed.alpha == 12.0
    assert mixed.scale == 1.0
    assert_update(mixed, weighted_sum(pair, [0.25, 0.75]))


def test_exact_normalises_weights(pair: list[LoraWeights]) -> None:
    a, b = mix_exact(pair, [1.0, 3.0]), mix_exact(pair, [0.25, 0.75])
    for m in a.modules():
        torch.testing.assert_close(a.delta(m), b.delta(m), **TOL)


def test_exact_accepts_router_gates_as_tensor(pair: list[LoraWeights]) -> None:
    mixed = mix_exact(pair, torch.tensor([0.25, 0.75]))
    assert_update(mixed, weighted_sum(pair, [0.25, 0.75]))


def test_exact_folds_rslora_scale_into_a_plain_child() -> None:
    members = [make_lora(4, seed=3, alpha=8, rslora=True), make_lora(8, seed=4, alpha=16)]
    assert members[0].scale == pytest.approx(8 / math.sqrt(4))
    mixed = mix_exact(members, [0.5, 0.5])
    assert mixed.config["use_rslora"] is False
    assert_update(mixed, weighted_sum(members, [0.5, 0.5]))


def test_zero_weight_member_is_skipped(pair: list[LoraWeights]) -> None:
    mixed = mix_exact(pair, [1.0, 0.0])
    assert mixed.rank == pair[0].rank == 4
    for m in mixed.modules():
        torch.testing.assert_close(mixed.delta(m), pair[0].delta(m), **TOL)


# --------------------------------------------------------------------------- truncated


@pytest.mark.parametrize("rank", [12, 20])
def test_truncated_is_exact_at_or_above_concatenated_rank(pair: list[LoraWeights], rank: int) -> None:
    mixed = mix_truncated(pair, [0.25, 0.75], rank)
    assert mixed.rank == 12  # never padded beyond the concatenated rank
    assert mixed.scale == 1.0
    assert_update(mixed, weighted_sum(pair, [0.25, 0.75]))
    assert truncation_error(pair, [0.25, 0.75], mixed) < 1e-5


def test_truncation_error_decreases_with_rank(pair: list[LoraWeights]) -> None:
    errors = [truncation_error(pair, [0.25, 0.75], mix_truncated(pair, [0.25, 0.75], k)) for k in range(1, 13)]
    assert errors[0] > 0.1
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5


def test_truncation_error_matches_dense_reference(pair: list[LoraWeights]) -> None:
    mixed = mix_truncated(pair, [0.25, 0.75], 3)
    target = weighted_sum(pair, [0.25, 0.75])
    err2 = sum(float((mixed.delta(m).double() - target[m].double()).pow(2).sum()) for m in target)
    norm2 = sum(float(target[m].double().pow(2).sum()) for m in target)
    assert truncation_error(pair, [0.25, 0.75], mixed) == pytest.approx(math.sqrt(err2 / norm2), rel=1e-4)


def test_truncation_error_of_exact_mix_is_zero(pair: list[LoraWeights]) -> None:
    assert truncation_error(pair, [0.4, 0.6], mix_exact(pair, [0.4, 0.6])) < 1e-6


# --------------------------------------------------------------------------- saved folder


def test_saved_mix_is_a_consistent_peft_folder(pair: list[LoraWeights], tmp_path: Path) -> None:
    for mixed in (mix_exact(pair, [0.25, 0.75]), mix_truncated(pair, [0.25, 0.75], 5)):
        folder = save_lora(mixed, tmp_path / f"r{mixed.rank}")
        config = json.loads((folder / CONFIG_FILE).read_text())
        loaded = load_lora(folder)
        a, b = next(iter(loaded.factors.values()))
        assert config["r"] == loaded.rank == a.shape[0] == b.shape[1] == mixed.rank
        assert config["lora_alpha"] == mixed.rank  # scale 1, written as an int
        assert config["base_model_name_or_path"] == BASE
        assert config["target_modules"] == ["q_proj", "v_proj"]
        for m in mixed.modules():
            torch.testing.assert_close(loaded.delta(m), mixed.delta(m), **TOL)


# --------------------------------------------------------------------------- mix / vllm_rank / cost


def test_mix_truncates_when_exact_rank_exceeds_max_rank(pair: list[LoraWeights]) -> None:
    capped = mix(pair, [0.25, 0.75], "exact", max_rank=8)
    assert capped.rank == 8
    reference = mix_truncated(pair, [0.25, 0.75], 8)
    for m in capped.modules():
        torch.testing.assert_close(capped.delta(m), reference.delta(m), **TOL)
    fits = mix(pair, [0.25, 0.75], "exact", max_rank=16)
    assert fits.rank == 12
    assert_update(fits, weighted_sum(pair, [0.25, 0.75]))


def test_mix_truncated_mode_respects_rank_and_max_rank(pair: list[LoraWeights]) -> None:
    assert mix(pair, [0.25, 0.75], "truncated", rank=6).rank == 6
    assert mix(pair, [0.25, 0.75], "truncated", rank=10, max_rank=8).rank == 8


@pytest.mark.parametrize(("r", "expected"), [(1, 1), (2, 8), (8, 8), (9, 16), (300, 320), (321, 512), (512, 512)])
def test_vllm_rank_is_the_smallest_allowed_rank_at_least_r(r: int, expected: int) -> None:
    assert vllm_rank(r) == expected


def test_vllm_rank_refuses_ranks_vllm_cannot_hold() -> None:
    with pytest.raises(MixtureError, match="exceeds vLLM's largest max_lora_rank"):
        vllm_rank(513)


def test_mixture_cost_reports_rank_and_flops_factor() -> None:
    exact = mixture_cost([4, 8], [0.25, 0.75], "exact")
    assert (exact["mode"], exact["rank"], exact["flops_factor"]) == ("exact", 12, 2.0)
    assert exact["vllm_rank"] == 16
    truncated = mixture_cost([4, 8], [0.25, 0.75], "truncated", 8)
    assert (truncated["rank"], truncated["flops_factor"]) == (8, pytest.approx(8 / 6))
    capped = mixture_cost([4, 8], [0.25, 0.75], "exact", max_rank=8)
    assert (capped["mode"], capped["rank"], capped["exact_rank"]) == ("truncated", 8, 12)
    single = mixture_cost([4, 8], [1, 0], "exact")
    assert (single["rank"], single["active_members"], single["flops_factor"]) == (4, 1, 1.0)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], r"weights count \(1\) does not match members count \(2\)"),
        ([0.5, -0.1], "must be non-negative"),
        ([0.5, float("nan")], "must be finite"),
        ([float("inf"), 0.5], "must be finite"),
        ([0.0, 0.0], "all weights are zero"),
        ([0.5, "a"], "must be a number"),
    ],
)
def test_bad_weights_are_refused(pair: list[LoraWeights], weights: list, message: str) -> None:
    for call in (
        lambda: mix_exact(pair, weights),
        lambda: mix_truncated(pair, weights, 4),
        lambda: mix(pair, weights),
        lambda: mixture_cost([4, 8], weights),
    ):
        with pytest.raises(MixtureError, match=message):
            call()


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (make_lora(4, seed=5, base="other-base"), "incompatible members: .*base_model_name_or_path"),
        (make_lora(4, seed=5, modules=("q_proj",), dim=8), "incompatible members: .*shape .* of .*q_proj"),
        (make_lora(4, seed=5, dim=8), "incompatible members: .*module shapes"),
    ],
)
def test_incompatible_members_are_refused(pair: list[LoraWeights], other: LoraWeights, message: str) -> None:
    with pytest.raises(MixtureError, match=message):
        mix_exact([pair[0], other], [0.5, 0.5])
    # a zero weight does not excuse an incompatible member: the route itself is wrong
    with pytest.raises(MixtureError, match=message):
        mix([pair[0], other], [1.0, 0.0])


def test_members_with_different_target_modules_mix_exactly() -> None:
    """Adapters brought from elsewhere target different modules: a module one lacks is a zero update."""
    qv = make_lora(4, seed=1, alpha=8)
    q_only = make_lora(2, seed=2, alpha=2, modules=("q_proj",))
    wide = make_lora(8, seed=3, alpha=16, modules=("q_proj", "k_proj", "v_proj"))
    members, weights = [qv, q_only, wide], [0.5, 0.3, 0.2]
    mixed = mix_exact(members, weights)
    assert mixed.rank == 14 and set(mixed.config["target_modules"]) == {"q_proj", "k_proj", "v_proj"}
    expected = {}
    for module in wide.modules():
        expected[module] = sum(w * x.delta(module) for x, w in zip(members, weights) if module in x.factors)
    assert_update(mixed, expected)
    assert truncation_error(members, weights, mixed) < 1e-6  # float32 factors against the float64 sum
    truncated = mix(members, weights, max_rank=8)
    assert truncated.rank == 8 and truncated.modules() == mixed.modules()


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_bad_rank_is_refused(pair: list[LoraWeights], rank: object) -> None:
    with pytest.raises(MixtureError, match="rank must be a positive integer"):
        mix_truncated(pair, [0.5, 0.5], rank)  # type: ignore[arg-type]
    with pytest.raises(MixtureError, match="rank must be a positive integer"):
        mix(pair, [0.5, 0.5], "truncated", rank=rank)  # type: ignore[arg-type]
    with pytest.raises(MixtureError, match="max_rank must be a positive integer"):
        mix(pair, [0.5, 0.5], "exact", max_rank=rank)  # type: ignore[arg-type]


def test_bad_mode_and_rank_combinations_are_refused(pair: list[LoraWeights]) -> None:
    with pytest.raises(MixtureError, match="mode must be 'exact' or 'truncated'"):
        mix(pair, [0.5, 0.5], "average")  # type: ignore[arg-type]
    with pytest.raises(MixtureError, match="mode='truncated' needs a rank"):
        mix(pair, [0.5, 0.5], "truncated")
    with pytest.raises(MixtureError, match="rank applies only to mode='truncated'"):
        mix(pair, [0.5, 0.5], "exact", rank=4)
    with pytest.raises(MixtureError, match="non-empty sequence of LoraWeights"):
        mix_exact([], [])


# --------------------------------------------------------------------------- cache


@pytest.fixture
def folders(tmp_path: Path, pair: list[LoraWeights]) -> list[tuple[str, Path]]:
    return [(name, save_lora(w, tmp_path / "members" / name)) for name, w in zip(("m0", "m1"), pair)]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls of the mixing function the cache uses (a hit must not call it)."""
    calls: list[int] = []
    real = mixture.mix

    def counting(*args: object, **kwargs: object) -> LoraWeights:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mixture, "mix", counting)
    return calls


def test_cache_hit_returns_same_folder_without_recomputing(
    tmp_path: Path, folders: list[tuple[str, Path]], pair: list[LoraWeights], counted: list[int]
) -> None:
    cache = MixtureCache(tmp_path / "mixes", capacity=4)
    name, folder, created = cache.get_or_create(folders, [0.25, 0.75])
    assert created is True
    assert name.startswith("mix-") and len(name) == len("mix-") + 12
    assert folder == tmp_path / "mixes" / name
    assert_update(load_lora(folder), weighted_sum(pair, [0.25, 0.75]))
    again = cache.get_or_create(folders, [0.25, 0.75])
    assert again == (name, folder, False)
    assert len(counted) == 1
    assert sorted(p.name for p in (tmp_path / "mixes").iterdir()) == [name]  # no temp folder left


def test_cache_separates_routes_and_rounds_weights(tmp_path: Path, folders: list[tuple[str, Path]]) -> None:
    cache = MixtureCache(tmp_path / "mixes", capacity=4)
    half = cache.get_or_create(folders, [0.5, 0.5])
    other = cache.get_or_create(folders, [0.25, 0.75])
    assert other[0] != half[0] and other[2] is True
    assert cache.get_or_create(folders, [0.5000001, 0.5]) == (half[0], half[1], False)
    assert cache.get_or_create(folders, [2.0, 2.0])[:2] == half[:2]  # weights are normalised before rounding
    truncated = cache.get_or_create(folders, [0.5, 0.5], "truncated", 4)
    assert truncated[0] != half[0] and load_lora(truncated[1]).rank == 4


def test_cache_rounding_is_configurable(tmp_path: Path, folders: list[tuple[str, Path]]) -> None:
    cache = MixtureCache(tmp_path / "mixes", capacity=4, decimals=7)
    first = cache.get_or_create(folders, [0.5, 0.5])
    assert cache.get_or_create(folders, [0.5001, 0.5])[0] != first[0]


def test_cache_leaves_zero_weight_members_out_of_the_key(tmp_path: Path, folders: list[tuple[str, Path]]) -> None:
    cache = MixtureCache(tmp_path / "mixes", capacity=4)
    name, folder, _ = cache.get_or_create(folders, [1.0, 0.0])
    assert cache.get_or_create(folders[:1], [1.0]) == (name, folder, False)
    assert load_lora(folder).rank == 4


def test_cache_evicts_least_recently_used_folder(tmp_path: Path, folders: list[tuple[str, Path]]) -> None:
    cache = MixtureCache(tmp_path / "mixes", capacity=2)
    a = cache.get_or_create(folders, [0.1, 0.9])
    b = cache.get_or_create(folders, [0.2, 0.8])
    assert cache.get_or_create(folders, [0.1, 0.9])[2] is False  # touch a: b is now the oldest
    c = cache.get_or_create(folders, [0.3, 0.7])
    assert not b[1].exists()
    assert a[1].is_dir() and c[1].is_dir()
    assert cache.names() == [a[0], c[0]]
    d = cache.get_or_create(folders, [0.4, 0.6])
    assert not a[1].exists() and cache.names() == [c[0], d[0]]


def test_cache_same_key_from_two_threads_is_computed_once(
    tmp_path: Path, folders: list[tuple[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = mixture.mix

    def slow(*args: object, **kwargs: object) -> LoraWeights:
        calls.append(1)
        time.sleep(0.3)  # long enough that the second thread arrives while the first is mixing
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mixture, "mix", slow)
    cache = MixtureCache(tmp_path / "mixes", capacity=4)
    results: list[tuple[str, Path, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_create(folders, [0.5, 0.5]))) for _ in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(calls) == 1
    assert sorted(r[2] for r in results) == [False, True]
    assert results[0][:2] == results[1][:2]


def test_cache_notices_a_member_whose_content_changed(tmp_path: Path, folders: list[tuple[str, Path]]) -> None:
    cache = MixtureCache(tmp_path / "mixes", capacity=4)
    before = cache.get_or_create(folders, [0.5, 0.5])
    replacement = save_lora(make_lora(4, seed=9, alpha=8), tmp_path / "retrained")
    for f in replacement.iterdir():
        f.replace(folders[0][1] / f.name)
    after = cache.get_or_create(folders, [0.5, 0.5])
    assert after[0] != before[0] and after[2] is True


def test_cache_failure_leaves_nothing_and_can_retry(
    tmp_path: Path, folders: list[tuple[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = mixture.mix

    def broken(*args: object, **kwargs: object) -> LoraWeights:
        raise MixtureError("mixing failed on purpose")

    monkeypatch.setattr(mixture, "mix", broken)
    cache = MixtureCache(tmp_path / "mixes", capacity=4)
    with pytest.raises(MixtureError, match="mixing failed on purpose"):
        cache.get_or_create(folders, [0.5, 0.5])
    assert list((tmp_path / "mixes").iterdir()) == [] and len(cache) == 0
    monkeypatch.setattr(mixture, "mix", real)
    assert cache.get_or_create(folders, [0.5, 0.5])[2] is True


def test_cache_clears_leftover_mixes_but_nothing_else(tmp_path: Path, folders: list[tuple[str, Path]]) -> None:
    root = tmp_path / "mixes"
    (root / "mix-0123456789ab").mkdir(parents=True)
    (root / ".mix-0123456789ab.tmp-xyz").mkdir()
    (root / "notes").mkdir()
    MixtureCache(root, capacity=2)
    assert sorted(p.name for p in root.iterdir()) == ["notes"]


def test_cache_refuses_bad_routes(tmp_path: Path, folders: list[tuple[str, Path]]) -> None:
    cache = MixtureCache(tmp_path / "mixes", capacity=2)
    with pytest.raises(MixtureError, match=r"weights count \(3\) does not match members count \(2\)"):
        cache.get_or_create(folders, [0.2, 0.3, 0.5])
    with pytest.raises(MixtureError, match="weight of m1 must be non-negative"):
        cache.get_or_create(folders, [0.5, -1.0])
    with pytest.raises(MixtureError, match="member ghost: cannot read adapter folder"):
        cache.get_or_create([folders[0], ("ghost", tmp_path / "missing")], [0.5, 0.5])
    with pytest.raises(MixtureError, match="all weights round to zero at 0 decimals"):
        MixtureCache(tmp_path / "coarse", decimals=0).get_or_create(folders, [0.5, 0.5])
    with pytest.raises(MixtureError, match="capacity must be a positive integer"):
        MixtureCache(tmp_path / "empty", capacity=0)
