"""A GGUF file as an ordinary Hugging Face folder that vLLM, PEFT and transformers load.

transformers dequantizes the GGUF formats it knows (`from_pretrained(folder, gguf_file=...)`); what it
loads is then saved as safetensors with its tokenizer, chat template and generation config, plus a
`source.json` that records where the weights came from: the file's name, size and sha256, its
architecture and quantization, and the transformers version that dequantized it. The weights are the
GGUF's dequantized values (a Q4_1 file gives Q4_1's precision in float32), not the original checkpoint.

`convert_gguf` writes into a temporary sibling of the destination and renames it into place last, so no
half-written folder is ever left under the final name (a full disk, a kill, a file transformers cannot
read). `cached_conversion` converts once into the user cache, keyed by the file's sha256, under a file
lock, so that two processes starting at once convert it once and both use the result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ensemble_serve.shared.fsutil import atomic_write_text, cache_dir, fsync_dir

__all__ = ["GGUFError", "GGUFInfo", "SOURCE_FILE", "cached_conversion", "convert_gguf", "inspect_gguf", "sha256_of"]

SOURCE_FILE = "source.json"
DONE_FILE = "CONVERTED"  # written last inside the temporary folder: a folder without it is never used
GGUF_MAGIC = b"GGUF"

# GGML file types (general.file_type), as llama.cpp numbers them
FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}

logger = logging.getLogger(__name__)


class GGUFError(ValueError):
    """A GGUF file that cannot be turned into a model folder (missing, corrupt, truncated, unsupported)."""


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file says about itself, read from its header without loading the weights."""

    path: Path
    architecture: str
    name: str | None
    quantization: str
    tensors: int


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def inspect_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """The file's architecture and quantization; GGUFError if it is not a readable GGUF that transformers supports."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    version = struct.unpack("<I", head[4:8])[0]
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - the `real` extra
        raise GGUFError("reading a GGUF file needs the `gguf` package: install the `real` extra") from e
    try:
        reader = GGUFReader(path)
        fields = reader.fields
        architecture = _field(fields, "general.architecture")
        name = _field(fields, "general.name")
        file_type = _field(fields, "general.file_type")
        tensors = len(reader.tensors)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except GGUFError:
        raise
    except Exception as e:  # numpy memmap errors, struct errors, KeyErrors of a damaged header
        raise GGUFError(f"{path}: a damaged or truncated GGUF file (version {version}): {e}") from e
    if end > path.stat().st_size:
        raise GGUFError(f"{path}: truncated: its tensors end at byte {end}, the file has {path.stat().st_size}")
    if not architecture:
        raise GGUFError(f"{path}: the GGUF header names no architecture (general.architecture)")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # those two are metadata sections
    if architecture not in readable:
        raise GGUFError(
            f"{path}: architecture {architecture!r} cannot be dequantized by transformers (it reads: {', '.join(readable)})"
        )
    quantization = FILE_TYPES.get(file_type, f"file_type {file_type}") if isinstance(file_type, int) else "unknown"
    return GGUFInfo(path=path, architecture=str(architecture), name=name, quantization=quantization, tensors=tensors)


def _field(fields: dict[str, Any], key: str) -> Any:
    """One scalar or string field of a GGUF header, None when absent."""
    f = fields.get(key)
    if f is None:
        return None
    value = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value.item() if hasattr(value, "item") else value[0]


def convert_gguf(gguf_file: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Dequantize `gguf_file` into an HF folder at `out` (safetensors, tokenizer, chat template,
    generation config, source.json); atomic: `out` appears complete or not at all."""
    src, out = Path(gguf_file).resolve(), Path(out)
    info = inspect_gguf(src)
    if out.exists():
        if not overwrite:
            raise GGUFError(f"{out} exists; choose another folder or pass overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.converting-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    try:
        _convert_into(info, tmp)
        source = {
            "format": "gguf",
            "file": src.name,
            "bytes": src.stat().st_size,
            "sha256": sha256_of(src),
            "architecture": info.architecture,
            "name": info.name,
            "quantization": info.quantization,
            "dequantized_to": "float32",
            "converted_by": f"transformers {_version('transformers')}, gguf {_version('gguf')}",
            "seconds": round(time.perf_counter() - started, 1),
        }
        atomic_write_text(tmp / SOURCE_FILE, json.dumps(source, indent=2) + "\n")
        atomic_write_text(tmp / DONE_FILE, "done\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, GGUFError | KeyboardInterrupt | SystemExit):
            raise
        if isinstance(e, OSError):
            raise GGUFError(f"converting {src.name} into {out} failed: {e}") from e
        raise GGUFError(f"{src}: transformers could not load this GGUF ({type(e).__name__}: {e})") from e
    return out


def _convert_into(info: GGUFInfo, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    kw = {"gguf_file": info.path.name}
    tokenizer = AutoTokenizer.from_pretrained(info.path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(info.path.parent, dtype=torch.float32, **kw)
    # a GGUF-loaded model refuses to save while it still says it is quantized; its weights are already plain
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if model.generation_config is None or not (folder / "generation_config.json").exists():
        GenerationConfig.from_model_config(model.config).save_pretrained(folder)
    if not list(folder.glob("*.safetensors")):
        raise GGUFError(f"{info.path}: transformers saved no safetensors weights")


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def cached_conversion(gguf_file: str | os.PathLike[str], cache_root: Path | None = None) -> Path:
    """The converted folder of `gguf_file` in the user cache, converted first if missing (once, under a lock)."""
    src = Path(gguf_file).resolve()
    inspect_gguf(src)  # a bad file fails here, before any lock or folder
    root = Path(cache_root) if cache_root is not None else cache_dir("models")
    root.mkdir(parents=True, exist_ok=True)
    key = f"{src.stem}-{sha256_of(src)[:16]}"
    out = root / key
    if _complete(out):
        return out
    with open(root / f".{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting it: wait, then use its result
        if not _complete(out):
            logger.info("converting %s into %s (once: later starts reuse it)", src.name, out)
            convert_gguf(src, out, overwrite=True)
    return out


def _complete(folder: Path) -> bool:
    return (folder / DONE_FILE).is_file() and (folder / SOURCE_FILE).is_file()
