"""``label_peers: routed``: the population's router picks each problem's labellers (the routed ensemble teaches).

Fast: the labels from given routed groups, the config's refusals, and the router-backed groups on the
embedded population (its router and base model, no engine): the top-k gates of each prompt, positional
over the slots, refused without a router or with a router of another size. The run end to end is in
tests/test_engine_e2e.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from test_curriculum import HIDDEN, _evidence

from ensemble_serve.shared.embedded import EMBEDDED_POPULATION
from ensemble_serve.shared.population import load_population
from ensemble_serve.shared.router import RouterFeatures, load_router
from trainer.evolve.config import EvolveConfig
from trainer.evolve.labels import labellers, labelling_chains, member_labels
from trainer.evolve.routed import RoutedPeers, RoutedPeersError, routed_summary
from trainer.evolve.run import config_hash
from trainer.tasks.sandbox import generate_problems

ROUTED = dict(HIDDEN, label_peers="routed", label_rule="consensus", min_agreement=0.6)


def test_the_routed_members_label_each_problem():
    ev = _evidence({"a": ["1", "7"], "b": ["1", "8"], "c": ["2", "8"], "d": ["2", "8"]}, ["add", "sub"])
    cfg = EvolveConfig(**ROUTED)
    routed = [["a", "b"], ["c", "d"]]
    assert labellers(ev.problems, ev.members, cfg, routed=routed) == routed
    labels = member_labels(ev, cfg, routed=routed)
    assert labels == {m: ["1", "8"] for m in "abcd"}  # every member learns the routed group's consensus
    # all four would split 2/2 on the first problem: below the threshold, no label
    assert member_labels(ev, EvolveConfig(**{**ROUTED, "label_peers": "all"}))["c"] == [None, "8"]
    chains = labelling_chains(ev.candidates, ev.problems, ev.members, cfg, routed=routed)
    assert [len(c) for c in chains] == [2, 2]


def test_leave_self_out_within_the_routed_group():
    ev = _evidence({"a": ["1"], "b": ["1"], "c": ["2"]}, ["add"])
    cfg = EvolveConfig(**{**ROUTED, "label_rule": "leave_self_out"})
    labels = member_labels(ev, cfg, routed=[["a", "b"]])
    assert labels == {"a": ["1"], "b": ["1"], "c": ["1"]}  # a by b, b by a, c (not routed) by a and b


def test_an_empty_routed_group_falls_back_to_every_member_and_groups_are_required():
    ev = _evidence({"a": ["1"], "b": ["1"]}, ["add"])
    cfg = EvolveConfig(**ROUTED)
    assert labellers(ev.problems, ev.members, cfg, routed=[[]]) == [["a", "b"]]
    with pytest.raises(ValueError, match="routed members"):
        labellers(ev.problems, ev.members, cfg)
    with pytest.raises(ValueError, match="routed members"):
        labellers(ev.problems, ev.members, cfg, routed=[["a"], ["b"]])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"label_top_k": 2}, "needs label_peers: routed"),
        ({"label_peers": "routed", "label_top_k": 0}, "greater than or equal to 1"),
        ({"label_peers": "routed", "label_top_k": 2.5}, "label_top_k"),
        ({"label_peers": "routers"}, "label_peers"),
        (
            {**HIDDEN, "label_peers": "routed", "retention": {"teachers": True}},
            "both choose who labels",
        ),
    ],
)
def test_bad_routed_settings_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        EvolveConfig(**settings)


def test_label_top_k_leaves_the_hashes_of_earlier_runs_alone():
    assert config_hash(EvolveConfig()) == config_hash(EvolveConfig(label_top_k=None))
    routed = EvolveConfig(label_peers="routed")
    assert config_hash(routed) != config_hash(routed.model_copy(update={"label_top_k": 3}))


# --------------------------------------------------------------------------- the router picks the groups


@pytest.fixture(scope="module")
def population():
    return load_population(EMBEDDED_POPULATION)


@pytest.fixture(scope="module")
def problems():
    return generate_problems(24, seed=5, split="heldout")


def test_groups_are_the_top_k_gates_of_the_servers_router(population, problems):
    peers = RoutedPeers(population, EvolveConfig(**ROUTED))
    assert peers.k == population.manifest.ensemble_defaults["members"] == 4  # the default request's size
    groups = peers.groups(problems, population.names)
    router = load_router(EMBEDDED_POPULATION / "router")
    with torch.no_grad():
        gates = router(RouterFeatures(population.base_model_path)([p.prompt for p in problems], router.feature))
    for row, group in zip(gates, groups):
        order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))[:4]
        assert group == [population.names[i] for i in order]
    focus = {m.name: m.info["focus_domain"] for m in population.manifest.members}
    summary = routed_summary(problems, groups, focus, peers.k)
    assert summary["top_k"] == 4 and summary["problems"] == 24
    # two specialists a family among the 4 routed members: at most half of them are the family's
    assert 0.0 <= summary["own_family_share"] <= 0.5


def test_the_summary_counts_the_family_specialists_among_the_labellers():
    problems = generate_problems(2, seed=1, split="heldout", domains=["add"])
    focus = {"a": "add", "b": "sub", "s": None}
    summary = routed_summary(problems, [["a", "b"], ["a", "s"]], focus, 2)
    assert summary == {"top_k": 2, "problems": 2, "own_family_share": round(2 / 3, 4)}  # s has no family
    assert routed_summary(problems, [["s"], ["s"]], focus, 1)["own_family_share"] is None


def test_gates_are_positional_over_the_slots(population, problems):
    peers = RoutedPeers(population, EvolveConfig(**{**ROUTED, "label_top_k": 1}))
    renamed = [f"child{i}" for i in range(len(population.names))]  # evolution's children in the same slots
    assert [[n.replace("child", "") for n in g] for g in peers.groups(problems, renamed)] == [
        [str(population.names.index(g[0]))] for g in peers.groups(problems, population.names)
    ]
    with pytest.raises(RoutedPeersError, match="now has 11 members"):
        peers.groups(problems, population.names[:-1])
    assert peers.groups([], population.names) == []


def test_label_top_k_is_capped_by_the_population(population):
    assert RoutedPeers(population, EvolveConfig(**{**ROUTED, "label_top_k": 50})).k == len(population.names)


def test_non_finite_gates_are_labelled_by_every_member(population, problems):
    peers = RoutedPeers(population, EvolveConfig(**ROUTED))
    with torch.no_grad():
        next(peers.router.parameters()).fill_(float("nan"))
    assert peers.groups(problems[:2], population.names) == [list(population.names)] * 2


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "pop"
    shutil.copytree(EMBEDDED_POPULATION, root)
    manifest = json.loads((root / "population.json").read_text())
    manifest["base_model"]["path"] = str(load_population(EMBEDDED_POPULATION).base_model_path.resolve())
    (root / "population.json").write_text(json.dumps(manifest))
    return root


def test_a_population_without_a_router_is_refused(tmp_path: Path):
    root = _copy(tmp_path)
    manifest = json.loads((root / "population.json").read_text())
    manifest["router"] = None
    (root / "population.json").write_text(json.dumps(manifest))
    with pytest.raises(RoutedPeersError, match="has none"):
        RoutedPeers(load_population(root), EvolveConfig(**ROUTED))


def test_a_corrupt_router_is_refused(tmp_path: Path):
    root = _copy(tmp_path)
    (weights,) = (root / "router").glob("*.safetensors")
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(RoutedPeersError, match="cannot be used"):
        RoutedPeers(load_population(root), EvolveConfig(**ROUTED))


def test_a_router_of_another_size_is_refused(tmp_path: Path):
    root = _copy(tmp_path)
    manifest = json.loads((root / "population.json").read_text())
    manifest["members"] = manifest["members"][:-1]  # a member fewer than the router has gates
    (root / "population.json").write_text(json.dumps(manifest))
    with pytest.raises(RoutedPeersError, match="12 gates and the population 11"):
        RoutedPeers(load_population(root), EvolveConfig(**ROUTED))
