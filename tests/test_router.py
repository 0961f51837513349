"""Tests for the mixture router: ensemble_serve.shared.router (inference, files) and trainer.router.train (training)."""

from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import pytest
import torch

from ensemble_serve.shared.population import read_manifest
from ensemble_serve.shared.router import (
    ROUTER_CONFIG,
    ROUTER_WEIGHTS,
    Router,
    RouterConfig,
    RouterError,
    RouterFeatures,
    anneal_temperature,
    load_router,
    normalised_weights,
    safe_gates,
    save_router,
    top_k,
)
from trainer.router.train import (
    RouterExample,
    RouterTrainConfig,
    quality_targets,
    specialisation_score,
    specialisation_table,
    targets_from_correctness,
    targets_from_loglik,
    train_router,
)

MEMBERS = ["m00", "m01", "m02"]
BASE = "tiny-base"
VARIANTS = ["softmax", "sigmoid_floor"]
# Cluster c's best member is BEST[c]: deliberately not the identity, so index order cannot fake a pass.
BEST = [2, 0, 1]
DOMAINS = ["alpha", "beta", "gamma"]
# What the inference-side router may import: the standard library, torch, pydantic, safetensors, transformers.
SERVER_SIDE_IMPORTS = {
    *("__future__", "collections", "json", "math", "os", "pathlib", "re", "threading", "typing"),
    *("ensemble_serve", "pydantic", "safetensors", "torch", "transformers"),
}


def make_router(variant: str, input_dim: int = 8, hidden_dim: int = 0, seed: int = 0, **kw: object) -> Router:
    torch.manual_seed(seed)
    return Router(
        RouterConfig(
            variant=variant, members=MEMBERS, input_dim=input_dim, hidden_dim=hidden_dim, base_model=BASE, **kw
        )
    )


