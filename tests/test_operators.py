"""Unit tests of `ensemble_serve.shared.lora` and `trainer.evolve.operators` on small, realistic PEFT adapters.

The adapters are built in memory exactly as PEFT lays them out (key names, config keys) and
parsed through the same code path as an adapter folder, so nothing here needs a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from lora_factories import DIM, HEAD, PREFIX, TOL, make_lora, payload

from ensemble_serve.shared.lora import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoraError,
    LoraWeights,
    align_modules,
    check_compatible,
    load_lora,
    lora_from_bytes,
    lora_to_bytes,
    refactor,
    refactor_low_rank,
    save_lora,
)
from trainer.evolve.operators import (
    CROSSOVER,
    MUTATION,
    SELECTION,
    OperatorError,
    elites,
    fitness_proportional,
    generational,
    get_operator,
    layer_wise,
    layer_wise_plan,
    svd_interpolate,
    tournament,
    truncation,
    weakest,
    weighted_average,
)


def rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def deltas(w: LoraWeights) -> dict[str, torch.Tensor]:
    return {m: w.delta(m) for m in w.modules()}


def assert_same_update(x: LoraWeights, y: LoraWeights | dict[str, torch.Tensor]) -> None:
    other = y if isinstance(y, dict) else deltas(y)
    assert sorted(other) == x.modules()
    for m in x.modules():
        torch.testing.assert_close(x.delta(m), other[m], **TOL)


def rotated(w: LoraWeights, seed: int) -> LoraWeights:
    """The same adapter re-expressed with factors (B R, R^-1 A): identical update, different factors."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(w.rank, w.rank, generator=g, dtype=torch.float64) + 2 * torch.eye(w.rank, dtype=torch.float64)
    r_inv = torch.linalg.inv(r)
    factors = {m: ((r_inv @ a.double()).float(), (b.double() @ r).float()) for m, (a, b) in w.factors.items()}
    return w.with_factors(factors, w.rank, w.alpha)


def same_weights(x: LoraWeights, y: LoraWeights) -> bool:
    return x.modules() == y.modules() and all(
        torch.equal(x.factors[m][0], y.factors[m][0]) and torch.equal(x.factors[m][1], y.factors[m][1])
        for m in x.modules()
    )


# ----------------------------------------------------------------------------- lora.py


def test_weights_basics() -> None:
    w = make_lora(4, 0, alpha=8, head=True)
    q0 = PREFIX.format(layer=0, module="q_proj")
    assert w.scale == 2.0
    assert w.modules() == sorted(w.modules()) and len(w.modules()) == 5
    assert w.layer_of(q0) == 0 and w.layer_of(PREFIX.format(layer=1, module="v_proj")) == 1
    assert w.layer_of(HEAD) is None
    a, b = w.factors[q0]
    torch.testing.assert_close(w.delta(q0), 2.0 * b @ a)
    assert set(w.state_dict()) == {m + s for m in w.modules() for s in (".lora_A.weight", ".lora_B.weight")}
    child = w.with_factors(w.factors, 4, 2.5)
    assert (child.config["r"], child.config["lora_alpha"], child.alpha) == (4, 2.5, 2.5)
    assert w.config["lora_alpha"] == 8  # the source is untouched
    rs = lora_from_bytes(payload({**w.config, "use_rslora": True}, w.state_dict()))
    assert rs.scale == pytest.approx(8 / 2)


def test_save_load_round_trip_is_byte_identical(tmp_path: Path) -> None:
    w = make_lora(4, 1)
    save_lora(w, tmp_path / "one")
    loaded = load_lora(tmp_path / "one")
    assert same_weights(w, loaded) and loaded.config == w.config and loaded.rank == 4
    save_lora(loaded, tmp_path / "two")
    (tmp_path / "empty").mkdir()
    save_lora(w, tmp_path / "empty")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        one = (tmp_path / "one" / name).read_bytes()
        assert one == (tmp_path / "two" / name).read_bytes() == (tmp_path / "empty" / name).read_bytes()
    assert json.loads((tmp_path / "one" / CONFIG_FILE).read_text()) == w.config
    with pytest.raises(LoraError, match="not empty"):
        save_lora(w, tmp_path / "one")
    back = lora_from_bytes(lora_to_bytes(w))
    assert same_weights(w, back) and back.config == w.config


