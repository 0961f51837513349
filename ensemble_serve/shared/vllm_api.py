"""What a vLLM OpenAI server says about itself, read the same way by the server's remote mode and the trainer's.

`GET /v1/models` lists the base model (no `parent`) and the LoRA adapters it serves (their
`parent` is the base); `POST /tokenize` of `TOKENIZER_PROBE` tells whether its tokenizer is the
population's.
"""

from __future__ import annotations

from typing import Any

# Encoded here and by each server's /tokenize: a server whose tokenizer differs is refused.
TOKENIZER_PROBE = "ensemble-serve probe: add 478+365 = 843\n#### The quick brown fox, 0.5 * (2 - 3)!"


def tokenize_body(base: str) -> dict[str, Any]:
    """The body of `POST /tokenize` for the probe, without special tokens."""
    return {"model": base, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}


def read_model_list(payload: Any) -> tuple[str, str, int, frozenset[str]]:
    """(base model id, its `root` (the path or hub id it was loaded from), max_model_len, LoRA adapter ids).

    Raises KeyError, IndexError, TypeError or ValueError when `payload` is not vLLM's model list.
    """
    cards = payload["data"]
    bases = [c for c in cards if not c.get("parent")]
    loras = frozenset(str(c["id"]) for c in cards if c.get("parent"))
    base = bases[0]
    return str(base["id"]), str(base.get("root") or ""), int(base["max_model_len"]), loras
