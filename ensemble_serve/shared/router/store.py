"""A router on disk: the reserved ``router/`` folder of a population directory.

The folder holds ``router.json`` (the :class:`RouterConfig`) and ``router.safetensors`` (the
weights, never pickle), written together atomically by :func:`save_router` so a reader never
sees the weights of one training with the config of another. :func:`load_router` checks the
config, every tensor (names, shapes, floating dtype, finite values) and, when given, that the
router fits the population it is used with: gates are positional, so the member list must be the
population's, in order, and the base model must be the population's. Every failure is a
:class:`RouterError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save

from ensemble_serve.shared.fsutil import fsync_dir, remove_tree, tmp_dir_beside
from ensemble_serve.shared.router.model import Router, RouterConfig, RouterError

if TYPE_CHECKING:
    from ensemble_serve.shared.population import Population

__all__ = ["ROUTER_CONFIG", "ROUTER_DIR", "ROUTER_WEIGHTS", "load_population_router", "load_router", "save_router"]

ROUTER_DIR = "router"
"""Name of the router folder inside a population directory (reserved by the population format)."""
ROUTER_CONFIG = "router.json"
ROUTER_WEIGHTS = "router.safetensors"


def save_router(router: Router, folder: str | os.PathLike[str]) -> Path:
    """Write ``router.json`` + ``router.safetensors`` into ``folder`` atomically and return it.

    Both files go into a temporary folder beside ``folder`` that is then renamed onto it, so a
    reader never sees weights from one training with the config of another. An existing folder is
    first moved aside and deleted only after the new one is in place (it is restored if the swap
    fails); between the two renames a reader finds no router and falls back to unrouted voting.
    """
    target = Path(folder)
    cfg = router.config()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in router.state_dict().items()}
    tmp = tmp_dir_beside(target)
    old: Path | None = None
    try:
        (tmp / ROUTER_WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
        (tmp / ROUTER_CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
        for name in (ROUTER_WEIGHTS, ROUTER_CONFIG):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if target.exists() or target.is_symlink():
            old = tmp_dir_beside(target)
            os.rename(target, old / "previous")
        try:
            os.rename(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(old / "previous", target)
                remove_tree(old)
                old = None
            raise
        fsync_dir(target.parent)
    finally:
        remove_tree(tmp)
        if old is not None:
            remove_tree(old)
    return target


def _read_config(folder: Path) -> RouterConfig:
    path = folder / ROUTER_CONFIG
    if not path.is_file():
        raise RouterError(f"{path}: router config is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RouterError(f"{path}: router config is not readable JSON ({e})") from e
    if not isinstance(raw, dict):
        raise RouterError(f"{path}: router config must be a JSON object, got {type(raw).__name__}")
    try:
        return RouterConfig.model_validate(raw)
    except ValidationError as e:
        raise RouterError(f"{path}: invalid router config:\n{e}") from e


def _read_weights(folder: Path, router: Router) -> dict[str, torch.Tensor]:
    path = folder / ROUTER_WEIGHTS
    if not path.is_file():
        raise RouterError(f"{path}: router weights are missing")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several kinds on a damaged file; all mean "corrupt"
        raise RouterError(f"{path}: router weights are not a readable safetensors file ({e})") from e
    expected = {k: v.shape for k, v in router.state_dict().items()}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise RouterError(
            f"{path}: weights do not match {ROUTER_CONFIG} (variant {router.cfg.variant!r}, "
            f"hidden_dim {router.cfg.hidden_dim}): missing tensors {missing}, unexpected tensors {extra}"
        )
    for k, shape in expected.items():
        t = tensors[k]
        if t.shape != shape:
            raise RouterError(
                f"{path}: tensor {k!r} has shape {list(t.shape)}, {ROUTER_CONFIG} implies {list(shape)} "
                f"(input_dim {router.cfg.input_dim}, {len(router.cfg.members)} members)"
            )
        if not t.is_floating_point():
            raise RouterError(f"{path}: tensor {k!r} has dtype {t.dtype}, expected a floating-point type")
        if not torch.isfinite(t).all():
            raise RouterError(f"{path}: tensor {k!r} contains NaN or inf")
    return tensors


def _check_members(folder: Path, have: list[str], expected: list[str]) -> None:
    if have == expected:
        return
    lead = f"{folder}: router was trained for another population"
    missing = [n for n in expected if n not in have]
    extra = [n for n in have if n not in expected]
    parts = []
    if missing:
        parts.append(f"no gate for population member(s) {missing}")
    if extra:
        parts.append(f"gates for member(s) {extra} that are not in the population")
    if not parts and len(have) != len(expected):
        parts.append(f"member count differs: router has {len(have)}, population has {len(expected)}")
    if not parts:
        parts.append(f"same members in a different order: router {have}, population {expected}")
    raise RouterError(f"{lead}: " + "; ".join(parts))


def load_router(
    folder: str | os.PathLike[str],
    expected_members: Sequence[str] | None = None,
    base_model: str | None = None,
) -> Router:
    """Load a router saved by :func:`save_router`, in eval mode.

    ``expected_members`` (the population's member names in manifest order) and ``base_model``
    (the population's base model name) are checked when given: gates are positional, so a router
    trained for other members or on another base would route to the wrong adapters.
    Every failure is a :class:`RouterError`.
    """
    root = Path(folder)
    if not root.is_dir():
        raise RouterError(f"{root}: router folder not found")
    cfg = _read_config(root)
    if expected_members is not None:
        _check_members(root, list(cfg.members), list(expected_members))
    if base_model is not None and cfg.base_model != base_model:
        raise RouterError(
            f"{root}: router was trained on base model {cfg.base_model!r}, but the population uses {base_model!r}"
        )
    router = Router(cfg)
    router.load_state_dict(_read_weights(root, router))
    return router.eval()


def load_population_router(population: Population, check_members: bool = True) -> Router | None:
    """The router the population's manifest names (its ``router`` entry's folder), or None when it names none.

    The base model is always checked; the member list too unless ``check_members`` is False (a trainer that
    uses the gates by position while evolution renames the members checks their number itself). Every
    failure is a :class:`RouterError`.
    """
    entry = population.manifest.router
    if not entry:
        return None
    return load_router(
        population.root / str(entry.get("path", ROUTER_DIR)),
        expected_members=population.names if check_members else None,
        base_model=population.manifest.base_model.name,
    )
