"""The population directory: the only contract between trainer and server.

Layout::

    <population>/
      population.json        manifest (this module's ``Manifest``)
      members/<folder>/      standard PEFT LoRA adapter:
                               adapter_config.json + adapter_model.safetensors
      router/                optional
      history.jsonl          one JSON line per generation (append-only)

The trainer writes populations with :func:`create_population` (new directory)
and :func:`commit_generation` (next generation of an existing one); the
server reads them with :func:`load_population`, which validates everything it
will later hand to vLLM. Pickle weights (``*.bin``/``*.pt``) are never loaded.

Concurrency model: one writer, any number of readers. Member folders are
immutable once written and ``population.json`` is replaced atomically, so a
reader that reads the manifest once always sees a complete generation.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ensemble_serve.shared.fsutil import (
    atomic_write_text,
    copy_file_durable,
    fsync_dir,
    remove_tree,
    tmp_dir_beside,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "FORMAT_VERSION",
    "HISTORY_FILE",
    "MANIFEST_FILE",
    "BaseModelRef",
    "Manifest",
    "Member",
    "Population",
    "PopulationError",
    "append_history",
    "commit_generation",
    "create_population",
    "fingerprint_model_dir",
    "load_population",
    "prune_unreferenced",
    "read_history",
    "read_manifest",
    "write_manifest",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""The only ``population.json`` format version this code reads and writes."""

MANIFEST_FILE = "population.json"
HISTORY_FILE = "history.jsonl"
MEMBERS_DIR = "members"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_README = "README.md"
#: Files copied from an adapter folder into a member folder (others are ignored).
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_README)
#: Suffixes of pickle-based weight files, which are refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: Top-level names a member path may not start with.
RESERVED_NAMES = frozenset({MANIFEST_FILE, HISTORY_FILE, "router"})

MEMBER_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_LORA_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?(?P<ab>[AB])(?:\.weight)?$")
_HASH_CHUNK = 1 << 20


class PopulationError(ValueError):
    """A population directory (or a file in it) is missing, malformed or inconsistent.

    The message always names the offending file or folder.
    """


# --------------------------------------------------------------------------- schema


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaseModelRef(_Frozen):
    """The base model every member adapter was trained on."""

    name: str = Field(
        min_length=1,
        description="Identifier that each member's adapter_config.json `base_model_name_or_path` must equal.",
    )
    path: str | None = Field(
        default=None,
        description="Folder of a Hugging Face model; a relative path is resolved "
        "against the population directory (e.g. '../substrate').",
    )
    hub_id: str | None = Field(default=None, description="Hugging Face hub id of the base model.")
    sha256: str | None = Field(
        default=None,
        description="fingerprint_model_dir() of the base weights; checked on load when `path` is set.",
    )

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, v: str | None) -> str | None:
        if v is not None and not _SHA256_RE.match(v):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {v!r}")
        return v

    @model_validator(mode="after")
    def _need_location(self) -> BaseModelRef:
        if not self.path and not self.hub_id:
            raise ValueError("base_model needs at least one of `path` or `hub_id`")
        return self


def _check_member_path(v: str) -> str:
    """Validate a member path and return its normal form ('./a/' -> 'a')."""
    if not v or "\\" in v or "\x00" in v:
        raise ValueError(f"member path {v!r} must be a non-empty relative POSIX path")
    pp = PurePosixPath(v)
    if pp.is_absolute():
        raise ValueError(
            f"member path {v!r} is absolute: outside the population directory "
            "(use a path relative to it, e.g. 'members/<name>')"
        )
    if ".." in pp.parts:
        raise ValueError(f"member path {v!r} contains '..': outside the population directory")
    if not pp.parts:
        raise ValueError(f"member path {v!r} must name a folder inside the population directory")
    if any(part.startswith(".") for part in pp.parts):
        raise ValueError(f"member path {v!r} must not contain hidden components (starting with '.')")
    if pp.parts[0] in RESERVED_NAMES:
        raise ValueError(f"member path {v!r} uses the reserved name {pp.parts[0]!r}")
    return pp.as_posix()


