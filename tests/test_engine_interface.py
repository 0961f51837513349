"""Both engines implement the whole `Engine` interface the service uses; only the in-process one can mix.

Checked on the classes (no engine is started): every member the protocol declares is defined by the
class, as a method where the protocol has a method (async where it is async) or as a property/attribute.
The running engines are exercised by the end-to-end tests.
"""

from __future__ import annotations

import inspect
import re

import pytest

from ensemble_serve.engine.base import AdapterMixing, Engine
from ensemble_serve.engine.inprocess import AsyncEngine
from ensemble_serve.engine.remote import RemoteBackend

ATTRIBUTES_SET_IN_INIT = {"tokenizer", "max_model_len"}  # data members the engines assign when they start


def _members(protocol: type) -> dict[str, object]:
    return {
        name: value
        for name, value in vars(protocol).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    } | {name: None for name in getattr(protocol, "__annotations__", {})}


@pytest.mark.parametrize("engine", [AsyncEngine, RemoteBackend], ids=["in-process", "remote"])
def test_every_engine_implements_the_whole_interface(engine: type) -> None:
    source = inspect.getsource(engine)
    for name, declared in _members(Engine).items():
        if name in ATTRIBUTES_SET_IN_INIT and not hasattr(engine, name):
            assert re.search(rf"self\.{name}\b[^=\n]*=", source) or f"def {name}" in source, (
                f"{engine.__name__} never sets {name}"
            )
            continue
        assert hasattr(engine, name), f"{engine.__name__} lacks {name}"
        if inspect.isfunction(declared):
            impl = getattr(engine, name)
            assert callable(impl), f"{engine.__name__}.{name} is not a method"
            assert inspect.iscoroutinefunction(impl) == inspect.iscoroutinefunction(declared), name
            declared_params = list(inspect.signature(declared).parameters)
            assert list(inspect.signature(impl).parameters)[: len(declared_params)] == declared_params, name


def test_only_the_in_process_engine_can_load_mixed_adapters() -> None:
    mixing = set(_members(AdapterMixing))
    assert all(hasattr(AsyncEngine, name) for name in mixing)
    assert not all(hasattr(RemoteBackend, name) for name in mixing)