def test_bf16_adapter_is_read_as_float32() -> None:
    w = make_lora(4, 2)
    half = {k: v.to(torch.bfloat16) for k, v in w.state_dict().items()}
    loaded = lora_from_bytes(payload(w.config, half))
    assert all(a.dtype == b.dtype == torch.float32 for a, b in loaded.factors.values())


def _write(folder: Path, config: dict | None, tensors: dict[str, torch.Tensor] | None) -> Path:
    folder.mkdir()
    if config is not None:
        (folder / CONFIG_FILE).write_text(json.dumps(config))
    if tensors is not None:
        safetensors.torch.save_file(tensors, str(folder / WEIGHTS_FILE))
    return folder


def test_bad_adapter_folders_are_refused(tmp_path: Path) -> None:
    w = make_lora(4, 3)
    sd = w.state_dict()
    with pytest.raises(LoraError, match="missing adapter weights"):
        load_lora(_write(tmp_path / "noweights", w.config, None))
    with pytest.raises(LoraError, match="missing adapter config"):
        load_lora(_write(tmp_path / "noconfig", None, sd))
    only_a = {k: v for k, v in sd.items() if not k.endswith("layers.1.self_attn.q_proj.lora_B.weight")}
    with pytest.raises(LoraError, match=r"layers\.1\.self_attn\.q_proj.*lora_A but no lora_B"):
        load_lora(_write(tmp_path / "nob", w.config, only_a))
    with pytest.raises(LoraError, match=r"expected \(8, in\) for r=8"):
        load_lora(_write(tmp_path / "wrongr", {**w.config, "r": 8}, sd))
    with pytest.raises(LoraError, match="rank_pattern"):
        load_lora(_write(tmp_path / "pattern", {**w.config, "rank_pattern": {"q_proj": 8}}, sd))
    with pytest.raises(LoraError, match="unsupported tensor"):
        load_lora(_write(tmp_path / "extra", w.config, {**sd, "base_model.model.lm_head.weight": torch.zeros(2, 2)}))


def test_check_compatible_names_the_member_that_differs() -> None:
    a, b = make_lora(4, 0), make_lora(8, 1)  # ranks may differ
    check_compatible([a, b], ["m00", "m01"])
    other_base = make_lora(4, 2, base="another-base")
    with pytest.raises(LoraError, match=r"base_model_name_or_path.*'another-base' \(m02\)"):
        check_compatible([a, b, other_base], ["m00", "m01", "m02"])
    reordered = make_lora(4, 3, modules=("v_proj", "q_proj"))
    check_compatible([a, reordered], ["m00", "m03"])  # target_modules compare as a set
    more = make_lora(4, 4, modules=("q_proj", "k_proj", "v_proj"))
    with pytest.raises(LoraError, match=r"target_modules.*\[k_proj, q_proj, v_proj\] \(m04\)"):
        check_compatible([a, more], ["m00", "m04"])
    head = make_lora(4, 5, head=True)
    with pytest.raises(LoraError, match=r"LoRA modules.*m05: .*extra \['base_model.model.lm_head'\]"):
        check_compatible([a, head], ["m00", "m05"])
    wide = {k: (torch.cat([v, v], dim=1) if k.endswith("lora_A.weight") else v) for k, v in a.state_dict().items()}
    with pytest.raises(LoraError, match=r"module shapes.*in=32 out=16.*\(wide\)"):
        check_compatible([a, lora_from_bytes(payload(a.config, wide))], ["m00", "wide"])


