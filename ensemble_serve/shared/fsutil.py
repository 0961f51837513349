"""Small durable-filesystem helpers (atomic writes, fsync, temp folders).

All writers in the population directory go through these so that a crash
never leaves a half-written file under its final name: data goes to a temp
file in the same folder, is flushed and fsynced, then ``os.replace``-d over
the target, and the folder itself is fsynced so the rename is durable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "cache_dir",
    "copy_file_durable",
    "fsync_dir",
    "remove_tree",
    "tmp_dir_beside",
]

_COPY_CHUNK = 1 << 20


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Fsync a directory so renames/creations inside it survive a crash.

    A no-op on platforms that cannot open directories (e.g. Windows).
    """
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (PermissionError, IsADirectoryError):  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems without dir fsync
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``).

    Readers see either the old content or the new content, never a mix.
    The temp file lives in the same folder (``.<name>.tmp-*``) so the rename
    never crosses filesystems; it is removed if anything fails.
    """
    target = Path(path)
    parent = target.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode(encoding), mode=mode)


def copy_file_durable(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy the bytes of ``src`` to a new file ``dst`` and fsync it.

    ``dst`` must not exist (it is opened with ``O_EXCL``); the caller fsyncs
    the destination folder once all files are in place.
    """
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)
        fout.flush()
        os.fsync(fout.fileno())


def tmp_dir_beside(path: str | os.PathLike[str]) -> Path:
    """Create and return a new empty folder next to ``path``.

    It is named ``.<name>.tmp-<random>`` in ``path``'s parent (same
    filesystem, so it can later be renamed onto ``path``). The parent is
    created if needed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)
    return tmp


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove a folder tree (or a symlink/file) if it exists; never follows a symlink."""
    p = Path(path)
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    elif p.exists():
        shutil.rmtree(p)


def cache_dir(*parts: str) -> Path:
    """A folder under the user's cache for things built once and reused across checkouts and runs.

    `ENSEMBLE_SERVE_CACHE` if set, else `$XDG_CACHE_HOME/ensemble-serve`, else `~/.cache/ensemble-serve`.
    What lives there is keyed by content (a hash in its name), so a stale entry is never reused.
    """
    root = os.environ.get("ENSEMBLE_SERVE_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ensemble-serve")
    return Path(root, *parts)
