"""The trainer's engine: a synchronous vLLM `LLM` over one population, for batch work (evaluation, self-play).

One `generate` call puts every (prompt, member) pair into one multi-LoRA batch, so N members x k
chains cost about one batch. The server's engines are in `ensemble_serve.engine`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ensemble_serve.shared.adapters import AdapterRegistry
from ensemble_serve.shared.engine_config import EngineConfig, engine_kwargs, no_vllm
from ensemble_serve.shared.population import Population

if TYPE_CHECKING:  # pragma: no cover
    from vllm import LLM, SamplingParams


@dataclass(frozen=True)
class Generation:
    """One finished chain: the text, its token count and why it stopped."""

    member: str | None
    text: str
    tokens: int
    finish_reason: str | None


class OfflineEngine:
    """A synchronous vLLM engine over one population, for batch work (evaluation, self-play).

    Every member is a `LoRARequest`; `generate` puts all requests, whatever their
    adapters, into one `LLM.generate` call so vLLM batches them in the same steps.
    """

    def __init__(self, population: Population, cfg: EngineConfig | None = None, snapshot_root: Path | None = None):
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        try:
            from vllm import LLM
        except ModuleNotFoundError as e:
            raise no_vllm(e) from None

        self.population = population
        self.cfg = cfg or EngineConfig()
        # with snapshot_root, vLLM loads private copies: the population may change under a long-lived engine
        self.registry = AdapterRegistry(snapshot_root=snapshot_root)
        self.registry.sync(population)
        self.llm: LLM = LLM(**engine_kwargs(population, self.cfg))
        self.tokenizer = self.llm.get_tokenizer()

    def sync(self, population: Population) -> None:
        """Serve exactly `population`'s members (new content gets a fresh LoRA id; see `AdapterRegistry`)."""
        self.registry.sync(population)

    def take_events(self) -> list[dict]:
        """Faults met since the last call: none in process (the remote engine reports its servers')."""
        return []

    def chat_prompt(self, user_message: str) -> str:
        """The base model's chat template applied to one user turn."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
        )

    def generate(
        self,
        prompts: Sequence[str],
        members: Sequence[str | None],
        params: SamplingParams | Sequence[SamplingParams],
        progress: bool = False,
    ) -> list[list[Generation]]:
        """Generate for each (prompt, member) pair in one multi-LoRA batch.

        `members[i]` is a member name, or None for the base model. Returns, for each
        pair, its `n` completions.
        """
        if len(prompts) != len(members):
            raise ValueError(f"{len(prompts)} prompts but {len(members)} members")
        loras = [None if m is None else self.registry.get(m) for m in members]
        outputs = self.llm.generate(list(prompts), params, lora_request=loras, use_tqdm=progress)
        return [
            [Generation(m, c.text, len(c.token_ids), c.finish_reason) for c in out.outputs]
            for m, out in zip(members, outputs)
        ]
