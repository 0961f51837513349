"""The engine's adapter registry: private snapshots, fresh ids for new content, and bounded extras (mixed adapters)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from ensemble_serve.engine.inprocess import AsyncEngine
from ensemble_serve.shared.adapters import AdapterRegistry
from ensemble_serve.shared.population import load_population
from ensemble_serve.testing.servers import plain_embedded


@pytest.fixture(scope="module")
def population():
    return load_population(plain_embedded())


def test_a_member_keeps_its_id_until_its_content_changes(population, tmp_path):
    reg = AdapterRegistry(snapshot_root=tmp_path / "snap")
    reg.sync(population)
    first = reg.get("m00")
    assert reg.register("m00", population.member_dir("m00")) is first  # same content: same request
    other = tmp_path / "other"
    shutil.copytree(population.member_dir("m01"), other)
    second = reg.register("m00", other)
    assert second.lora_int_id != first.lora_int_id  # new content: vLLM must not reuse the stale weights


def test_forget_drops_the_name_and_deletes_its_snapshots(population, tmp_path):
    reg = AdapterRegistry(snapshot_root=tmp_path / "snap")
    reg.sync(population)
    path = reg.get("m02").lora_path
    assert (tmp_path / "snap").joinpath(path).exists()
    reg.forget("m02")
    with pytest.raises(KeyError, match="unknown member 'm02'"):
        reg.get("m02")
    assert not (tmp_path / "snap").joinpath(path).exists()
    assert "m03" in reg.names()  # the others are untouched
    reg.forget("never-registered")  # forgetting an unknown name is a no-op


def test_register_extra_keeps_at_most_keep_extras_least_recently_used_out(population, tmp_path):
    # the method's bookkeeping on a real registry (no vLLM engine is needed for it)
    engine = SimpleNamespace(
        registry=AdapterRegistry(snapshot_root=tmp_path / "snap"), population=population, _extras={}
    )
    from collections import OrderedDict

    engine._extras = OrderedDict()
    engine.registry.sync(population)
    for i, member in enumerate(["m00", "m01", "m02"]):
        AsyncEngine.register_extra(engine, f"mix-{i}", population.member_dir(member), keep=2)
    assert "mix-0" not in engine.registry.names()
    assert {"mix-1", "mix-2"} <= set(engine.registry.names())
    # using mix-1 again makes mix-2 the least recently used one
    AsyncEngine.register_extra(engine, "mix-1", population.member_dir("m01"), keep=2)
    AsyncEngine.register_extra(engine, "mix-3", population.member_dir("m03"), keep=2)
    assert "mix-2" not in engine.registry.names() and {"mix-1", "mix-3"} <= set(engine.registry.names())
    assert set(population.names) <= set(engine.registry.names())  # members are never forgotten
    snapshots = {p.name for p in (tmp_path / "snap").iterdir()}
    assert not any(s.startswith(("mix-0-", "mix-2-")) for s in snapshots)
