"""Code both halves use: the population directory (the contract), voting, vLLM setup, LoRA tensors, the router.

The trainer imports from `ensemble_serve` only what is in here (an import contract checks it): a change
here reaches evolution as well as serving.
"""
