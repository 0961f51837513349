"""``history.jsonl``: one JSON object per line, one line per generation, append-only.

:func:`append_history` writes a whole line and fsyncs it; a crash can leave at most a truncated
last line, which the next append cuts off (or completes with its newline, if the record is whole)
and which :func:`read_history` skips with a warning. A bad line anywhere else is an error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ensemble_serve.shared.fsutil import fsync_dir
from ensemble_serve.shared.population.load import PopulationError
from ensemble_serve.shared.population.manifest import HISTORY_FILE

__all__ = ["append_history", "read_history"]

logger = logging.getLogger(__name__)


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
