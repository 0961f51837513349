"""A request's prompts as token ids, and its sampling parameters for the engine.

Chat messages go through the base model's chat template; text prompts are tokenized with the
model's special tokens; token-id prompts are checked against the vocabulary. Callers run these off
the event loop (templates and tokenizers cost CPU on long prompts).
"""

from __future__ import annotations

from typing import Any

from ensemble_serve.errors import BadRequestError
from ensemble_serve.protocol import ChatCompletionRequest, CompletionRequest, chat_text, sampling_kwargs


def chat_prompt_ids(tokenizer: Any, req: ChatCompletionRequest) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(chat_text(req.messages), tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template that refuses the conversation (e.g. roles out of order)
        raise BadRequestError(f"the chat template refused these messages: {e}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def completion_prompt_ids(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    """A text prompt tokenized, or a token-id prompt checked against the vocabulary."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    vocab = len(tokenizer)
    bad = next((t for t in prompt if t >= vocab), None)
    if bad is not None:
        raise BadRequestError(
            f"token id {bad} is out of range: the model's vocabulary has {vocab} tokens", param="prompt"
        )
    return list(prompt)


def completion_prompts(tokenizer: Any, prompts: list[str | list[int]]) -> tuple[list[list[int]], list[str]]:
    """Token ids of every prompt, and the text of each (what the router reads)."""
    ids = [completion_prompt_ids(tokenizer, p) for p in prompts]
    texts = [p if isinstance(p, str) else tokenizer.decode(i, skip_special_tokens=True) for p, i in zip(prompts, ids)]
    return ids, texts


def routing_text(req: ChatCompletionRequest) -> str:
    """The text the router sees for a chat: the last user message (the task)."""
    for m in reversed(chat_text(req.messages)):
        if m["role"] == "user":
            return m["content"]
    return chat_text(req.messages)[-1]["content"] if req.messages else ""


def sampling_params(
    req: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int], max_model_len: int, **overrides: Any
) -> Any:
    """`vllm.SamplingParams` for one prompt of `req`; what vLLM refuses is the client's 400."""
    from vllm import SamplingParams

    kw = sampling_kwargs(req, max_model_len=max_model_len, prompt_tokens=len(prompt_ids))
    kw.update(overrides)
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as e:
        raise BadRequestError(str(e)) from None
