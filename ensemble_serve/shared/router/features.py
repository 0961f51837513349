"""Prompt features for the router, from the frozen base model: the same code in training and serving.

Only torch is imported at module level; transformers loads when :class:`RouterFeatures` is built.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from ensemble_serve.shared.router.model import RouterError

__all__ = ["RouterFeatures"]


class RouterFeatures:
    """Prompt features from the frozen base model, computed the same way in training and serving.

    The base is loaded once (float32, eval, no grad). Prompts are rendered as one user turn with
    the generation prompt, exactly what the members see, then batched with right padding so real
    tokens never attend to (or get positions shifted by) pads; pooling respects the attention mask,
    so a prompt's feature does not depend on what it is batched with.

    ``embedding_mean``: mean of the input embeddings of the prompt tokens.
    ``hidden_mean``: mean of the last hidden state, i.e. after the final norm (in Hugging Face
    decoders ``output_hidden_states=True``'s last entry equals this ``last_hidden_state``); it is
    taken from the decoder stack alone so the LM head is never computed.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        device: str = "cpu",
        batch_size: int = 32,
        max_length: int | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise RouterError(f"{self.model_dir}: base model folder not found")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        if self.tokenizer.pad_token_id is None:  # only a mask-respecting pad is needed; any token id works
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        # Over-long prompts keep their end: the generation prompt is what the model answers from.
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        self.model.to(self.device).eval().requires_grad_(False)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = max_length or limit
        # Fast tokenizers are not safe to call with per-call padding/truncation from several threads.
        self._lock = threading.Lock()

    def dim(self, feature: str) -> int:
        """Feature dimension D for ``feature``."""
        if feature == "embedding_mean":
            return int(self.model.get_input_embeddings().weight.shape[1])
        if feature == "hidden_mean":
            return int(self.model.config.get_text_config().hidden_size)
        raise RouterError(f"unknown router feature {feature!r}; known: embedding_mean, hidden_mean")

    def render(self, prompt: str) -> str:
        """The chat-templated text of one user turn with the generation prompt (raw text without a template)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def __call__(self, prompts: Sequence[str], feature: str) -> torch.Tensor:
        """Features ``[len(prompts), dim(feature)]`` (float32, on CPU)."""
        d = self.dim(feature)
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        texts = [self.render(p) for p in prompts]
        out: list[torch.Tensor] = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                out.append(self._pool(texts[i : i + self.batch_size], feature).cpu())
        return torch.cat(out) if out else torch.zeros(0, d)

    def _pool(self, texts: list[str], feature: str) -> torch.Tensor:
        # The rendered template already carries any BOS the model expects, so no special tokens are added.
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            add_special_tokens=False,
        )
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        if feature == "embedding_mean":
            states = self.model.get_input_embeddings()(ids)
        elif self.model.base_model is not self.model:
            states = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        else:  # no separate decoder stack to call: run the whole model and take the last hidden state
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            states = out.hidden_states[-1]
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
