"""Tests for ensemble_serve.shared.population: the population directory contract."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE), str(_HERE.parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import pytest  # noqa: E402
from fixtures_population import (  # noqa: E402
    BASE_NAME,
    copy_dir,
    logits_with_adapter,
    make_adapter,
    make_base_model,
    read_raw_manifest,
    set_adapter_config,
    write_raw_manifest,
)
from pydantic import ValidationError  # noqa: E402

from ensemble_serve.shared.fsutil import atomic_write_text, tmp_dir_beside  # noqa: E402
from ensemble_serve.shared.population import (  # noqa: E402
    FORMAT_VERSION,
    BaseModelRef,
    Manifest,
    Member,
    PopulationError,
    append_history,
    commit_generation,
    create_population,
    fingerprint_model_dir,
    load_population,
    prune_unreferenced,
    read_history,
    read_manifest,
    write_manifest,
)

# name -> (rank, alpha, seed) of the adapters built once per session
SPECS = {"alpha": (4, 8.0, 1), "beta": (8, 16.0, 2), "gamma": (4, 8.0, 3)}


@dataclass(frozen=True)
class Assets:
    base: Path
    other_base: Path
    adapters: dict[str, Path]


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    d = tmp_path_factory.mktemp("assets")
    base = make_base_model(d / "base", seed=0)
    other = make_base_model(d / "other-base", seed=7)
    adapters = {
        name: make_adapter(base, d / f"adapter-{name}", rank=r, alpha=a, seed=s) for name, (r, a, s) in SPECS.items()
    }
    (adapters["alpha"] / "optimizer.pt").write_bytes(b"training state, never copied")
    return Assets(base=base, other_base=other, adapters=adapters)


def member(name: str, **kw) -> Member:
    rank, alpha, seed = SPECS[name]
    return Member(name=name, rank=rank, alpha=alpha, seed=seed, **kw)


def manifest(assets: Assets, members: list[Member], *, generation: int = 0, **base_kw) -> Manifest:
    base = BaseModelRef(**{"name": BASE_NAME, "path": str(assets.base), **base_kw})
    return Manifest(base_model=base, generation=generation, members=members)


def leftovers(folder: Path) -> list[str]:
    """Hidden temp entries (``.<name>.tmp-*``) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.fixture
def pop_root(tmp_path: Path, assets: Assets) -> Path:
    """A valid population {alpha, beta} at generation 0."""
    root = tmp_path / "pop"
    m = manifest(
        assets,
        [
            member("alpha", fitness=0.5, domain_scores={"math": 0.25, "code": 0.75}, info={"lr": 1e-4}),
            member("beta", parents=["alpha"], born_generation=0),
        ],
    )
    create_population(root, m, {"alpha": assets.adapters["alpha"], "beta": assets.adapters["beta"]})
    return root


# --------------------------------------------------------------------------- round trip


def test_create_load_round_trip(tmp_path: Path, assets: Assets) -> None:
    root = tmp_path / "pop"
    m = Manifest(
        base_model=BaseModelRef(name=BASE_NAME, path=str(assets.base), hub_id="org/tiny"),
        generation=3,
        members=[
            member("alpha", fitness=0.5, domain_scores={"math": 0.25}, info={"lr": 1e-4, "warmup": ["math"]}),
            member("beta", path="members/b-g3", parents=["alpha", "gamma"], born_generation=3),
        ],
        router={"kind": "none"},
        voting_weights={"alpha": 0.25, "beta": 0.75},
        config_hash="abc123",
        created_at="2024-01-01T00:00:00Z",
    )
    created = create_population(root, m, {n: assets.adapters[n] for n in ("alpha", "beta")})
    loaded = load_population(root)

    assert loaded.manifest == m
    assert created.manifest == m
    assert read_manifest(root).model_dump() == m.model_dump()
    assert loaded.root == root
    assert loaded.base_model_path == assets.base.resolve()
    assert loaded.names == ["alpha", "beta"]
    assert loaded.member("beta").parents == ["alpha", "gamma"]
    assert loaded.member_dir("alpha") == root / "members" / "alpha"
    assert loaded.member_dir("beta") == root / "members" / "b-g3"
    assert sorted(os.listdir(root / "members" / "alpha")) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]  # optimizer.pt in the source is not copied
    assert (root / "members/alpha/adapter_model.safetensors").read_bytes() == (
        assets.adapters["alpha"] / "adapter_model.safetensors"
    ).read_bytes()
    assert json.loads((root / "population.json").read_text())["format_version"] == FORMAT_VERSION
    assert leftovers(tmp_path) == []
    with pytest.raises(KeyError, match="no member named 'zeta'"):
        loaded.member("zeta")


