"""ensemble-serve trainer: sandbox, substrate, population and evolution (offline half)."""
