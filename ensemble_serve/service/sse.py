"""Server-sent events as OpenAI streams them: `data: {json}` per chunk, then `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: Any) -> str:
    """One event: a response model (dumped without nulls) or a plain JSON value."""
    body = payload.model_dump_json(exclude_none=True) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {body}\n\n"
