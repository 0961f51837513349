"""Bring your own adapters: check PEFT LoRA folders trained elsewhere against a base model and
make a population directory of them.

A user arrives with what `vllm serve BASE --enable-lora --lora-modules a=PATH b=PATH` takes: a
Hugging Face model folder and PEFT adapter folders. :func:`parse_lora_module` reads vLLM's
``--lora-modules`` forms (``name=path`` and the JSON object ``{"name": ..., "path": ...,
"base_model_name": ...}``); :func:`check_adapter` checks one folder against the base without
loading any weights (headers only); :func:`import_adapters` copies the checked adapters into a new
population directory, atomically (through :func:`create_population`). Fitness stays unknown until
``ensemble-train eval``.

What is refused, each naming the adapter: a missing folder, no ``adapter_config.json``, a
non-LoRA PEFT type, pickle-only weights, ``modules_to_save`` (vLLM cannot serve them), a
``base_model_name_or_path`` naming another model, a LoRA module the base does not have (an
unknown target module) and a LoRA shape that does not fit the base's weight (another base of
the same name, or one whose adapter says nothing of its base), and a rank above
``max_lora_rank``. Adapters may differ in rank and target modules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import Any

from safetensors import safe_open

from ensemble_serve.shared.embedded import EMBEDDED_POPULATION, EMBEDDED_REAL_POPULATION
from ensemble_serve.shared.engine_config import VLLM_LORA_RANKS
from ensemble_serve.shared.population.commit import create_population
from ensemble_serve.shared.population.load import (
    Population,
    PopulationError,
    fingerprint_model_dir,
    pickle_files,
    read_manifest,
)
from ensemble_serve.shared.population.manifest import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    MEMBER_NAME_RE,
    BaseModelRef,
    Manifest,
    Member,
)

__all__ = [
    "AdapterSpec",
    "BaseShapes",
    "check_adapter",
    "import_adapters",
    "max_rank_for",
    "parse_lora_module",
    "read_base_shapes",
]

# PEFT's tensor names: base_model.model.<module path>.lora_A.weight (lora_embedding_A for embeddings)
_PEFT_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.weight)?$"
)
_NAME_RE = re.compile(MEMBER_NAME_RE)


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to serve: a member name, its folder, and (optionally) the base it says it is for."""

    name: str
    path: Path
    base_model_name: str | None = None