def test_members_load_with_peft_and_differ(pop_root: Path, assets: Assets) -> None:
    import torch

    pop = load_population(pop_root)
    base = logits_with_adapter(assets.base, None)
    la = logits_with_adapter(pop.base_model_path, pop.member_dir("alpha"))
    lb = logits_with_adapter(pop.base_model_path, pop.member_dir("beta"))
    assert la.shape == lb.shape == base.shape == (1, 6, 32)
    assert torch.isfinite(la).all() and torch.isfinite(lb).all()
    assert (la - lb).abs().max().item() > 1e-4
    assert (la - base).abs().max().item() > 1e-4
    # reloading gives the same logits
    assert torch.allclose(la, logits_with_adapter(pop.base_model_path, pop.member_dir("alpha")))


def test_relative_base_path_is_resolved_against_population_dir(tmp_path: Path, assets: Assets) -> None:
    shutil.copytree(assets.base, tmp_path / "substrate")
    root = tmp_path / "pop"
    m = manifest(assets, [member("alpha")], path="../substrate", sha256=fingerprint_model_dir(assets.base))
    create_population(root, m, {"alpha": assets.adapters["alpha"]})
    pop = load_population(root)
    assert pop.base_model_path == (tmp_path / "substrate").resolve()
    assert pop.manifest.base_model.path == "../substrate"


def test_hub_only_base_model_has_no_path(tmp_path: Path, assets: Assets) -> None:
    root = tmp_path / "pop"
    m = Manifest(base_model=BaseModelRef(name=BASE_NAME, hub_id="org/tiny"), generation=0, members=[member("alpha")])
    pop = create_population(root, m, {"alpha": assets.adapters["alpha"]})
    assert pop.base_model_path is None
    assert load_population(root).base_model_path is None


# --------------------------------------------------------------------------- schema


def test_member_defaults_and_rules() -> None:
    m = Member(name="m1", rank=8, alpha=16)
    assert (m.path, m.fitness, m.domain_scores, m.parents, m.born_generation, m.seed, m.info) == (
        "members/m1",
        None,
        {},
        [],
        0,
        None,
        {},
    )
    assert Member(name="m1", path="./custom/m1/", rank=8, alpha=16).path == "custom/m1"
    for bad in ("-x", "a/b", "", "x" * 65, "a b"):
        with pytest.raises(ValidationError):
            Member(name=bad, rank=8, alpha=16)
    for kw in ({"rank": 0}, {"rank": True}, {"alpha": 0}, {"alpha": float("nan")}, {"born_generation": -1}):
        with pytest.raises(ValidationError):
            Member(**{"name": "m", "rank": 8, "alpha": 16, **kw})
    with pytest.raises(ValidationError, match="reserved"):
        Member(name="m", path="router/m", rank=8, alpha=16)
    with pytest.raises(ValidationError, match="hidden"):
        Member(name="m", path="members/.m", rank=8, alpha=16)
    with pytest.raises(ValidationError):
        m.rank = 4  # frozen
    with pytest.raises(ValidationError, match="extra"):
        Member(name="m", rank=8, alpha=16, colour="red")


