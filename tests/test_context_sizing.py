"""On the CPU the KV cache is sized in bytes and the context length follows from it (engine_config.size_context):
one line that says so, or one line that names the flag and a value that fits; never vLLM's startup trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ensemble_serve.cli import main as serve_main
from ensemble_serve.shared.engine_config import (
    CPU_KV_CACHE_BYTES,
    ContextSizeError,
    EngineConfig,
    kv_bytes_per_token,
    parse_bytes,
    size_context,
)
from ensemble_serve.testing.servers import plain_embedded

# SmolLM2-135M-Instruct's shape: 30 layers, 9 heads / 3 KV heads of 64, 8192 positions
SMOL = {
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "max_position_embeddings": 8192,
}


@pytest.fixture()
def smol(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(SMOL))
    return tmp_path


def test_bytes_per_token_is_k_and_v_of_every_layer():
    assert kv_bytes_per_token(SMOL, 4) == 2 * 30 * 3 * 64 * 4 == 46080
    assert kv_bytes_per_token({**SMOL, "head_dim": 32}, 2) == 2 * 30 * 3 * 32 * 2
    assert kv_bytes_per_token({"text_config": SMOL}, 4) == 46080  # a multimodal config's text part


def test_the_models_full_context_when_it_fits(smol: Path):
    sizing = size_context(smol, EngineConfig())
    assert (sizing.kv_cache_bytes, sizing.max_model_len, sizing.message) == (CPU_KV_CACHE_BYTES, None, "")


def test_a_small_cache_sizes_the_context_and_says_so(smol: Path):
    sizing = size_context(smol, EngineConfig(kv_cache_memory_bytes=parse_bytes("150M")))
    assert sizing.max_model_len == 3328 and sizing.max_model_len * 46080 <= 150 * 2**20
    assert "context length 3328 tokens (the model allows 8192)" in sizing.message
    assert "--kv-cache-memory-bytes 361M" in sizing.message and "\n" not in sizing.message


def test_a_context_that_does_not_fit_is_refused_naming_what_fits(smol: Path):
    with pytest.raises(ContextSizeError) as info:
        size_context(smol, EngineConfig(kv_cache_memory_bytes=parse_bytes("150M"), max_model_len=8192))
    message = str(info.value)
    assert "--max-model-len 3328 or less" in message and "--kv-cache-memory-bytes 361M or more" in message
    assert size_context(smol, EngineConfig(kv_cache_memory_bytes=parse_bytes("361M"), max_model_len=8192))


def test_a_cache_too_small_for_any_useful_context_is_refused(smol: Path):
    with pytest.raises(ContextSizeError, match=r"holds 113 tokens .* --kv-cache-memory-bytes 181M"):
        size_context(smol, EngineConfig(kv_cache_memory_bytes=parse_bytes("5M")))


def test_a_config_it_cannot_read_leaves_the_context_to_vllm(tmp_path: Path):
    (tmp_path / "config.json").write_text("{not json")
    assert size_context(tmp_path, EngineConfig()).max_model_len is None
    assert size_context(None, EngineConfig(max_model_len=512)).max_model_len == 512


@pytest.mark.parametrize(
    ("text", "size"), [("1G", 2**30), ("512M", 512 * 2**20), ("2.5G", int(2.5 * 2**30)), ("1048576", 2**20)]
)
def test_sizes_read_as_vllms_flag_reads_them(text: str, size: int):
    assert parse_bytes(text) == size


@pytest.mark.parametrize(
    ("text", "words"), [("lots", "a size in bytes"), ("1Q", "a size in bytes"), ("10", "at least 1M")]
)
def test_bad_sizes_are_refused(text: str, words: str):
    with pytest.raises(ValueError, match=words):
        parse_bytes(text)


def test_up_refuses_a_context_that_cannot_fit_in_one_line_before_the_engine_starts():
    result = CliRunner().invoke(
        serve_main,
        ["up", "--population", str(plain_embedded()), "--kv-cache-memory-bytes", "1M", "--max-model-len", "1024"],
    )
    assert result.exit_code == 1, result.output
    assert "--max-model-len 1024 needs a KV cache" in result.output and "Traceback" not in result.output
    bad = CliRunner().invoke(serve_main, ["up", "--population", str(plain_embedded()), "--kv-cache-memory-bytes", "x"])
    assert bad.exit_code == 2 and "a size in bytes" in bad.output