def test_align_modules_gives_every_adapter_the_union_as_zero_updates() -> None:
    a, more = make_lora(4, 0), make_lora(8, 4, modules=("q_proj", "k_proj", "v_proj"))
    assert align_modules([a, make_lora(2, 1)], ["m00", "m01"])[0] is a  # already aligned: unchanged
    x, y = align_modules([a, more], ["m00", "m04"])
    check_compatible([x, y], ["m00", "m04"])
    assert x.modules() == more.modules() and x.config["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    for module in a.modules():
        assert torch.equal(x.delta(module), a.delta(module))
    k_module = next(m for m in more.modules() if m.endswith("k_proj"))
    assert x.rank == 4 and not x.delta(k_module).any()
    with pytest.raises(LoraError, match=r"base_model_name_or_path"):
        align_modules([a, make_lora(4, 2, base="another-base", modules=("q_proj",))], ["m00", "m02"])
    with pytest.raises(LoraError, match=r"shape \(in, out\) of .*q_proj.*\(narrow\)"):
        align_modules([a, make_lora(4, 2, modules=("q_proj",), dim=8)], ["m00", "narrow"])
    with pytest.raises(LoraError, match="2 adapters but 1 names"):
        align_modules([a, more], ["m00"])


def test_refactor_is_exact_up_to_the_true_rank() -> None:
    g = rng(0)
    delta = torch.randn(DIM, 3, generator=g) @ torch.randn(3, DIM + 4, generator=g)
    for rank, alpha in [(3, 6.0), (5, 1.0), (40, 16.0)]:
        a, b = refactor(delta, rank, alpha)
        assert a.shape == (rank, DIM + 4) and b.shape == (DIM, rank) and a.dtype == torch.float32
        torch.testing.assert_close((alpha / rank) * b @ a, delta, **TOL)
    a, b = refactor(delta, 40, 16.0)
    assert torch.all(a[DIM + 4 :] == 0) and torch.all(b[:, DIM + 4 :] == 0)  # padding is zero components
    a, b = refactor(delta, 4, 8.0, use_rslora=True)
    torch.testing.assert_close((8.0 / 2.0) * b @ a, delta, **TOL)


def test_refactor_truncation_is_optimal_and_deterministic() -> None:
    delta = torch.randn(DIM, DIM, generator=rng(1), dtype=torch.float64)
    s = torch.linalg.svdvals(delta)
    a, b = refactor(delta, 4, 8.0)
    err = torch.linalg.matrix_norm(delta - 2.0 * b.double() @ a.double())
    assert float(err) == pytest.approx(float(s[4:].square().sum().sqrt()), rel=1e-5)  # Eckart-Young
    a2, b2 = refactor(delta, 4, 8.0)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    # the same update given as factors (the path the operators use) gives the same factors
    u, sv, vh = torch.linalg.svd(delta)
    a3, b3 = refactor_low_rank(u * sv, vh, 4, 8.0)
    torch.testing.assert_close(a3, a, **TOL)
    torch.testing.assert_close(b3, b, **TOL)


# ----------------------------------------------------------------------------- selection

FITNESS = [0.3, 0.9, 0.1, 0.9, 0.5, -0.2, 0.7, 0.0]


@pytest.mark.parametrize("name", sorted(SELECTION))
def test_selection_is_deterministic_and_refuses_nan(name: str) -> None:
    op = get_operator("selection", name)
    first = op(FITNESS, 20, rng(7))
    assert first == op(FITNESS, 20, rng(7))
    assert len(first) == 20 and all(0 <= i < len(FITNESS) for i in first)
    assert first != op(FITNESS, 20, rng(8))
    with pytest.raises(OperatorError, match="non-finite"):
        op([0.1, float("nan"), 0.3], 2, rng())
    with pytest.raises(OperatorError, match="non-finite"):
        op([0.1, float("inf")], 2, rng())


def test_truncation_picks_only_from_the_top() -> None:
    picks = truncation(FITNESS, 200, rng(1), fraction=0.25)  # top 2 of 8: indices 1 and 3 (tied 0.9)
    assert set(picks) == {1, 3}
    assert set(truncation(FITNESS, 50, rng(1), fraction=0.01)) == {1}  # at least one; tie goes to the lower index
    with pytest.raises(OperatorError):
        truncation(FITNESS, 2, rng(), fraction=0.0)


def test_tournament_of_everyone_picks_the_best() -> None:
    assert tournament(FITNESS, 30, rng(2), size=len(FITNESS)) == [1] * 30
    assert 5 not in tournament(FITNESS, 200, rng(2), size=2)  # the worst never wins a tournament of two
    with pytest.raises(OperatorError, match="tournament size"):
        tournament(FITNESS, 1, rng(), size=len(FITNESS) + 1)


def test_fitness_proportional() -> None:
    assert set(fitness_proportional([0.0, 0.0, 5.0, 0.0], 100, rng(3))) == {2}
    uniform = fitness_proportional([0.0] * 4, 400, rng(3))
    assert all(uniform.count(i) > 50 for i in range(4))
    assert fitness_proportional([-3.0, -1.0], 0, rng()) == []


def test_elites_break_ties_by_index() -> None:
    assert elites(FITNESS, 3) == [1, 3, 6]
    assert elites([1.0, 1.0, 1.0], 2) == [0, 1]
    assert elites(FITNESS, 0) == []
    with pytest.raises(OperatorError):
        elites(FITNESS, 9)


def test_unknown_operator_lists_the_known_names() -> None:
    with pytest.raises(OperatorError, match=r"known: \['dropout', 'gaussian', 'svd'\]"):
        get_operator("mutation", "gauss")
    with pytest.raises(OperatorError, match="known kinds"):
        get_operator("mutations", "gaussian")
    assert get_operator("crossover", "layer_wise") is layer_wise


# ----------------------------------------------------------------------------- crossover


@pytest.mark.parametrize("name", sorted(CROSSOVER))
def test_every_crossover_gives_the_requested_rank_and_alpha(name: str) -> None:
    parents = [make_lora(4, 0), make_lora(8, 1), make_lora(4, 2)]
    child = get_operator("crossover", name)(parents, [0.5, 0.3, 0.2], 6, 3.0, rng(), rank_policy="pad")
    assert (child.rank, child.alpha, child.config["r"], child.config["lora_alpha"]) == (6, 3.0, 6, 3)
    assert child.modules() == parents[0].modules()
    assert all(a.shape == (6, DIM) and b.shape == (DIM, 6) for a, b in child.factors.values())
    assert child.config["base_model_name_or_path"] == "tiny-substrate"


def test_weighted_average_reproduces_and_averages_updates() -> None:
    p0, p1 = make_lora(4, 0), make_lora(4, 1, alpha=4)
    assert_same_update(weighted_average([p0, p1], [1, 0], 4, 8.0, rng()), p0)
    assert_same_update(weighted_average([p0, p1], [0, 3], 4, 1.0, rng()), p1)
    mean = {m: 0.5 * (p0.delta(m) + p1.delta(m)) for m in p0.modules()}
    assert_same_update(weighted_average([p0, p1], [0.5, 0.5], 8, 16.0, rng()), mean)  # 4 + 4 <= 8: exact
    assert_same_update(weighted_average([p0, p1], [2, 2], 8, 16.0, rng()), mean)  # weights are normalised
    # below the sum of ranks: the best rank-4 approximation of the mean update
    small = weighted_average([p0, p1], [0.5, 0.5], 4, 8.0, rng())
    for m in p0.modules():
        sv = torch.linalg.svdvals(mean[m].double())
        err = torch.linalg.matrix_norm(mean[m].double() - small.delta(m).double())
        assert float(err) == pytest.approx(float(sv[4:].square().sum().sqrt()), rel=1e-3)


def test_crossover_weights_are_validated() -> None:
    p0, p1 = make_lora(4, 0), make_lora(4, 1)
    for bad in ([0, 0], [1, -1], [1]):
        with pytest.raises(OperatorError, match="weights"):
            weighted_average([p0, p1], bad, 4, 8.0, rng())
    with pytest.raises(OperatorError, match="rank_policy"):
        weighted_average([p0, p1], [1, 1], 4, 8.0, rng(), rank_policy="grow")
    with pytest.raises(LoraError, match="parent 1"):
        weighted_average([p0, make_lora(4, 1, base="other")], [1, 1], 4, 8.0, rng())


@pytest.mark.parametrize("op", [weighted_average, svd_interpolate])
def test_update_based_crossover_ignores_how_factors_are_rotated(op) -> None:
    p0, p1 = make_lora(4, 0), make_lora(4, 1)
    p1_rot = rotated(p1, 9)
    assert not torch.allclose(p1_rot.factors[p1.modules()[0]][0], p1.factors[p1.modules()[0]][0])
    assert_same_update(p1_rot, p1)
    plain = op([p0, p1], [0.6, 0.4], 4, 8.0, rng())
    assert_same_update(op([p0, p1_rot], [0.6, 0.4], 4, 8.0, rng()), plain)
    assert_same_update(op([rotated(p0, 3), p1], [0.6, 0.4], 4, 8.0, rng()), plain)


def test_svd_interpolate_of_a_parent_with_itself_returns_its_update() -> None:
    p = make_lora(4, 5)
    assert_same_update(svd_interpolate([p, p], [0.3, 0.7], 4, 8.0, rng()), p)
    assert_same_update(svd_interpolate([p, rotated(p, 1)], [0.5, 0.5], 4, 2.0, rng()), p)
    assert_same_update(svd_interpolate([p], [1.0], 8, 16.0, rng()), p)


def test_svd_interpolate_aligns_permuted_components() -> None:
    """A parent whose components are listed in another order is the same update: the child must be too."""
    p = make_lora(4, 6)
    perm = torch.tensor([2, 0, 3, 1])
    q = p.with_factors({m: (a[perm], b[:, perm]) for m, (a, b) in p.factors.items()}, 4, p.alpha)
    assert_same_update(svd_interpolate([p, q], [0.5, 0.5], 4, 8.0, rng()), p)


@pytest.mark.parametrize("op", [svd_interpolate, layer_wise])
def test_rank_mismatch_needs_a_policy(op) -> None:
    p4, p8 = make_lora(4, 0), make_lora(8, 1)
    with pytest.raises(OperatorError, match=r"ranks \[4, 8\].*rank_policy"):
        op([p4, p8], [0.5, 0.5], 4, 8.0, rng())
    for policy in ("truncate", "pad"):
        child = op([p4, p8], [0.5, 0.5], 6, 12.0, rng(), rank_policy=policy)
        assert child.rank == 6 and child.alpha == 12.0
        assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in child.factors.values())