def test_manifest_cross_field_rules() -> None:
    base = BaseModelRef(name=BASE_NAME, hub_id="org/tiny")
    a, b = Member(name="a", rank=4, alpha=8), Member(name="b", rank=4, alpha=8)
    with pytest.raises(ValidationError, match="at least one of `path`, `hub_id` or `sha256`"):
        BaseModelRef(name=BASE_NAME)
    assert BaseModelRef(name=BASE_NAME, sha256="0" * 64).path is None  # named by fingerprint only
    with pytest.raises(ValidationError, match="64 lowercase hex"):
        BaseModelRef(name=BASE_NAME, hub_id="x", sha256="abc")
    with pytest.raises(ValidationError, match="not member names: \\['c'\\]"):
        Manifest(base_model=base, generation=0, members=[a, b], voting_weights={"a": 1.0, "c": 1.0})
    with pytest.raises(ValidationError, match="finite and >= 0"):
        Manifest(base_model=base, generation=0, members=[a, b], voting_weights={"a": -1.0})
    with pytest.raises(ValidationError, match="duplicate member names"):
        Manifest(base_model=base, generation=0, members=[a, Member(name="a", path="members/a2", rank=4, alpha=8)])
    with pytest.raises(ValidationError, match="share the folder"):
        Manifest(base_model=base, generation=0, members=[a, Member(name="b", path="members/a", rank=4, alpha=8)])
    with pytest.raises(ValidationError, match="nested"):
        Manifest(base_model=base, generation=0, members=[a, Member(name="b", path="members/a/b", rank=4, alpha=8)])
    with pytest.raises(ValidationError, match="at least 1"):
        Manifest(base_model=base, generation=0, members=[])
    with pytest.raises(ValidationError, match="format_version 2 is not supported"):
        Manifest(format_version=2, base_model=base, generation=0, members=[a])
    m = Manifest(base_model=base, generation=1, members=[a, b], voting_weights={"a": 2.0})
    assert Manifest.model_validate_json(m.model_dump_json()) == m


# --------------------------------------------------------------------------- validation


def _raises(root_or_call, *needles: str) -> str:
    with pytest.raises(PopulationError) as ei:
        root_or_call() if callable(root_or_call) else load_population(root_or_call)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_missing_population_json(tmp_path: Path) -> None:
    (tmp_path / "pop").mkdir()
    _raises(tmp_path / "pop", str(tmp_path / "pop" / "population.json"), "missing")
    _raises(tmp_path / "nowhere", str(tmp_path / "nowhere"), "not found")


def test_invalid_json(pop_root: Path) -> None:
    (pop_root / "population.json").write_text('{"format_version": 1, "members": [')
    _raises(pop_root, str(pop_root / "population.json"), "not valid JSON")


def test_unknown_format_version(pop_root: Path) -> None:
    raw = read_raw_manifest(pop_root)
    raw["format_version"] = 2
    write_raw_manifest(pop_root, raw)
    _raises(pop_root, str(pop_root / "population.json"), "format_version 2", "reads format_version 1")
    del raw["format_version"]
    write_raw_manifest(pop_root, raw)
    _raises(pop_root, str(pop_root / "population.json"), "'<missing>'")


def test_schema_error_includes_pydantic_message(pop_root: Path) -> None:
    raw = read_raw_manifest(pop_root)
    raw["members"][0]["rank"] = -3
    write_raw_manifest(pop_root, raw)
    _raises(pop_root, str(pop_root / "population.json"), "members.0.rank", "greater than 0")


def test_duplicate_member_names(pop_root: Path) -> None:
    raw = read_raw_manifest(pop_root)
    raw["members"][1]["name"] = "alpha"
    write_raw_manifest(pop_root, raw)
    _raises(pop_root, str(pop_root / "population.json"), "duplicate member names: ['alpha']")


def test_missing_member_folder(pop_root: Path) -> None:
    shutil.rmtree(pop_root / "members" / "beta")
    _raises(pop_root, str(pop_root / "members" / "beta"), "member folder for 'beta' is missing")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_member_path_outside_population(pop_root: Path, tmp_path: Path, assets: Assets, kind: str) -> None:
    outside = copy_dir(assets.adapters["alpha"], tmp_path / "x")  # a valid adapter, just in the wrong place
    raw = read_raw_manifest(pop_root)
    if kind == "dotdot":
        raw["members"][0]["path"] = "../x"
    elif kind == "absolute":
        raw["members"][0]["path"] = str(outside)
    else:
        (pop_root / "members" / "evil").symlink_to(outside, target_is_directory=True)
        raw["members"][0]["path"] = "members/evil"
    write_raw_manifest(pop_root, raw)
    _raises(pop_root, str(pop_root / "population.json"), "outside the population directory")


