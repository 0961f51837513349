"""Writing a population: a new directory (:func:`create_population`) or the next generation (:func:`commit_generation`).

One writer, any number of readers. Member folders are immutable once written: a new member is
copied into a temp folder beside its final path and renamed into place, and an existing folder
is accepted only if it holds identical files. Every write is validated with the loader before
it becomes visible, and ``population.json`` is replaced atomically (:func:`write_manifest`), so a
reader that reads the manifest once always sees a complete generation. On any failure before
that swap the new folders are removed and the previous generation is intact. Only the adapter
files (config, safetensors weights, README) are copied from an adapter folder.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError

from ensemble_serve.shared.fsutil import (
    atomic_write_text,
    copy_file_durable,
    fsync_dir,
    remove_tree,
    tmp_dir_beside,
)
from ensemble_serve.shared.population.load import (
    Population,
    PopulationError,
    check_adapter_dir,
    read_manifest,
    resolve_inside,
    validate_population,
)
from ensemble_serve.shared.population.manifest import (
    ADAPTER_FILES,
    MANIFEST_FILE,
    MEMBERS_DIR,
    Manifest,
    Member,
    check_member_path,
)

__all__ = ["commit_generation", "copy_with_base_path", "create_population", "prune_unreferenced", "write_manifest"]


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


def copy_with_base_path(
    src: str | os.PathLike[str], dest: str | os.PathLike[str], base_path: str | None, *, overwrite: bool = False
) -> None:
    """Copy the population at ``src`` (every file but locks and hidden ones) to ``dest`` with ``base_model.path``
    set to ``base_path`` (None: named by name and fingerprint only, for shipping).

    The copy is checked (its base's fingerprint included) in a temporary folder beside ``dest`` and
    renamed into place, so ``dest`` is complete or absent; an existing ``dest`` is replaced only with
    ``overwrite``.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise PopulationError(f"{dest} exists; pass --overwrite to replace it")
    manifest = read_manifest(src)
    tmp = tmp_dir_beside(dest)
    try:
        copy = tmp / "population"
        shutil.copytree(src, copy, ignore=shutil.ignore_patterns("*.lock", ".*"))
        write_manifest(
            copy, manifest.model_copy(update={"base_model": manifest.base_model.model_copy(update={"path": base_path})})
        )
        validate_population(copy, read_manifest(copy), check_weights=False)
        if dest.exists():
            remove_tree(dest)
        os.rename(copy, dest)
    finally:
        remove_tree(tmp)


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
    check_adapter_dir(src, member, base_name, check_weights=check_weights, listed_in=src)
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
        validated = validate_population(tmp, read_manifest(tmp), check_weights=False)
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
    candidates += [root / check_member_path(p) for p in extra]
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
            target = resolve_inside(root_resolved, m.path, manifest_path)
            if target.exists() or target.is_symlink():
                check_adapter_dir(src, m, manifest.base_model.name, check_weights=check_weights, listed_in=src)
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
        validated = validate_population(root, manifest, check_weights=False)
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