def parse_lora_module(text: str) -> AdapterSpec:
    """One ``--lora-modules`` value, in vLLM's forms: ``name=path`` or a JSON object."""
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--lora-modules {text!r}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"--lora-modules {text!r}: the JSON form is an object with name and path")
        unknown = sorted(set(obj) - {"name", "path", "base_model_name"})
        if unknown:
            raise ValueError(f"--lora-modules {text!r}: unknown keys {unknown} (name, path, base_model_name)")
        name, path, base = obj.get("name"), obj.get("path"), obj.get("base_model_name")
        if not isinstance(name, str) or not isinstance(path, str) or not path:
            raise ValueError(f"--lora-modules {text!r}: needs string `name` and `path`")
        if base is not None and not isinstance(base, str):
            raise ValueError(f"--lora-modules {text!r}: base_model_name must be a string")
    else:
        name, sep, path = text.partition("=")
        if not sep or not path:
            raise ValueError(f"--lora-modules {text!r}: expected NAME=PATH or a JSON object")
        base = None
    if not _NAME_RE.match(name):
        raise ValueError(
            f"--lora-modules {text!r}: adapter name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return AdapterSpec(name=name, path=Path(path).expanduser(), base_model_name=base)


@dataclass(frozen=True)
class BaseShapes:
    """What an adapter is checked against: the base's name(s) and its weights' shapes (from headers)."""

    folder: Path
    names: frozenset[str]
    shapes: dict[str, tuple[int, ...]]
    """Weight name without ``.weight`` -> shape, e.g. ``model.layers.0.self_attn.q_proj`` -> (out, in)."""

    def leaf_names(self) -> set[str]:
        return {k.rsplit(".", 1)[-1] for k, s in self.shapes.items() if len(s) == 2}


def read_base_shapes(folder: str | os.PathLike[str]) -> BaseShapes:
    """Read a Hugging Face model folder's config and its safetensors headers (no tensor is loaded)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PopulationError(f"{folder}: base model folder not found")
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise PopulationError(f"{cfg_path}: the base model has no config.json") from None
    except (OSError, ValueError) as e:
        raise PopulationError(f"{cfg_path}: not readable JSON ({e})") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = pickle_files(folder)
        what = f"only pickle weights {pickles}, which are refused" if pickles else "no *.safetensors weights"
        raise PopulationError(f"{folder}: the base model has {what}")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if key.endswith(".weight"):
                        shapes[key[: -len(".weight")]] = tuple(st.get_slice(key).get_shape())
        except Exception as e:  # SafetensorError, OSError
            raise PopulationError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    names = {folder.name, str(folder), str(folder.resolve())}
    if isinstance(cfg, dict) and isinstance(cfg.get("_name_or_path"), str) and cfg["_name_or_path"]:
        names.add(cfg["_name_or_path"])
    names |= _source_names(folder)
    return BaseShapes(folder=folder, names=frozenset(names), shapes=shapes)


def _source_names(folder: Path) -> set[str]:
    """The names a converted model recorded of its source (`source.json` of `ensemble-train base --from-gguf`):
    the file's name and stem, and the stem without its quantization (`SmolLM2-135M-Instruct.Q4_1.gguf` ->
    `SmolLM2-135M-Instruct`), which is what an adapter trained on the original names."""
    try:
        source = json.loads((folder / "source.json").read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(source, dict) or not isinstance(source.get("file"), str):
        return set()
    file = source["file"]
    stem = PurePath(file).stem
    return {file, stem, stem.split(".")[0]} - {""}


def _same_name(claimed: str, base: BaseShapes) -> bool:
    """An adapter's base name matches when it names the base folder, or ends with the same model name
    (`Qwen/Qwen2-0.5B` for a folder `.../Qwen2-0.5B`; case-insensitive)."""
    if claimed in base.names:
        return True
    p = Path(claimed).expanduser()
    if p.is_dir() and p.resolve() == base.folder.resolve():
        return True
    tail = PurePath(claimed.rstrip("/")).name.lower()
    return bool(tail) and any(PurePath(n.rstrip("/")).name.lower() == tail for n in base.names)


def _same_model(claimed: str, adapter: Path, base: BaseShapes) -> bool:
    """Whether a base named otherwise is the same model, by what identifies it rather than by its name:

    - the name is a local model folder whose weights are the base's (the same sha256 fingerprint);
    - the adapter is a member of a population directory whose manifest names that base with the base's
      fingerprint (a member offered to its base served from a folder of another name);
    - an embedded population's manifest names that base with the base's fingerprint (an adapter trained
      on the sandbox substrate names it ``sandbox-substrate``, its folder is ``substrate``).

    Any other name is another model's as far as can be told: refused, unless --ignore-base-name.
    """
    mine = None

    def base_fingerprint() -> str | None:
        nonlocal mine
        if mine is None:
            try:
                mine = fingerprint_model_dir(base.folder)
            except PopulationError:
                mine = ""
        return mine or None

    p = Path(claimed).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        try:
            return fingerprint_model_dir(p) == base_fingerprint()
        except PopulationError:
            return False
    # members/<name> inside a population directory, then the populations that ship with the package
    for root in (adapter.parent, adapter.parent.parent, EMBEDDED_POPULATION, EMBEDDED_REAL_POPULATION):
        try:
            manifest = read_manifest(root)
        except (PopulationError, OSError, ValueError):
            continue
        ref = manifest.base_model
        if ref.name == claimed and ref.sha256 is not None:
            return ref.sha256 == base_fingerprint()
    return False


def _read_adapter_config(spec: AdapterSpec) -> dict[str, Any]:
    folder = spec.path
    if not folder.exists():
        raise PopulationError(f"adapter {spec.name!r}: folder {folder} not found")
    if not folder.is_dir():
        raise PopulationError(f"adapter {spec.name!r}: {folder} is not a folder (a PEFT adapter is a folder)")
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise PopulationError(f"adapter {spec.name!r}: {folder} has no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise PopulationError(f"adapter {spec.name!r}: {cfg_path} is not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise PopulationError(f"adapter {spec.name!r}: {cfg_path} must hold a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise PopulationError(f"adapter {spec.name!r}: peft_type is {cfg.get('peft_type')!r}; only LORA is served")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise PopulationError(f"adapter {spec.name!r}: r={r!r} in {cfg_path} is not a positive integer")
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise PopulationError(f"adapter {spec.name!r}: lora_alpha={alpha!r} in {cfg_path} is not a positive number")
    if cfg.get("modules_to_save"):
        raise PopulationError(
            f"adapter {spec.name!r}: modules_to_save {cfg['modules_to_save']} (fully trained modules) cannot be "
            "served by vLLM's LoRA; only LoRA updates can"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise PopulationError(f"adapter {spec.name!r}: {key} (per-module ranks) is not supported by vLLM")
    if cfg.get("use_dora"):
        raise PopulationError(f"adapter {spec.name!r}: DoRA adapters (use_dora) are not supported by vLLM")
    return cfg


def check_adapter(spec: AdapterSpec, base: BaseShapes, *, ignore_base_name: bool = False) -> dict[str, Any]:
    """Check one PEFT LoRA folder against ``base``; return its adapter config. Raises :class:`PopulationError`."""
    cfg = _read_adapter_config(spec)
    weights = spec.path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = pickle_files(spec.path)
        if pickles:
            raise PopulationError(
                f"adapter {spec.name!r}: only pickle weights {pickles}, which are refused; save it again with "
                f"safe_serialization=True ({ADAPTER_WEIGHTS})"
            )
        raise PopulationError(f"adapter {spec.name!r}: {weights} not found")
    claimed = spec.base_model_name or cfg.get("base_model_name_or_path")
    if claimed and not ignore_base_name and not _same_name(claimed, base) and not _same_model(claimed, spec.path, base):
        raise PopulationError(
            f"adapter {spec.name!r} was trained on {claimed!r}, not on the base {base.folder.name!r} "
            "(its base_model_name_or_path, and nothing shows that it is the same model: neither a folder with "
            "the same weights nor a population whose manifest records them); if it is the same model under "
            "another name, pass --ignore-base-name (shapes are still checked)"
        )
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        targets = None if targets == "all-linear" else targets  # a regex or all-linear: checked by the tensors
    elif isinstance(targets, list):
        unknown = sorted({t for t in targets if isinstance(t, str)} - base.leaf_names() - {"embed_tokens", "lm_head"})
        unknown = [t for t in unknown if not any(k.endswith("." + t) or k == t for k in base.shapes)]
        if unknown:
            raise PopulationError(
                f"adapter {spec.name!r}: target modules {unknown} are not modules of the base model "
                f"(it has {sorted(base.leaf_names())[:12]})"
            )
    _check_tensors(spec, weights, int(cfg["r"]), base)
    return cfg


def _check_tensors(spec: AdapterSpec, weights: Path, rank: int, base: BaseShapes) -> None:
    mods: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        with safe_open(str(weights), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118
                m = _PEFT_KEY_RE.match(key)
                if m is None:
                    continue
                part = ("embedding_" if m.group("emb") else "") + m.group("ab")
                mods.setdefault(m.group("module"), {})[part] = tuple(st.get_slice(key).get_shape())
    except Exception as e:
        raise PopulationError(
            f"adapter {spec.name!r}: {weights} is not a readable safetensors file ({type(e).__name__}: {e})"
        ) from e
    if not mods:
        raise PopulationError(f"adapter {spec.name!r}: {weights} holds no LoRA tensors (no '*.lora_A.weight')")
    for module, ab in sorted(mods.items()):
        where = f"adapter {spec.name!r}: module {module}"
        base_shape = base.shapes.get(module)
        if base_shape is None:
            raise PopulationError(f"{where} is not in the base model {base.folder.name!r} (unknown target module)")
        if len(base_shape) != 2:
            raise PopulationError(f"{where}: the base weight has shape {list(base_shape)}, not a linear layer's")
        if set(ab) in ({"A", "B"}, {"embedding_A", "embedding_B"}):
            emb = "embedding_A" in ab
            a, b = (ab["embedding_A"], ab["embedding_B"]) if emb else (ab["A"], ab["B"])
        else:
            raise PopulationError(f"{where}: lora_A and lora_B do not pair up ({sorted(ab)})")
        if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            raise PopulationError(
                f"{where}: LoRA shapes A {list(a)}, B {list(b)} do not have the rank r={rank} of its adapter_config.json"
            )
        # a linear weight is (out, in): A is (r, in), B is (out, r); an embedding is (vocab, dim): A (r, vocab), B (dim, r)
        want_in, want_out = (base_shape[0], base_shape[1]) if emb else (base_shape[1], base_shape[0])
        if a[1] != want_in or b[0] != want_out:
            raise PopulationError(
                f"{where}: the update is {b[0]}x{a[1]} but the base weight is {base_shape[0]}x{base_shape[1]}: "
                f"the adapter was made for another base model"
            )


def max_rank_for(ranks: list[int], max_lora_rank: int | None, vllm_ranks: tuple[int, ...] = VLLM_LORA_RANKS) -> int:
    """The engine's max LoRA rank: ``max_lora_rank`` if it fits every adapter, else the smallest of vLLM's
    values that does when none was given."""
    biggest = max(ranks)
    if max_lora_rank is not None:
        if biggest > max_lora_rank:
            raise PopulationError(
                f"an adapter has rank {biggest}, above --max-lora-rank {max_lora_rank}: set --max-lora-rank "
                f"{next((r for r in vllm_ranks if r >= biggest), biggest)} (or leave it unset to size it automatically)"
            )
        return max_lora_rank
    for r in vllm_ranks:
        if r >= biggest:
            return r
    raise PopulationError(f"an adapter has rank {biggest}, above vLLM's largest LoRA rank {vllm_ranks[-1]}")


def import_adapters(
    base: str | os.PathLike[str],
    specs: list[AdapterSpec],
    dest: str | os.PathLike[str],
    *,
    base_name: str | None = None,
    ignore_base_name: bool = False,
    overwrite: bool = False,
    max_lora_rank: int | None = None,
    vllm_ranks: tuple[int, ...] = VLLM_LORA_RANKS,
) -> Population:
    """Check every adapter against ``base`` and write them as a new population directory at ``dest``.

    The copies' ``base_model_name_or_path`` is set to the population's base name (what the adapter
    said is kept in the member's ``info``). The directory appears complete or not at all. Members
    have no fitness until ``ensemble-train eval`` measures it.
    """
    if not specs:
        raise PopulationError("no adapters given (--lora-modules NAME=PATH ...)")
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PopulationError(f"adapter names given twice: {dup}")
    shapes = read_base_shapes(base)
    configs = {s.name: check_adapter(s, shapes, ignore_base_name=ignore_base_name) for s in specs}
    max_rank_for([int(c["r"]) for c in configs.values()], max_lora_rank, vllm_ranks)
    base_path = shapes.folder.resolve()
    name = base_name or base_path.name
    members = []
    for s in specs:
        cfg = configs[s.name]
        info = {
            "imported_from": str(s.path.resolve()),
            "base_model_name_or_path": cfg.get("base_model_name_or_path"),
            "target_modules": cfg.get("target_modules"),
        }
        members.append(Member(name=s.name, rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), info=info))
    manifest = Manifest(
        base_model=BaseModelRef(name=name, path=str(base_path), sha256=fingerprint_model_dir(base)),
        generation=0,
        members=members,
        created_at=_now(),
    )
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=dest.parent))
    try:
        staged = {}
        for s in specs:  # the copies name the population's base, as its loader checks
            folder = staging / s.name
            folder.mkdir()
            for fname in ADAPTER_FILES:
                if (s.path / fname).is_file():
                    shutil.copyfile(s.path / fname, folder / fname)
            cfg = dict(configs[s.name], base_model_name_or_path=name)
            (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
            staged[s.name] = folder
        return create_population(dest, manifest, staged, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