def test_symlink_inside_population_is_allowed(pop_root: Path) -> None:
    (pop_root / "members" / "alias").symlink_to(pop_root / "members" / "alpha", target_is_directory=True)
    raw = read_raw_manifest(pop_root)
    raw["members"][0]["path"] = "members/alias"
    write_raw_manifest(pop_root, raw)
    assert load_population(pop_root).member_dir("alpha") == pop_root / "members" / "alias"


def test_wrong_base_model_in_adapter_config(pop_root: Path) -> None:
    set_adapter_config(pop_root / "members" / "beta", base_model_name_or_path="some-other-model")
    _raises(
        pop_root,
        str(pop_root / "members" / "beta" / "adapter_config.json"),
        "wrong base model",
        "'some-other-model'",
        f"'{BASE_NAME}'",
    )


def test_base_fingerprint(tmp_path: Path, assets: Assets) -> None:
    good = fingerprint_model_dir(assets.base)
    other = fingerprint_model_dir(assets.other_base)
    assert len(good) == 64 and good != other
    assert fingerprint_model_dir(assets.base) == good  # deterministic
    root = tmp_path / "pop"
    create_population(root, manifest(assets, [member("alpha")], sha256=good), {"alpha": assets.adapters["alpha"]})
    assert load_population(root).manifest.base_model.sha256 == good

    raw = read_raw_manifest(root)
    raw["base_model"]["sha256"] = other
    write_raw_manifest(root, raw)
    _raises(
        root,
        f"wrong base model: {assets.base.resolve()} has fingerprint {good}, manifest expects {other}",
        str(root / "population.json"),
    )
    # and create_population refuses the same mismatch up front, leaving nothing behind
    root2 = tmp_path / "pop2"
    _raises(
        lambda: create_population(
            root2, manifest(assets, [member("alpha")], sha256=other), {"alpha": assets.adapters["alpha"]}
        ),
        "wrong base model",
    )
    assert not root2.exists() and leftovers(tmp_path) == []