def test_svd_interpolate_pad_with_an_untrained_parent_keeps_the_trained_directions() -> None:
    p = make_lora(4, 7)
    blank = make_lora(8, 8)
    blank = blank.with_factors({m: (a, torch.zeros_like(b)) for m, (a, b) in blank.factors.items()}, 8, 16)
    child = svd_interpolate([p, blank], [0.5, 0.5], 4, 8.0, rng(), rank_policy="pad")
    assert_same_update(child, {m: 0.5 * p.delta(m) for m in p.modules()})


def test_layer_wise_takes_each_layer_whole_from_one_parent() -> None:
    parents = [make_lora(4, 0, head=True), make_lora(4, 1, alpha=4, head=True), make_lora(4, 2, head=True)]
    weights = [0.4, 0.4, 0.2]
    child = layer_wise(parents, weights, 4, 2.0, rng(11))
    plan = layer_wise_plan(2, [w / sum(weights) for w in weights], rng(11))
    for layer in (0, 1):
        mods = [m for m in child.modules() if child.layer_of(m) == layer]
        sources = [i for i, p in enumerate(parents) if all(torch.allclose(child.delta(m), p.delta(m)) for m in mods)]
        assert sources == [plan[layer]]
        a_child, a_parent = child.factors[mods[0]][0], parents[plan[layer]].factors[mods[0]][0]
        assert torch.equal(a_child, a_parent)  # equal ranks: the factors are copied, only B is rescaled
    assert torch.allclose(child.delta(HEAD), parents[0].delta(HEAD))  # no layer index: first parent
    plans = {tuple(layer_wise_plan(2, weights, rng(s))) for s in range(40)}
    assert len(plans) > 1 and all(set(p) <= {0, 1, 2} for p in plans)
    assert set(layer_wise_plan(50, [0.0, 1.0], rng(0))) == {1}


