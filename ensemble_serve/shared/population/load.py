"""Reading and validating a population directory: :func:`load_population` and what it checks.

:func:`read_manifest` parses ``population.json`` against the schema (no file-system checks);
:func:`load_population` then checks everything the server will later hand to vLLM: the base
model folder (config.json, safetensors weights, sha256 fingerprint if the manifest gives one)
and every member folder (inside the directory, symlinks included; LoRA config matching the
manifest; readable safetensors whose lora_A/lora_B shapes agree with the rank). Pickle weights
(``*.bin``/``*.pt``) are never loaded. Every failure is a :class:`PopulationError` naming the
offending file or folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
from pydantic import ValidationError
from safetensors import safe_open

from ensemble_serve.shared.population.manifest import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FORMAT_VERSION,
    MANIFEST_FILE,
    PICKLE_SUFFIXES,
    BaseModelRef,
    Manifest,
    Member,
)

__all__ = [
    "Population",
    "PopulationError",
    "check_adapter_dir",
    "fingerprint_model_dir",
    "load_population",
    "read_manifest",
    "resolve_inside",
    "validate_population",
]

_LORA_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?(?P<ab>[AB])(?:\.weight)?$")
_HASH_CHUNK = 1 << 20


class PopulationError(ValueError):
    """A population directory (or a file in it) is missing, malformed or inconsistent.

    The message always names the offending file or folder.
    """


# --------------------------------------------------------------------------- fingerprint


def pickle_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def fingerprint_model_dir(path: str | os.PathLike[str]) -> str:
    """Return the sha256 fingerprint of the ``*.safetensors`` weights in a model folder.

    For each top-level ``*.safetensors`` file, in sorted name order, the hash
    is fed ``name`` (UTF-8), a NUL byte, the size as 8 big-endian bytes, and
    the file bytes (streamed). A folder with pickle weights (``*.bin``/``*.pt``)
    and no safetensors is refused: pickle weights are never loaded.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise PopulationError(f"{folder}: model folder not found")
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        pickles = pickle_files(folder)
        if pickles:
            raise PopulationError(
                f"{folder}: only pickle weights {pickles}; pickle weights are refused, "
                "re-save the model with safetensors"
            )
        raise PopulationError(f"{folder}: no *.safetensors weight files")
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f.name.encode("utf-8") + b"\0" + size.to_bytes(8, "big"))
        with open(f, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Population:
    """A validated population directory."""

    root: Path
    """The population directory."""
    manifest: Manifest
    """Its parsed ``population.json``."""
    base_model_path: Path | None
    """Resolved base model folder, or None when the manifest gives only a hub id."""

    def member(self, name: str) -> Member:
        """Return the member called ``name`` (KeyError if there is none)."""
        for m in self.manifest.members:
            if m.name == name:
                return m
        raise KeyError(f"{self.root / MANIFEST_FILE}: no member named {name!r}; members: {self.names}")

    def member_dir(self, name: str) -> Path:
        """Folder of the member called ``name`` (a PEFT adapter folder)."""
        return self.root / self.member(name).path

    @property
    def names(self) -> list[str]:
        """Member names in manifest order."""
        return self.manifest.names


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise PopulationError(f"{path}: {what} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PopulationError(f"{path}: {what} is not valid JSON ({e})") from e


def read_manifest(root: str | os.PathLike[str]) -> Manifest:
    """Parse and schema-check ``<root>/population.json`` (no file-system checks)."""
    path = Path(root) / MANIFEST_FILE
    raw = _read_json(path, "population manifest")
    if not isinstance(raw, dict):
        raise PopulationError(f"{path}: population manifest must be a JSON object, got {type(raw).__name__}")
    found = raw.get("format_version", "<missing>")
    if found != FORMAT_VERSION or isinstance(found, bool):
        raise PopulationError(
            f"{path}: format_version {found!r} is not supported; this version of ensemble_serve "
            f"reads format_version {FORMAT_VERSION}"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise PopulationError(f"{path}: invalid population manifest:\n{e}") from e


def _resolve_base(root: Path, ref: BaseModelRef) -> Path | None:
    if not ref.path:
        return None
    p = Path(ref.path)
    return (p if p.is_absolute() else root / p).resolve()


def _check_base_model(root: Path, manifest: Manifest, manifest_path: Path) -> Path | None:
    base = _resolve_base(root, manifest.base_model)
    if base is None:
        return None
    if not base.is_dir():
        raise PopulationError(
            f"{base}: base model folder not found (base_model.path {manifest.base_model.path!r} in {manifest_path})"
        )
    if not (base / "config.json").is_file():
        raise PopulationError(f"{base / 'config.json'}: base model has no config.json (named in {manifest_path})")
    if not any(base.glob("*.safetensors")):
        pickles = pickle_files(base)
        if pickles:
            raise PopulationError(f"{base}: base model has only pickle weights {pickles}; pickle weights are refused")
        raise PopulationError(f"{base}: base model has no *.safetensors weights")
    expected = manifest.base_model.sha256
    if expected is not None:
        got = fingerprint_model_dir(base)
        if got != expected:
            raise PopulationError(
                f"wrong base model: {base} has fingerprint {got}, manifest expects {expected} ({manifest_path})"
            )
    return base


def resolve_inside(root_resolved: Path, rel: str, manifest_path: Path) -> Path:
    """Return ``root/rel`` after checking it resolves (symlinks too) inside ``root``."""
    target = root_resolved / rel
    resolved = target.resolve()
    if resolved == root_resolved or not resolved.is_relative_to(root_resolved):
        raise PopulationError(
            f"{target}: member path {rel!r} resolves to {resolved}, outside the population "
            f"directory (listed in {manifest_path})"
        )
    return target


def check_adapter_dir(folder: Path, member: Member, base_name: str, *, check_weights: bool, listed_in: Path) -> None:
    """Validate one PEFT LoRA adapter folder against its manifest entry."""
    if not folder.is_dir():
        raise PopulationError(f"{folder}: member folder for {member.name!r} is missing (listed in {listed_in})")
    cfg_path = folder / ADAPTER_CONFIG
    cfg = _read_json(cfg_path, "adapter config")
    if not isinstance(cfg, dict):
        raise PopulationError(f"{cfg_path}: adapter config must be a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise PopulationError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    if cfg.get("r") != member.rank:
        raise PopulationError(
            f"{cfg_path}: r={cfg.get('r')!r} but the manifest gives member {member.name!r} rank {member.rank}"
        )
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or not math.isclose(alpha, member.alpha, rel_tol=1e-6):
        raise PopulationError(
            f"{cfg_path}: lora_alpha={alpha!r} but the manifest gives member {member.name!r} alpha {member.alpha}"
        )
    if cfg.get("base_model_name_or_path") != base_name:
        raise PopulationError(
            f"{cfg_path}: wrong base model: base_model_name_or_path is "
            f"{cfg.get('base_model_name_or_path')!r}, the population's base model is {base_name!r}"
        )
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = pickle_files(folder)
        if pickles:
            raise PopulationError(
                f"{weights}: missing; found pickle weights {pickles}, which are refused "
                "(save the adapter with safe_serialization=True)"
            )
        raise PopulationError(f"{weights}: adapter weights are missing")
    _check_adapter_weights(weights, member.rank, check_weights=check_weights)


def _check_adapter_weights(path: Path, rank: int, *, check_weights: bool) -> None:
    """Read every tensor header (and, if asked, every tensor) of an adapter file."""
    a_mods: dict[str, list[int]] = {}
    b_mods: dict[str, list[int]] = {}
    try:
        if check_weights:
            # every tensor, from the file's bytes (safe_open's file-backed storage failed, rarely, with "could
            # not determine the shape of object type 'torch.storage.UntypedStorage'"); shapes come with them
            tensors = safetensors.torch.load(path.read_bytes())
            shapes = {key: list(t.shape) for key, t in tensors.items()}
            for key, t in tensors.items():
                if t.is_floating_point() and not bool(t.isfinite().all()):
                    raise PopulationError(f"{path}: tensor {key!r} contains NaN or inf values")
        else:
            with safe_open(str(path), framework="pt") as f:
                shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
        for key, shape in shapes.items():
            m = _LORA_KEY_RE.match(key)
            if m:
                (a_mods if m.group("ab") == "A" else b_mods)[m.group("module")] = shape
    except PopulationError:
        raise
    except Exception as e:  # SafetensorError, OSError, torch errors on bad data
        raise PopulationError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if not a_mods:
        raise PopulationError(f"{path}: contains no LoRA tensors (no '*.lora_A.weight' keys)")
    if set(a_mods) != set(b_mods):
        odd = sorted(set(a_mods) ^ set(b_mods))
        raise PopulationError(f"{path}: lora_A/lora_B tensors do not pair up for modules {odd[:5]}")
    for module, shape in sorted(a_mods.items()):
        if len(shape) < 2 or shape[0] != rank:
            raise PopulationError(f"{path}: {module} lora_A has shape {shape}, expected rank {rank} in dim 0")
        b_shape = b_mods[module]
        if len(b_shape) < 2 or b_shape[1] != rank:
            raise PopulationError(f"{path}: {module} lora_B has shape {b_shape}, expected rank {rank} in dim 1")


def validate_population(root: Path, manifest: Manifest, *, check_weights: bool) -> Population:
    """Check ``manifest``'s base model and member folders under ``root`` (the manifest file itself is not read)."""
    manifest_path = root / MANIFEST_FILE
    root_resolved = root.resolve()
    base = _check_base_model(root, manifest, manifest_path)
    for m in manifest.members:
        folder = resolve_inside(root_resolved, m.path, manifest_path)
        check_adapter_dir(folder, m, manifest.base_model.name, check_weights=check_weights, listed_in=manifest_path)
    return Population(root=root, manifest=manifest, base_model_path=base)


def load_population(root: str | os.PathLike[str], *, check_weights: bool = True) -> Population:
    """Read and fully validate a population directory.

    Checks the manifest (JSON, schema, format version), the base model folder
    (config.json, safetensors weights, sha256 fingerprint if given) and every
    member folder (inside the directory, LoRA config matching the manifest,
    readable safetensors with rank-consistent lora_A/lora_B shapes). With
    ``check_weights`` every tensor is also loaded and checked for NaN/inf.
    Raises :class:`PopulationError` naming the offending file.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise PopulationError(f"{root}: population directory not found")
    return validate_population(root, read_manifest(root), check_weights=check_weights)