def test_fingerprint_changes_with_bytes_and_refuses_pickles(tmp_path: Path, assets: Assets) -> None:
    base = copy_dir(assets.base, tmp_path / "base")
    before = fingerprint_model_dir(base)
    data = bytearray((base / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (base / "model.safetensors").write_bytes(bytes(data))
    assert fingerprint_model_dir(base) != before

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    _raises(lambda: fingerprint_model_dir(pickled), str(pickled), "pickle weights", "refused")
    (pickled / "pytorch_model.bin").unlink()
    _raises(lambda: fingerprint_model_dir(pickled), str(pickled), "no *.safetensors")


def test_base_model_folder_checks(pop_root: Path, tmp_path: Path) -> None:
    raw = read_raw_manifest(pop_root)
    raw["base_model"]["path"] = "../no-such-base"
    write_raw_manifest(pop_root, raw)
    _raises(pop_root, str(tmp_path / "no-such-base"), "base model folder not found")
    (tmp_path / "no-such-base").mkdir()
    _raises(pop_root, str(tmp_path / "no-such-base" / "config.json"), "no config.json")
    (tmp_path / "no-such-base" / "config.json").write_text("{}")
    (tmp_path / "no-such-base" / "pytorch_model.bin").write_bytes(b"x")
    _raises(pop_root, str(tmp_path / "no-such-base"), "pickle weights")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(pop_root: Path, damage: str) -> None:
    f = pop_root / "members" / "alpha" / "adapter_model.safetensors"
    data = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        f.write_bytes(os.urandom(len(data)))
    else:
        f.write_bytes(b"")
    for check in (True, False):
        with pytest.raises(PopulationError) as ei:
            load_population(pop_root, check_weights=check)
        assert str(f) in str(ei.value) and "not a readable safetensors file" in str(ei.value)


def test_nan_weights_rejected_only_when_checking_weights(pop_root: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = pop_root / "members" / "beta" / "adapter_model.safetensors"
    tensors = load_file(f)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, f)
    assert load_population(pop_root, check_weights=False).names == ["alpha", "beta"]
    _raises(pop_root, str(f), repr(key), "NaN or inf")


def test_bin_only_adapter_is_refused(pop_root: Path) -> None:
    d = pop_root / "members" / "alpha"
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    _raises(pop_root, str(d / "adapter_model.safetensors"), "pickle weights", "refused")
    (d / "adapter_model.bin").unlink()
    _raises(pop_root, str(d / "adapter_model.safetensors"), "missing")


def test_adapter_config_checks(pop_root: Path) -> None:
    d = pop_root / "members" / "alpha"
    cfg_file = str(d / "adapter_config.json")
    original = (d / "adapter_config.json").read_text()

    set_adapter_config(d, r=16)
    _raises(pop_root, cfg_file, "r=16", "rank 4")
    (d / "adapter_config.json").write_text(original)
    set_adapter_config(d, peft_type="IA3")
    _raises(pop_root, cfg_file, "peft_type is 'IA3'")
    (d / "adapter_config.json").write_text(original)
    set_adapter_config(d, lora_alpha=99)
    _raises(pop_root, cfg_file, "lora_alpha=99", "alpha 8.0")
    (d / "adapter_config.json").write_text("{oops")
    _raises(pop_root, cfg_file, "not valid JSON")
    (d / "adapter_config.json").unlink()
    _raises(pop_root, cfg_file, "missing")


def test_tensor_shapes_must_match_rank(pop_root: Path) -> None:
    # config and manifest agree on r=8, but the tensors were trained with r=4
    set_adapter_config(pop_root / "members" / "alpha", r=8)
    raw = read_raw_manifest(pop_root)
    raw["members"][0]["rank"] = 8
    write_raw_manifest(pop_root, raw)
    _raises(pop_root, str(pop_root / "members/alpha/adapter_model.safetensors"), "lora_A has shape [4, 32]", "rank 8")


# --------------------------------------------------------------------------- create_population atomicity


@pytest.mark.parametrize("failure", ["missing_source", "corrupt_source"])
def test_create_population_failure_leaves_nothing(tmp_path: Path, assets: Assets, failure: str) -> None:
    root = tmp_path / "pop"
    if failure == "missing_source":
        bad = tmp_path / "no-such-adapter"
    else:
        bad = copy_dir(assets.adapters["beta"], tmp_path / "bad-beta")
        (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 50)
    m = manifest(assets, [member("alpha"), member("beta")])
    msg = _raises(lambda: create_population(root, m, {"alpha": assets.adapters["alpha"], "beta": bad}), str(bad))
    assert "beta" in msg or "safetensors" in msg
    assert not root.exists()
    assert leftovers(tmp_path) == []


def test_create_population_requires_exactly_the_members(tmp_path: Path, assets: Assets) -> None:
    m = manifest(assets, [member("alpha"), member("beta")])
    _raises(lambda: create_population(tmp_path / "p", m, {"alpha": assets.adapters["alpha"]}), "['beta']")
    _raises(
        lambda: create_population(tmp_path / "p", m, {**{n: assets.adapters[n] for n in SPECS}}),
        "not in the manifest: ['gamma']",
    )
    assert not (tmp_path / "p").exists()


def test_create_population_existing_root(pop_root: Path, tmp_path: Path, assets: Assets) -> None:
    before = (pop_root / "population.json").read_bytes()
    m = manifest(assets, [member("gamma")], generation=5)
    _raises(lambda: create_population(pop_root, m, {"gamma": assets.adapters["gamma"]}), str(pop_root), "not empty")
    assert (pop_root / "population.json").read_bytes() == before

    pop = create_population(pop_root, m, {"gamma": assets.adapters["gamma"]}, overwrite=True)
    assert pop.names == ["gamma"] and load_population(pop_root).manifest.generation == 5
    assert sorted(os.listdir(pop_root / "members")) == ["gamma"]
    assert leftovers(tmp_path) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    assert create_population(empty, m, {"gamma": assets.adapters["gamma"]}).names == ["gamma"]


# --------------------------------------------------------------------------- commit_generation


def test_commit_generation_replaces_manifest_and_prunes(pop_root: Path, assets: Assets) -> None:
    new = manifest(
        assets,
        [member("alpha"), member("gamma", parents=["alpha", "beta"], born_generation=1)],
        generation=1,
    )
    pop = commit_generation(pop_root, new, {"gamma": assets.adapters["gamma"]})
    assert pop.manifest == new and read_manifest(pop_root) == new
    assert load_population(pop_root).names == ["alpha", "gamma"]
    assert sorted(os.listdir(pop_root / "members")) == ["alpha", "gamma"]  # beta pruned, no temp folders
    assert (pop_root / "members/gamma/adapter_model.safetensors").read_bytes() == (
        assets.adapters["gamma"] / "adapter_model.safetensors"
    ).read_bytes()


def test_commit_generation_keep_unreferenced_then_prune(pop_root: Path, assets: Assets) -> None:
    new = manifest(assets, [member("gamma")], generation=1)
    commit_generation(pop_root, new, {"gamma": assets.adapters["gamma"]}, keep_unreferenced=True)
    assert sorted(os.listdir(pop_root / "members")) == ["alpha", "beta", "gamma"]
    assert load_population(pop_root).names == ["gamma"]
    removed = prune_unreferenced(pop_root)
    assert sorted(p.name for p in removed) == ["alpha", "beta"]
    assert sorted(os.listdir(pop_root / "members")) == ["gamma"]


def test_commit_changed_member_needs_new_folder(pop_root: Path, assets: Assets) -> None:
    before = (pop_root / "population.json").read_bytes()
    old_weights = (pop_root / "members/alpha/adapter_model.safetensors").read_bytes()
    # alpha retrained (gamma's weights, same rank) but written to the same folder: refused
    changed = manifest(assets, [member("alpha"), member("beta")], generation=1)
    _raises(
        lambda: commit_generation(pop_root, changed, {"alpha": assets.adapters["gamma"]}),
        str(pop_root / "members" / "alpha"),
        "already exists with different content",
    )
    assert (pop_root / "population.json").read_bytes() == before
    assert (pop_root / "members/alpha/adapter_model.safetensors").read_bytes() == old_weights
    assert load_population(pop_root).manifest.generation == 0

    # identical content in the existing folder is accepted (idempotent re-commit)
    commit_generation(pop_root, changed, {"alpha": assets.adapters["alpha"]})
    assert read_manifest(pop_root).generation == 1

    # the retrained member in a new folder is fine; the old folder is pruned
    moved = manifest(assets, [member("alpha", path="members/alpha-g2"), member("beta")], generation=2)
    pop = commit_generation(pop_root, moved, {"alpha": assets.adapters["gamma"]})
    assert pop.member_dir("alpha") == pop_root / "members" / "alpha-g2"
    assert sorted(os.listdir(pop_root / "members")) == ["alpha-g2", "beta"]
    assert load_population(pop_root).manifest == moved


@pytest.mark.parametrize("failure", ["bad_new_adapter", "missing_existing_member", "wrong_rank"])
def test_commit_failure_keeps_previous_generation(pop_root: Path, tmp_path: Path, assets: Assets, failure: str) -> None:
    before = (pop_root / "population.json").read_bytes()
    members = [member("alpha"), member("gamma")]
    new_adapters: dict[str, Path] = {"gamma": assets.adapters["gamma"]}
    if failure == "bad_new_adapter":
        bad = copy_dir(assets.adapters["beta"], tmp_path / "bad")
        (bad / "adapter_model.safetensors").write_bytes(b"garbage")
        members.append(Member(name="delta", rank=8, alpha=16))
        new_adapters["delta"] = bad
        needle = str(bad / "adapter_model.safetensors")
    elif failure == "missing_existing_member":
        members.append(Member(name="delta", rank=8, alpha=16))  # no folder and no new adapter
        needle = str(pop_root / "members" / "delta")
    else:
        members.append(Member(name="delta", rank=4, alpha=16))  # beta's adapter is r=8
        new_adapters["delta"] = assets.adapters["beta"]
        needle = str(assets.adapters["beta"] / "adapter_config.json")
    new = manifest(assets, members, generation=1)
    _raises(lambda: commit_generation(pop_root, new, new_adapters), needle)

    assert (pop_root / "population.json").read_bytes() == before
    assert sorted(os.listdir(pop_root / "members")) == ["alpha", "beta"]  # gamma/delta removed, no temps
    pop = load_population(pop_root)
    assert pop.names == ["alpha", "beta"] and pop.manifest.generation == 0


def test_commit_refuses_older_generation_and_unknown_adapters(pop_root: Path, assets: Assets) -> None:
    commit_generation(pop_root, manifest(assets, [member("alpha"), member("beta")], generation=2), {})
    _raises(
        lambda: commit_generation(pop_root, manifest(assets, [member("alpha")], generation=1), {}),
        str(pop_root / "population.json"),
        "older generation 1",
    )
    _raises(
        lambda: commit_generation(
            pop_root, manifest(assets, [member("alpha")], generation=3), {"zeta": assets.adapters["gamma"]}
        ),
        "not in the manifest: ['zeta']",
    )
    assert read_manifest(pop_root).generation == 2


# --------------------------------------------------------------------------- manifest / fsutil


def test_write_manifest_is_atomic_and_leaves_no_temp(pop_root: Path, assets: Assets) -> None:
    m = read_manifest(pop_root).model_copy(update={"generation": 9, "config_hash": "h"})
    write_manifest(pop_root, m)
    assert read_manifest(pop_root) == m
    assert leftovers(pop_root) == []
    assert json.loads((pop_root / "population.json").read_text())["generation"] == 9
    # model_copy(update=...) skips validation; write_manifest re-validates and refuses
    before = (pop_root / "population.json").read_bytes()
    bad = m.model_copy(update={"voting_weights": {"nobody": 1.0}})
    _raises(lambda: write_manifest(pop_root, bad), str(pop_root / "population.json"), "not member names")
    assert (pop_root / "population.json").read_bytes() == before


def test_fsutil_helpers(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two" and leftovers(tmp_path) == []
    d = tmp_dir_beside(tmp_path / "pop")
    assert d.parent == tmp_path and d.name.startswith(".pop.tmp-") and d.is_dir() and not any(d.iterdir())


# --------------------------------------------------------------------------- history


def test_history_append_and_read(pop_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert read_history(pop_root) == []
    records = [{"generation": g, "best": 0.5 + g / 10, "members": ["alpha"]} for g in range(3)]
    for r in records:
        append_history(pop_root, r)
    assert read_history(pop_root) == records
    assert (pop_root / "history.jsonl").read_text().count("\n") == 3

    # a crash mid-append leaves a truncated last line: skipped with a warning
    with open(pop_root / "history.jsonl", "ab") as fh:
        fh.write(b'{"generation": 3, "be')
    with caplog.at_level(logging.WARNING, logger="ensemble_serve.shared.population"):
        assert read_history(pop_root) == records
    assert "truncated last line 4" in caplog.text and "history.jsonl" in caplog.text

    # the next append drops the fragment so the file stays one record per line
    append_history(pop_root, {"generation": 3})
    assert read_history(pop_root) == [*records, {"generation": 3}]
    assert len((pop_root / "history.jsonl").read_text().splitlines()) == 4

    with pytest.raises(PopulationError, match="history.jsonl"):
        append_history(pop_root, {"x": float("nan")})


def test_history_bad_middle_line_names_file_and_line(pop_root: Path) -> None:
    (pop_root / "history.jsonl").write_text('{"generation": 0}\nnot json\n{"generation": 1}\n')
    _raises(lambda: read_history(pop_root), str(pop_root / "history.jsonl"), "line 2")