def test_layer_wise_refactors_when_ranks_differ() -> None:
    p4, p8 = make_lora(4, 0), make_lora(8, 1)
    child = layer_wise([p4, p8], [0.0, 1.0], 8, 16.0, rng(), rank_policy="pad")  # all layers from p8, same rank
    assert_same_update(child, p8)
    grown = layer_wise([p4, p8], [1.0, 0.0], 8, 16.0, rng(), rank_policy="pad")  # p4 refactored up: exact
    assert_same_update(grown, p4)


# ----------------------------------------------------------------------------- mutation


@pytest.mark.parametrize("name", sorted(MUTATION))
def test_mutation_contract(name: str) -> None:
    op = get_operator("mutation", name)
    w = make_lora(4, 3)
    same = op(w, 0.0, rng())
    assert same is not w and same_weights(same, w) and same.config == w.config
    m1, m1_again, m2 = op(w, 0.3, rng(1)), op(w, 0.3, rng(1)), op(w, 0.3, rng(2))
    assert not same_weights(m1, w)
    assert same_weights(m1, m1_again)
    assert not same_weights(m1, m2)
    assert (m1.rank, m1.alpha, m1.config) == (w.rank, w.alpha, w.config)
    assert all(a.shape == (4, DIM) and b.shape == (DIM, 4) for a, b in m1.factors.values())
    with pytest.raises(OperatorError, match="strength"):
        op(w, -0.1, rng())


