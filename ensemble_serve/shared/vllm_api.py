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


def check_server_urls(urls: tuple[str, ...]) -> tuple[str, ...]:
    """vLLM servers' base URLs as a config gives them: http(s) only, stripped (ValueError naming the others)."""
    bad = [u for u in urls if not u.strip().startswith(("http://", "https://"))]
    if bad:
        raise ValueError(f"remote servers must be http:// or https:// URLs, got {bad}")
    return tuple(u.strip() for u in urls)


def normalize_server_url(url: str) -> str:
    """A server's base URL without a trailing slash or `/v1` (users write both)."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def error_text(resp: Any) -> str:
    """The message of an httpx response from a vLLM server: its OpenAI error object's, FastAPI's detail, or the text."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if "message" in data:
            return str(data["message"])
        if "detail" in data:
            return str(data["detail"])
    return resp.text[:300]


def is_missing_route(resp: Any) -> bool:
    """FastAPI's own 404 (`{"detail": "Not Found"}`): the route is not there, unlike vLLM's error object."""
    if resp.status_code not in (404, 405):
        return False
    try:
        data = resp.json()
    except ValueError:
        return True
    return isinstance(data, dict) and "error" not in data