def clusters(n_per: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """Three well-separated clusters in 8-D on a large offset/scale (the router must standardise).

    Returns features, cluster ids, domains, and noisy correctness: the cluster's best member is
    right 90% of the time, every other member 20% of the time.
    """
    g = torch.Generator().manual_seed(1234)  # same centres for train and test sets
    centres = torch.randn(3, 8, generator=g) * 3.0
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(3).repeat_interleave(n_per)
    x = centres[ids] + 0.5 * torch.randn(len(ids), 8, generator=g)
    x = 50.0 + 100.0 * x
    p_right = torch.full((len(ids), 3), 0.2)
    p_right[torch.arange(len(ids)), torch.tensor(BEST)[ids]] = 0.9
    correct = torch.bernoulli(p_right, generator=g)
    return x, ids, [DOMAINS[i] for i in ids.tolist()], correct


def train_cfg(variant: str, **kw: object) -> RouterTrainConfig:
    return RouterTrainConfig(variant=variant, steps=300, batch_size=64, seed=7, **kw)


@pytest.fixture(scope="module")
def trained() -> dict[str, Router]:
    """One router per variant trained on the clusters (shared: training is the slow part)."""
    x, _, domains, correct = clusters(100, seed=0)
    out = {}
    for v in VARIANTS:
        router, _ = train_router(x, targets_from_correctness(correct), MEMBERS, BASE, train_cfg(v), domains=domains)
        out[v] = router
    return out


# --------------------------------------------------------------------------- config and module


def test_config_defaults_feature_and_temperature_from_variant() -> None:
    soft = RouterConfig(variant="softmax", members=MEMBERS, input_dim=4, base_model=BASE)
    sig = RouterConfig(variant="sigmoid_floor", members=MEMBERS, input_dim=4, base_model=BASE, t_end=0.3)
    crossed = RouterConfig(variant="softmax", feature="hidden_mean", members=MEMBERS, input_dim=4, base_model=BASE)
    assert (soft.feature, sig.feature, crossed.feature) == ("embedding_mean", "hidden_mean", "hidden_mean")
    assert (soft.temperature, sig.temperature) == (0.5, 0.3)
    with pytest.raises(ValueError, match="t_end"):
        RouterConfig(variant="sigmoid_floor", members=MEMBERS, input_dim=4, base_model=BASE, t_start=0.5, t_end=1.0)
    with pytest.raises(ValueError, match="duplicate member names"):
        RouterConfig(variant="softmax", members=["a", "a"], input_dim=4, base_model=BASE)


@pytest.mark.parametrize("hidden_dim", [0, 16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_and_gate_ranges(variant: str, hidden_dim: int) -> None:
    router = make_router(variant, hidden_dim=hidden_dim)
    gates = router(torch.randn(5, 8))
    assert gates.shape == (5, 3)
    if variant == "softmax":
        torch.testing.assert_close(gates.sum(dim=1), torch.ones(5))
        assert torch.equal(router.floors(), torch.zeros(3))
    else:
        assert bool((gates >= router.floors()).all()) and bool((gates <= 1).all())
        # phi starts at 0, so every floor starts at floor_max / 2.
        torch.testing.assert_close(router.floors(), torch.full((3,), 0.05))
    with pytest.raises(RouterError, match=r"shape \[B, 8\]"):
        router(torch.randn(5, 7))


def test_sigmoid_floor_gates_stay_on_their_floors_for_huge_negative_logits() -> None:
    router = make_router("sigmoid_floor")
    with torch.no_grad():
        router.out.weight.fill_(1.0)
        router.out.bias.zero_()
        router.phi.copy_(torch.tensor([-3.0, 0.0, 3.0]))
    low = router(torch.full((2, 8), -1e4))  # logits ~ -8e4
    high = router(torch.full((2, 8), 1e4))
    floors = router.floors()
    assert bool((floors > 0).all()) and bool((floors < router.cfg.floor_max).all())
    assert bool((low >= floors).all())
    torch.testing.assert_close(low, floors.expand(2, 3))
    assert bool((high <= 1).all()) and bool((high > 0.999).all())


def test_floor_stays_positive_even_when_phi_runs_away() -> None:
    router = make_router("sigmoid_floor")
    with torch.no_grad():
        router.phi.fill_(-1e6)
    assert bool((router.floors() > 0).all())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_temperature_anneal_follows_schedule_within_bounds(schedule: str) -> None:
    total, ts, te = 101, 2.0, 0.5
    assert anneal_temperature(0, total, ts, te, schedule) == ts
    assert anneal_temperature(-5, total, ts, te, schedule) == ts
    assert anneal_temperature(50, total, ts, te, schedule) == pytest.approx((ts + te) / 2)
    assert anneal_temperature(100, total, ts, te, schedule) == pytest.approx(te)
    assert anneal_temperature(10_000, total, ts, te, schedule) == te
    quarter = anneal_temperature(25, total, ts, te, schedule)
    expected = ts - 0.25 * (ts - te) if schedule == "linear" else te + (ts - te) * 0.5 * (1 + math.cos(math.pi / 4))
    assert quarter == pytest.approx(expected)
    values = [anneal_temperature(s, total, ts, te, schedule) for s in range(-3, 130)]
    assert all(te <= t <= ts for t in values)
    assert all(a >= b for a, b in zip(values, values[1:]))  # never heats up again
    router = make_router("sigmoid_floor", anneal=schedule)
    assert router.anneal(50, total) == pytest.approx((ts + te) / 2)
    assert router.temperature == pytest.approx((ts + te) / 2)


def test_temperature_sharpens_sigmoid_gates_but_not_softmax() -> None:
    x = torch.randn(4, 8)
    sig, soft = make_router("sigmoid_floor"), make_router("softmax")
    sig.set_temperature(2.0)
    soft.set_temperature(2.0)
    warm_sig, warm_soft = sig(x), soft(x)
    sig.set_temperature(0.25)
    soft.set_temperature(0.25)
    assert not torch.allclose(sig(x), warm_sig)
    torch.testing.assert_close(soft(x), warm_soft)
    with pytest.raises(ValueError, match="temperature"):
        sig.set_temperature(0.0)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_learns_which_member_is_best_per_cluster(trained: dict[str, Router], variant: str) -> None:
    router = trained[variant]
    x, ids, _, _ = clusters(100, seed=99)  # held-out points from the same clusters
    with torch.no_grad():
        gates = router(x)
    picks = torch.tensor([top_k(g, 1)[0] for g in gates])
    accuracy = (picks == torch.tensor(BEST)[ids]).float().mean().item()
    assert accuracy >= 0.9
    assert router.cfg.trained_steps == 300
    assert router.temperature == 0.5  # left at t_end for inference


@pytest.mark.parametrize("variant", VARIANTS)
def test_specialisation_table_puts_each_clusters_member_on_top(trained: dict[str, Router], variant: str) -> None:
    metrics = trained[variant].cfg.metrics
    table = metrics["specialisation"]
    assert sorted(table) == DOMAINS
    for c, domain in enumerate(DOMAINS):
        row = table[domain]
        assert max(row, key=row.__getitem__) == MEMBERS[BEST[c]]
    assert metrics["specialisation_score"] > 0.3
    assert metrics["loss_curve"][0][0] == 0 and metrics["loss_curve"][-1][0] == 299
    assert metrics["final_loss"] < metrics["loss_curve"][0][1]
    assert set(metrics["mean_gate"]) == set(MEMBERS)


def test_training_is_deterministic_per_seed() -> None:
    x, _, _, correct = clusters(30, seed=3)
    cfg = RouterTrainConfig(variant="sigmoid_floor", steps=40, batch_size=16, hidden_dim=4, seed=11)
    a, ma = train_router(x, correct, MEMBERS, BASE, cfg)
    b, mb = train_router(x, correct, MEMBERS, BASE, cfg)
    c, _ = train_router(x, correct, MEMBERS, BASE, cfg.model_copy(update={"seed": 12}))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ma["loss_curve"] == mb["loss_curve"]
    assert not torch.equal(sa["out.weight"], sc["out.weight"])


def test_softmax_training_skips_rows_where_every_member_failed() -> None:
    x, ids, _, _ = clusters(40, seed=5)
    quality = torch.zeros(len(ids), 3)
    quality[torch.arange(len(ids)), torch.tensor(BEST)[ids]] = 1.0
    quality[ids == 0] = 0.0  # cluster 0: all members wrong, so no relative signal
    router, metrics = train_router(x, quality, MEMBERS, BASE, RouterTrainConfig(variant="softmax", steps=150, seed=0))
    # Only 80 of 120 rows carry a target; the clusters that have one are still learnt.
    assert metrics["examples"] == 120
    with torch.no_grad():
        gates = router(x[ids != 0])
    picks = torch.tensor([top_k(g, 1)[0] for g in gates])
    assert (picks == torch.tensor(BEST)[ids[ids != 0]]).float().mean().item() >= 0.9


def test_train_router_rejects_mismatched_inputs() -> None:
    x = torch.randn(10, 8)
    cfg = RouterTrainConfig(variant="softmax", steps=1)
    with pytest.raises(ValueError, match=r"quality must be \[N, M\] = \[10, 3\]"):
        train_router(x, torch.zeros(10, 2), MEMBERS, BASE, cfg)
    with pytest.raises(ValueError, match=r"finite and in \[0, 1\]"):
        train_router(x, torch.full((10, 3), 1.5), MEMBERS, BASE, cfg)


def test_quality_targets_and_target_helpers() -> None:
    examples = [RouterExample("2+2", "arith", [1, 0, 0.5]), RouterExample("sort 3 1", "sort", [0, 1, 1])]
    prompts, domains, q = quality_targets(examples, MEMBERS)
    assert prompts == ["2+2", "sort 3 1"] and domains == ["arith", "sort"]
    assert torch.equal(q, torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="expected one per member"):
        quality_targets([RouterExample("p", "d", [1.0])], MEMBERS)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        quality_targets([RouterExample("p", "d", [1.0, 2.0, 0.0])], MEMBERS)
    assert torch.equal(targets_from_correctness(torch.tensor([[True, False], [False, True]])), torch.eye(2))
    assert torch.equal(targets_from_correctness(torch.tensor([[1.7, -0.2]])), torch.tensor([[1.0, 0.0]]))
    soft = targets_from_loglik(torch.tensor([[-1.0, -1.0, -3.0]]), tau=1.0)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(1))
    assert soft[0, 0] == soft[0, 1] and soft[0, 0] > soft[0, 2]
    assert targets_from_loglik(torch.tensor([[-1.0, -3.0]]), tau=10.0)[0, 0] < soft[0, 0] + 0.3


def test_specialisation_table_means_per_domain() -> None:
    gates = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    table = specialisation_table(gates, ["a", "a", "b"], ["x", "y"])
    assert table == {"a": pytest.approx({"x": 0.8, "y": 0.2}), "b": pytest.approx({"x": 0.2, "y": 0.8})}
    assert specialisation_score(table) == pytest.approx(0.6)


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip_gives_identical_gates(trained: dict[str, Router], variant: str, tmp_path: Path) -> None:
    router = trained[variant]
    folder = save_router(router, tmp_path / "router")
    assert sorted(p.name for p in folder.iterdir()) == [ROUTER_CONFIG, ROUTER_WEIGHTS]
    loaded = load_router(folder, expected_members=MEMBERS, base_model=BASE)
    x = torch.randn(6, 8) * 100
    with torch.no_grad():
        assert torch.equal(loaded(x), router(x))
        assert torch.equal(loaded.floors(), router.floors())
    assert loaded.config() == router.config()
    assert loaded.cfg.metrics["specialisation"] == router.cfg.metrics["specialisation"]
    assert not loaded.training


def test_save_replaces_an_existing_router_and_leaves_no_temp_folders(tmp_path: Path) -> None:
    first, second = make_router("softmax", seed=1), make_router("sigmoid_floor", seed=2)
    save_router(first, tmp_path / "router")
    save_router(second, tmp_path / "router")
    assert load_router(tmp_path / "router").cfg.variant == "sigmoid_floor"
    assert [p.name for p in tmp_path.iterdir()] == ["router"]


@pytest.mark.parametrize(
    ("expected", "message"),
    [
        (["m00", "m01", "m02", "m03"], r"no gate for population member\(s\) \['m03'\]"),
        (["m00", "m01"], r"gates for member\(s\) \['m02'\] that are not in the population"),
        (["m02", "m00", "m01"], "same members in a different order"),
        (["m00", "m01", "m02", "m02"], "member count differs: router has 3, population has 4"),
    ],
    ids=["missing", "extra", "reordered", "count"],
)
def test_load_refuses_a_router_for_other_members(tmp_path: Path, expected: list[str], message: str) -> None:
    save_router(make_router("sigmoid_floor"), tmp_path / "router")
    with pytest.raises(RouterError, match="router was trained for another population") as info:
        load_router(tmp_path / "router", expected_members=expected)
    assert info.match(message)


def test_load_refuses_another_base_model(tmp_path: Path) -> None:
    save_router(make_router("softmax"), tmp_path / "router")
    with pytest.raises(RouterError, match="trained on base model 'tiny-base', but the population uses 'other-base'"):
        load_router(tmp_path / "router", base_model="other-base")


def test_load_turns_damaged_files_into_router_errors(tmp_path: Path) -> None:
    folder = save_router(make_router("sigmoid_floor"), tmp_path / "router")
    weights, config = folder / ROUTER_WEIGHTS, folder / ROUTER_CONFIG
    good_weights, good_config = weights.read_bytes(), config.read_text()

    weights.write_bytes(os.urandom(512))
    with pytest.raises(RouterError, match="not a readable safetensors file"):
        load_router(folder)
    weights.write_bytes(good_weights)

    raw = json.loads(good_config)
    config.write_text(json.dumps({**raw, "variant": "mixture_of_experts"}))
    with pytest.raises(RouterError, match="invalid router config") as info:
        load_router(folder)
    assert info.match("variant")

    config.write_text(json.dumps({**raw, "hidden_dim": 4}))  # the weights are for a linear router
    with pytest.raises(RouterError, match=r"missing tensors \['hidden.bias', 'hidden.weight'\]"):
        load_router(folder)

    config.write_text(json.dumps({**raw, "input_dim": 9}))
    with pytest.raises(RouterError, match="implies"):
        load_router(folder)

    config.write_text("{not json")
    with pytest.raises(RouterError, match="not readable JSON"):
        load_router(folder)

    config.unlink()
    with pytest.raises(RouterError, match="router config is missing"):
        load_router(folder)
    with pytest.raises(RouterError, match="router folder not found"):
        load_router(tmp_path / "nowhere")


def test_load_refuses_non_finite_weights(tmp_path: Path) -> None:
    router = make_router("softmax")
    with torch.no_grad():
        router.out.bias[1] = float("nan")
    save_router(router, tmp_path / "router")
    with pytest.raises(RouterError, match="'out.bias' contains NaN or inf"):
        load_router(tmp_path / "router")


# --------------------------------------------------------------------------- serving helpers


@pytest.mark.parametrize("variant", VARIANTS)
def test_safe_gates_passes_healthy_routers(variant: str) -> None:
    router = make_router(variant)
    x = torch.randn(4, 8)
    gates, problem = safe_gates(router, x)
    assert problem is None
    assert gates is not None and torch.equal(gates, router(x).detach())


@pytest.mark.parametrize("variant", VARIANTS)
def test_safe_gates_reports_nan_weights(variant: str) -> None:
    router = make_router(variant)
    with torch.no_grad():
        router.out.weight.fill_(float("nan"))
    assert safe_gates(router, torch.randn(2, 8)) == (None, "router produced non-finite gates (NaN or inf)")


def test_safe_gates_reports_gates_below_their_floors(monkeypatch: pytest.MonkeyPatch) -> None:
    router = make_router("sigmoid_floor")
    monkeypatch.setattr(router, "forward", lambda features: torch.zeros(features.shape[0], 3))
    gates, problem = safe_gates(router, torch.randn(2, 8))
    assert gates is None
    assert problem == "gates fell below their floors for member(s) ['m00', 'm01', 'm02']"


def test_safe_gates_reports_softmax_rows_not_summing_to_one_and_wrong_features(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    router = make_router("softmax")
    gates, problem = safe_gates(router, torch.randn(2, 5))
    assert gates is None and problem is not None and "expects features of shape [B, 8]" in problem
    monkeypatch.setattr(router, "forward", lambda features: torch.full((features.shape[0], 3), 0.2))
    gates, problem = safe_gates(router, torch.randn(2, 8))
    assert gates is None and problem is not None and problem.startswith("softmax gates do not sum to 1")


def test_top_k_breaks_ties_by_lower_index_and_weights_sum_to_one() -> None:
    gates = torch.tensor([0.3, 0.7, 0.3, 0.7, 0.1])
    assert top_k(gates, 1) == [1]
    assert top_k(gates, 3) == [1, 3, 0]
    assert top_k(gates, 10) == [1, 3, 0, 2, 4]
    weights = normalised_weights(gates, [1, 0])
    assert weights == pytest.approx([0.7, 0.3])
    assert normalised_weights(torch.zeros(3), [0, 2]) == [0.5, 0.5]
    with pytest.raises(ValueError, match="k must be"):
        top_k(gates, 0)
    with pytest.raises(ValueError, match="NaN"):
        top_k(torch.tensor([float("nan"), 1.0]), 1)
    with pytest.raises(ValueError, match="out of range"):
        normalised_weights(gates, [7])


def test_server_side_module_never_imports_the_trainer() -> None:
    package = Path(__file__).resolve().parent.parent / "ensemble_serve" / "shared" / "router"
    sources = sorted(package.glob("*.py"))
    assert sources
    modules = set()
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules.add(node.module.split(".")[0])
    assert "trainer" not in modules
    assert modules <= SERVER_SIDE_IMPORTS


# --------------------------------------------------------------------------- features on a real base


@pytest.fixture(scope="module")
def features(tiny_substrate: Path) -> RouterFeatures:
    return RouterFeatures(tiny_substrate, batch_size=4)


@pytest.mark.parametrize("feature", ["embedding_mean", "hidden_mean"])
def test_router_features_are_finite_per_prompt_vectors(features: RouterFeatures, feature: str) -> None:
    prompts = ["12+34=", "sort: 3 1 2", "What is 7*8?"]
    out = features(prompts, feature)
    assert features.dim(feature) == 64
    assert out.shape == (3, 64) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    assert not torch.allclose(out[0], out[1], atol=1e-4)


@pytest.mark.parametrize("feature", ["embedding_mean", "hidden_mean"])
def test_router_features_do_not_depend_on_padding(features: RouterFeatures, feature: str) -> None:
    short = "1+1="
    alone = features([short], feature)
    batched = features([short, "a much longer prompt: " + "9" * 60, "x"], feature)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    # Batching across the internal batch_size (4) must not change a row either.
    many = features(["x"] * 5 + [short], feature)
    torch.testing.assert_close(many[5], alone[0], atol=1e-5, rtol=1e-5)


def test_hidden_mean_is_the_final_normed_hidden_state(features: RouterFeatures) -> None:
    prompt = "what is 3+4?"
    text = features.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert features.render(prompt) == text
    ids = features.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = features.model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(features([prompt], "hidden_mean")[0], out.hidden_states[-1][0].mean(dim=0))
    emb = features.model.get_input_embeddings()(ids)[0].mean(dim=0)
    torch.testing.assert_close(features([prompt], "embedding_mean")[0], emb)
    assert features([], "hidden_mean").shape == (0, 64)


def test_router_on_real_features_fits_a_real_population(
    features: RouterFeatures, tiny_population: Path, tmp_path: Path
) -> None:
    manifest = read_manifest(tiny_population)
    names = manifest.names
    prompts = [f"{a}+{b}=" for a in range(6) for b in range(3)] + [f"sort: {a} {b}" for a in range(6) for b in range(3)]
    domains = ["add"] * 18 + ["sort"] * 18
    quality = torch.zeros(36, len(names))
    quality[:18, 0] = 1.0
    quality[18:, len(names) - 1] = 1.0
    x = features(prompts, "hidden_mean")
    cfg = RouterTrainConfig(variant="sigmoid_floor", steps=100, seed=0)
    router, metrics = train_router(x, quality, names, manifest.base_model.name, cfg, domains=domains)
    save_router(router, tmp_path / "router")
    loaded = load_router(tmp_path / "router", expected_members=names, base_model=manifest.base_model.name)
    gates, problem = safe_gates(loaded, features(["2+2=", "sort: 5 1"], loaded.feature))
    assert problem is None and gates is not None
    assert top_k(gates[0], 1) == [0] and top_k(gates[1], 1) == [len(names) - 1]
    assert metrics["specialisation"]["add"][names[0]] > metrics["specialisation"]["sort"][names[0]]
