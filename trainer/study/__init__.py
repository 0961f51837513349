"""Studies of a population: the factorial ablation (`ablate`), its statistics, and the evolve report's plots."""
