"""vLLM's per-token log-probabilities in OpenAI's two layouts (chat `content`, and the legacy completion lists)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ensemble_serve.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


def chat_logprobs(token_text: Callable[[int], str], ids: Sequence[int], lps: Sequence[Any] | None) -> ChatLogprobs:
    """`lps[i]` maps token id -> Logprob (with its rank) for generated token `ids[i]`; rank 0 is the sampled one only."""
    content = []
    for tid, entry in zip(ids, lps or [None] * len(ids)):
        entry = entry or {}
        chosen = entry.get(tid)
        tops = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
        text = token_text(tid)
        content.append(
            TokenLogprob(
                token=text,
                logprob=chosen.logprob if chosen else float("-inf"),
                bytes=list(text.encode()),
                top_logprobs=[
                    TopLogprob(token=token_text(t), logprob=lp.logprob, bytes=list(token_text(t).encode()))
                    for t, lp in tops
                    if lp.rank and lp.rank > 0
                ],
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    token_text: Callable[[int], str], ids: Sequence[int], lps: Sequence[Any] | None, offset: int = 0
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    pos = offset
    for tid, entry in zip(ids, lps or [None] * len(ids)):
        entry = entry or {}
        text = token_text(tid)
        out.tokens.append(text)
        out.token_logprobs.append(entry[tid].logprob if tid in entry else None)
        out.top_logprobs.append(
            {token_text(t): lp.logprob for t, lp in entry.items() if lp.rank and lp.rank > 0} or None
        )
        out.text_offset.append(pos)
        pos += len(text)
    return out