def test_gaussian_moves_an_untrained_b() -> None:
    w = make_lora(4, 4)
    w = w.with_factors({m: (a, torch.zeros_like(b)) for m, (a, b) in w.factors.items()}, 4, 8)
    mutated = get_operator("mutation", "gaussian")(w, 0.1, rng())
    for m in w.modules():
        b = mutated.factors[m][1]
        assert b.abs().max() > 0 and b.abs().max() < 0.01


def test_dropout_zeroes_whole_components() -> None:
    w = make_lora(8, 5)
    dropped = get_operator("mutation", "dropout")(w, 0.5, rng(3))
    n_dropped = 0
    for m in w.modules():
        (a, b), (a0, b0) = dropped.factors[m], w.factors[m]
        gone_a, gone_b = (a == 0).all(dim=1), (b == 0).all(dim=0)
        assert torch.equal(gone_a, gone_b) and not gone_a.all()
        keep = ~gone_a
        assert torch.equal(a[keep], a0[keep])
        torch.testing.assert_close(b[:, keep], b0[:, keep] / 0.5)
        n_dropped += int(gone_a.sum())
    assert n_dropped > 0
    # p is capped at 0.9, and one component always survives: the largest
    heavy = get_operator("mutation", "dropout")(w, 5.0, rng(0))
    assert all(not (a == 0).all() for a, _ in heavy.factors.values())


def test_svd_mutation_keeps_the_rank() -> None:
    w = make_lora(4, 6)
    mutated = get_operator("mutation", "svd")(w, 0.2, rng(4))
    for m in w.modules():
        assert int(torch.linalg.matrix_rank(mutated.delta(m))) == 4
        change = torch.linalg.matrix_norm(mutated.delta(m) - w.delta(m)) / torch.linalg.matrix_norm(w.delta(m))
        assert 0 < float(change) < 1.5


# ----------------------------------------------------------------------------- replacement


def test_weakest_replaces_the_least_fit_non_elites() -> None:
    fitness = [0.5, 0.1, 0.9, 0.1, 0.3, 0.0]
    assert weakest(fitness, 3, [5]) == [3, 1, 4]  # 5 is elite; the 0.1 tie replaces the higher index first
    assert weakest(fitness, 0, []) == []
    assert weakest(fitness, 4, [2, 0]) == [5, 3, 1, 4]
    with pytest.raises(OperatorError, match="cannot place 5 offspring"):
        weakest(fitness, 5, [2, 0])
    with pytest.raises(OperatorError, match="non-finite"):
        weakest([0.1, float("nan")], 1, [])
    with pytest.raises(OperatorError, match="out of range"):
        weakest(fitness, 1, [6])


def test_generational_replaces_every_non_elite() -> None:
    fitness = [0.5, 0.1, 0.9, 0.1]
    assert generational(fitness, 2, [2, 0]) == [1, 3]
    assert generational(fitness, 4, []) == [0, 1, 2, 3]
    with pytest.raises(OperatorError, match="exactly 2 offspring"):
        generational(fitness, 1, [2, 0])
