"""Self-play sampling: every member's chains for a generation's problems, in one multi-LoRA vLLM batch.

Sample s of member m on problem i is seeded with ``derive_seed(seed, purpose, g, m, i)`` (vLLM
draws the `n` samples of one request from that seed), so a resumed generation samples the same
chains; the curriculum's probe passes its own `purpose`, so its chains are not the self-play's.
Answers are extracted with the run's answer mode as the chains come back.
"""

from __future__ import annotations

from collections.abc import Sequence

from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.voting import Candidate, candidate_from_text
from trainer.evolve.config import EvolveConfig
from trainer.evolve.seeds import derive_seed
from trainer.tasks.sandbox import Problem


def self_play(
    engine: OfflineEngine,
    members: Sequence[str],
    problems: Sequence[Problem],
    cfg: EvolveConfig,
    generation: int,
    progress: bool = False,
    purpose: str = "sample",
) -> dict[str, list[list[Candidate]]]:
    """Every member x problem x sample in one multi-LoRA batch; returns the candidates (answers extracted).

    Sample seeds derive from (seed, `purpose`, generation, member, problem): the curriculum's probe
    uses its own purpose, so its chains are not the self-play's."""
    from vllm import SamplingParams

    prompts, owners, params, index = [], [], [], []
    chat = [engine.chat_prompt(p.prompt) for p in problems]
    for m in members:
        for i in range(len(problems)):
            prompts.append(chat[i])
            owners.append(m)
            params.append(
                SamplingParams(
                    n=cfg.samples_per_member,
                    temperature=cfg.temperature,
                    max_tokens=cfg.max_tokens,
                    seed=derive_seed(cfg.seed, purpose, generation, m, i),
                )
            )
            index.append((m, i))
    outputs = engine.generate(prompts, owners, params, progress=progress)
    cands: dict[str, list[list[Candidate]]] = {m: [[] for _ in problems] for m in members}
    for (m, i), gens in zip(index, outputs):
        cands[m][i] = [
            candidate_from_text(m, s, g.text, g.tokens, cfg.answer, finished=g.finish_reason != "length")
            for s, g in enumerate(gens)
        ]
    return cands