class Member(_Frozen):
    """One LoRA adapter of the population."""

    name: str = Field(pattern=MEMBER_NAME_RE, description="Unique member name (also the LoRA name served).")
    path: str = Field(
        description="Relative POSIX path of the member folder inside the population directory; "
        "defaults to 'members/<name>'."
    )
    rank: int = Field(gt=0, strict=True, description="LoRA rank `r` (must match adapter_config.json).")
    alpha: float = Field(gt=0, allow_inf_nan=False, description="LoRA alpha (must match `lora_alpha`).")
    fitness: float | None = Field(default=None, allow_inf_nan=False, description="Overall fitness score.")
    domain_scores: dict[str, float] = Field(
        default_factory=dict, description="Per-domain accuracy, e.g. {'math': 0.61}."
    )
    parents: list[str] = Field(default_factory=list, description="Names of the parent members.")
    born_generation: int = Field(default=0, ge=0, strict=True, description="Generation the member was created in.")
    seed: int | None = Field(default=None, strict=True, description="Training seed.")
    info: dict[str, Any] = Field(
        default_factory=dict, description="Free-form training details (lr, dropout, warm-up domains...)."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("path") is None and isinstance(data.get("name"), str):
            data = {**data, "path": f"{MEMBERS_DIR}/{data['name']}"}
        return data

    @field_validator("path")
    @classmethod
    def _normalise_path(cls, v: str) -> str:
        return _check_member_path(v)

    @field_validator("domain_scores")
    @classmethod
    def _finite_scores(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, x in v.items() if not math.isfinite(x)]
        if bad:
            raise ValueError(f"domain_scores must be finite numbers; not finite: {bad}")
        return v


class Manifest(_Frozen):
    """Content of ``population.json``: one complete generation."""

    format_version: int = Field(default=FORMAT_VERSION, strict=True, description="Manifest format version.")
    base_model: BaseModelRef = Field(description="Base model shared by all members.")
    generation: int = Field(ge=0, strict=True, description="Generation number of this manifest.")
    members: list[Member] = Field(min_length=1, description="Members; unique names and unique folders.")
    router: dict[str, Any] | None = Field(default=None, description="Router settings (optional).")
    voting_weights: dict[str, float] | None = Field(
        default=None, description="Per-member voting weight (>= 0); keys must be member names."
    )
    config_hash: str | None = Field(default=None, description="Hash of the training config that produced it.")
    created_at: str | None = Field(default=None, description="Creation time (ISO 8601).")

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(
                f"format_version {v} is not supported; this version of ensemble_serve reads "
                f"format_version {FORMAT_VERSION}"
            )
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Manifest:
        names = [m.name for m in self.members]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate member names: {dup}")
        paths = [m.path for m in self.members]
        dup = sorted({p for p in paths if paths.count(p) > 1})
        if dup:
            raise ValueError(f"several members share the folder(s) {dup}")
        for p in paths:
            for q in paths:
                if q.startswith(p + "/"):
                    raise ValueError(f"member folders must not be nested: {q!r} is inside {p!r}")
        if self.voting_weights is not None:
            unknown = sorted(set(self.voting_weights) - set(names))
            if unknown:
                raise ValueError(f"voting_weights has keys that are not member names: {unknown}")
            bad = sorted(k for k, w in self.voting_weights.items() if not (math.isfinite(w) and w >= 0))
            if bad:
                raise ValueError(f"voting_weights must be finite and >= 0; bad: {bad}")
        return self

    @property
    def names(self) -> list[str]:
        """Member names in manifest order."""
        return [m.name for m in self.members]


# --------------------------------------------------------------------------- fingerprint


def _pickle_files(folder: Path) -> list[str]:
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
        pickles = _pickle_files(folder)
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
        pickles = _pickle_files(base)
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


def _inside(root_resolved: Path, rel: str, manifest_path: Path) -> Path:
    """Return ``root/rel`` after checking it resolves (symlinks too) inside ``root``."""
    target = root_resolved / rel
    resolved = target.resolve()
    if resolved == root_resolved or not resolved.is_relative_to(root_resolved):
        raise PopulationError(
            f"{target}: member path {rel!r} resolves to {resolved}, outside the population "
            f"directory (listed in {manifest_path})"
        )
    return target


def _check_adapter_dir(folder: Path, member: Member, base_name: str, *, check_weights: bool, listed_in: Path) -> None:
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
        pickles = _pickle_files(folder)
        if pickles:
            raise PopulationError(
                f"{weights}: missing; found pickle weights {pickles}, which are refused "
                "(save the adapter with safe_serialization=True)"
            )
        raise PopulationError(f"{weights}: adapter weights are missing")
    _check_adapter_weights(weights, member.rank, check_weights=check_weights)


def _check_adapter_weights(path: Path, rank: int, *, check_weights: bool) -> None:
    """Read every tensor header (and, if asked, every tensor) of an adapter file."""
    from safetensors import safe_open  # local import: keeps schema-only users light

    a_mods: dict[str, list[int]] = {}
    b_mods: dict[str, list[int]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                shape = list(f.get_slice(key).get_shape())
                m = _LORA_KEY_RE.match(key)
                if m:
                    (a_mods if m.group("ab") == "A" else b_mods)[m.group("module")] = shape
                if check_weights:
                    t = f.get_tensor(key)
                    if t.is_floating_point() and not bool(t.isfinite().all()):
                        raise PopulationError(f"{path}: tensor {key!r} contains NaN or inf values")
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


def _validate(root: Path, manifest: Manifest, *, check_weights: bool) -> Population:
    manifest_path = root / MANIFEST_FILE
    root_resolved = root.resolve()
    base = _check_base_model(root, manifest, manifest_path)
    for m in manifest.members:
        folder = _inside(root_resolved, m.path, manifest_path)
        _check_adapter_dir(folder, m, manifest.base_model.name, check_weights=check_weights, listed_in=manifest_path)
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
    return _validate(root, read_manifest(root), check_weights=check_weights)


# --------------------------------------------------------------------------- writing


def write_manifest(root: str | os.PathLike[str], manifest: Manifest) -> None:
    """Atomically write ``<root>/population.json`` (temp file, fsync, ``os.replace``).

    The JSON is re-validated first, so a manifest built with ``model_copy(update=...)``
    (which skips validation) cannot write a file that would not load.
    """
    path = Path(root) / MANIFEST_FILE
    text = manifest.model_dump_json(indent=2)
    try:
        Manifest.model_validate_json(text)
    except ValidationError as e:
        raise PopulationError(f"{path}: refusing to write an invalid population manifest:\n{e}") from e
    atomic_write_text(path, text + "\n")


def _check_adapter_keys(manifest: Manifest, adapters: Mapping[str, Any], where: Path, *, all_required: bool) -> None:
    extra = sorted(set(adapters) - set(manifest.names))
    if extra:
        raise PopulationError(f"{where}: adapters given for names not in the manifest: {extra}")
    if all_required:
        missing = [n for n in manifest.names if n not in adapters]
        if missing:
            raise PopulationError(f"{where}: no adapter folder given for members {missing}")


def _copy_adapter(src: Path, dst: Path, member: Member, base_name: str, *, check_weights: bool) -> None:
    """Validate adapter folder ``src`` and copy its adapter files into new folder ``dst``."""
    if not src.is_dir():
        raise PopulationError(f"{src}: adapter folder for member {member.name!r} not found")
    _check_adapter_dir(src, member, base_name, check_weights=check_weights, listed_in=src)
    dst.mkdir(parents=True, exist_ok=False)
    for fname in ADAPTER_FILES:
        if (src / fname).is_file():
            copy_file_durable(src / fname, dst / fname)
    fsync_dir(dst)


def create_population(
    root: str | os.PathLike[str],
    manifest: Manifest,
    adapters: Mapping[str, str | os.PathLike[str]],
    *,
    overwrite: bool = False,
    check_weights: bool = True,
) -> Population:
    """Write a new population directory atomically and return it validated.

    ``adapters`` maps each member name to a PEFT adapter folder; only
    adapter_config.json, adapter_model.safetensors and README.md are copied
    into the member's path. Everything is built in ``.<name>.tmp-*`` beside
    ``root``, validated with the loader, then renamed into place; on any error
    the temp folder is removed and ``root`` is untouched.

    A non-empty existing ``root`` is refused unless ``overwrite=True``; then
    the old directory is renamed aside, the new one renamed in and the old one
    deleted. That two-step swap has a short window with no directory at
    ``root``, so it is for offline use only (never under a running server;
    use :func:`commit_generation` there).
    """
    root = Path(root).absolute()
    _check_adapter_keys(manifest, adapters, root, all_required=True)
    replacing = False
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise PopulationError(f"{root}: exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise PopulationError(f"{root}: already exists and is not empty (pass overwrite=True to replace it)")
        replacing = True

    tmp = tmp_dir_beside(root)
    try:
        for m in manifest.members:
            src = Path(adapters[m.name])
            _copy_adapter(src, tmp / m.path, m, manifest.base_model.name, check_weights=check_weights)
            fsync_dir((tmp / m.path).parent)
        write_manifest(tmp, manifest)
        fsync_dir(tmp)
        validated = _validate(tmp, read_manifest(tmp), check_weights=False)
        if replacing:
            old = tmp_dir_beside(root)
            os.rename(root, old / "old")
            try:
                os.rename(tmp, root)
            except BaseException:
                os.rename(old / "old", root)
                remove_tree(old)
                raise
            remove_tree(old)
        else:
            try:
                os.rename(tmp, root)  # also replaces an existing empty directory
            except OSError as e:
                raise PopulationError(f"{root}: could not move the new population into place ({e})") from e
    except BaseException:
        remove_tree(tmp)
        raise
    fsync_dir(root.parent)
    return Population(root=root, manifest=validated.manifest, base_model_path=validated.base_model_path)


def _same_adapter_files(src: Path, dst: Path) -> bool:
    for fname in ADAPTER_FILES:
        a, b = src / fname, dst / fname
        if a.is_file() != b.is_file():
            return False
        if a.is_file() and not filecmp.cmp(a, b, shallow=False):
            return False
    return True


def _referenced_dirs(root: Path, manifest: Manifest) -> set[Path]:
    return {(root / m.path) for m in manifest.members}


def _prune(root: Path, keep: Manifest, candidates: Iterable[Path]) -> list[Path]:
    keep_paths = {PurePosixPath(m.path) for m in keep.members}
    root_resolved = root.resolve()
    removed: list[Path] = []
    for cand in sorted(set(candidates)):
        try:
            rel = PurePosixPath(cand.relative_to(root).as_posix())
        except ValueError:
            continue
        # keep referenced folders, their ancestors and anything inside them
        if any(rel == k or rel in k.parents or k in rel.parents for k in keep_paths):
            continue
        if not (cand.exists() or cand.is_symlink()):
            continue
        if not cand.is_symlink() and not cand.resolve().is_relative_to(root_resolved):
            continue
        remove_tree(cand)
        removed.append(cand)
    if removed:
        for parent in {p.parent for p in removed}:
            if parent.is_dir():
                fsync_dir(parent)
    return removed


def prune_unreferenced(root: str | os.PathLike[str], *, extra: Iterable[str] = ()) -> list[Path]:
    """Delete folders under ``members/`` (and the relative paths in ``extra``) that the
    current manifest does not reference; return what was removed.

    Only safe when no reader still needs an older generation's folders.
    """
    root = Path(root)
    manifest = read_manifest(root)
    members_dir = root / MEMBERS_DIR
    candidates = list(members_dir.iterdir()) if members_dir.is_dir() else []
    candidates += [root / _check_member_path(p) for p in extra]
    return _prune(root, manifest, candidates)


def commit_generation(
    root: str | os.PathLike[str],
    manifest: Manifest,
    new_adapters: Mapping[str, str | os.PathLike[str]],
    *,
    keep_unreferenced: bool = False,
    check_weights: bool = True,
) -> Population:
    """Make ``manifest`` the current generation of the existing population at ``root``.

    Member folders are immutable: each entry of ``new_adapters`` (member name
    -> adapter folder) is copied to its member's path, which must be a new
    folder (an existing folder is accepted only if it holds identical files).
    Members not in ``new_adapters`` must already exist. New folders are
    written as temp folder + rename; the whole generation is validated; only
    then is population.json replaced atomically. On any failure before that
    swap the new folders are removed and the previous generation is intact.
    Afterwards, member folders no longer referenced are deleted unless
    ``keep_unreferenced`` (keep them while a reader may still be loading the
    previous generation, and prune later with :func:`prune_unreferenced`).
    """
    root = Path(root).absolute()
    manifest_path = root / MANIFEST_FILE
    old = read_manifest(root)
    old_bytes = manifest_path.read_bytes()
    if manifest.generation < old.generation:
        raise PopulationError(
            f"{manifest_path}: current generation is {old.generation}; refusing to commit older "
            f"generation {manifest.generation}"
        )
    _check_adapter_keys(manifest, new_adapters, manifest_path, all_required=False)
    root_resolved = root.resolve()
    created: list[Path] = []
    try:
        for m in manifest.members:
            if m.name not in new_adapters:
                continue
            src = Path(new_adapters[m.name])
            target = _inside(root_resolved, m.path, manifest_path)
            if target.exists() or target.is_symlink():
                _check_adapter_dir(src, m, manifest.base_model.name, check_weights=check_weights, listed_in=src)
                if not _same_adapter_files(src, target):
                    raise PopulationError(
                        f"{target}: member folder already exists with different content; member "
                        f"folders are immutable, so give member {m.name!r} a new path "
                        f"(e.g. '{MEMBERS_DIR}/{m.name}-g{manifest.generation}')"
                    )
                continue
            tmp = tmp_dir_beside(target)
            try:
                _copy_adapter(src, tmp / "adapter", m, manifest.base_model.name, check_weights=check_weights)
                os.rename(tmp / "adapter", target)
            finally:
                remove_tree(tmp)
            created.append(target)
            fsync_dir(target.parent)
        validated = _validate(root, manifest, check_weights=False)
        write_manifest(root, manifest)
    except BaseException:
        if manifest_path.read_bytes() == old_bytes:  # not swapped: the old generation stays as it was
            for folder in created:
                remove_tree(folder)
        raise
    if not keep_unreferenced:
        members_dir = root / MEMBERS_DIR
        candidates = _referenced_dirs(root, old)
        if members_dir.is_dir():
            candidates |= set(members_dir.iterdir())
        _prune(root, manifest, candidates)
    return validated


# --------------------------------------------------------------------------- history


def append_history(root: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``<root>/history.jsonl`` (flush + fsync).

    A truncated last line left by a crash is first cut off (with a warning) so
    the new record starts on its own line.
    """
    path = Path(root) / HISTORY_FILE
    try:
        line = json.dumps(dict(record), ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
    except (TypeError, ValueError) as e:
        raise PopulationError(f"{path}: history record is not JSON-serialisable ({e})") from e
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            tail_start = _last_line_start(fd, size)
            tail = os.pread(fd, size - tail_start, tail_start)
            if not tail.endswith(b"\n"):
                if _is_json_object(tail):
                    os.pwrite(fd, b"\n", size)  # complete record that only lacks its newline
                else:
                    logger.warning("%s: dropping truncated last line (%d bytes) before appending", path, len(tail))
                    os.ftruncate(fd, tail_start)
        os.lseek(fd, 0, os.SEEK_END)
        data = line.encode("utf-8")
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def _last_line_start(fd: int, size: int) -> int:
    """Offset just after the last newline before the file's final byte (0 if none)."""
    pos = size - 1  # ignore a trailing newline
    step = 1 << 16
    while pos > 0:
        start = max(0, pos - step)
        chunk = os.pread(fd, pos - start, start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_history(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Return the records of ``<root>/history.jsonl`` (``[]`` if it does not exist).

    A truncated last line (crash during an append) is skipped with a warning;
    a bad line anywhere else raises :class:`PopulationError` naming the line.
    """
    path = Path(root) / HISTORY_FILE
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete_tail = data.endswith(b"\n")
    if complete_tail:
        lines.pop()
    records: list[dict[str, Any]] = []
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        except (ValueError, UnicodeDecodeError) as e:
            if i == len(lines) and not complete_tail:
                logger.warning("%s: skipping truncated last line %d (%s)", path, i, e)
                continue
            raise PopulationError(f"{path}: line {i} is not a valid JSON object ({e})") from e
        records.append(rec)
    return records
