"""Test models the trainer builds from nothing, shared by the tests and the benchmarks.

- `realshape`: the real-shaped Qwen2 test model (byte-level BPE, ChatML, three plain PEFT adapters),
  built once into a cache outside the repository and reused while its cache key holds.

Nothing else in the trainer imports this package (`lint-imports` checks it).
"""
