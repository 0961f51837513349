"""Mix members' LoRA updates into one prompt-specific adapter.

Fanning a request out to k members costs k passes of the base model. When the router's gates are
meant as a *mixture* instead of a vote, the same prompt can be answered by one pass through one
adapter whose update is the gate-weighted sum of the members' updates:

    dW = sum_i w_i * dW_i,    dW_i = s_i * B_i @ A_i,    sum_i w_i = 1

- :mod:`.mixing`: the math. ``exact`` rank concatenation (`mix_exact`) or an SVD cut to a chosen
  rank (`mix_truncated`), never forming a dense (out x in) matrix; `mix` chooses between them
  under vLLM's ``max_lora_rank``, `mixture_cost` reports the rank and cost it would produce.
- :mod:`.cache`: `MixtureCache` keeps a bounded set of mixed adapter folders on disk so a repeated
  route is mixed once.

The output is a standard PEFT adapter (same base model, target modules and module prefixes as the
members), so vLLM loads it like any member; its rank is not padded up to a vLLM rank, since vLLM
accepts any r up to ``max_lora_rank``.
"""

from ensemble_serve.shared.mixture.cache import DEFAULT_DECIMALS, MIX_NAME_PREFIX, MixtureCache
from ensemble_serve.shared.mixture.mixing import (
    MixtureError,
    Mode,
    mix,
    mix_exact,
    mix_truncated,
    mixture_cost,
    truncation_error,
    vllm_rank,
)

__all__ = [
    "DEFAULT_DECIMALS",
    "MIX_NAME_PREFIX",
    "MixtureCache",
    "MixtureError",
    "Mode",
    "mix",
    "mix_exact",
    "mix_truncated",
    "mixture_cost",
    "truncation_error",
    "vllm_rank",
]
