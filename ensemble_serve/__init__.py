"""ensemble-serve: serve a population of LoRA adapters as one model (online half)."""

__version__ = "0.1.0"
