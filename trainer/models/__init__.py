"""The models the trainer builds: the substrate (a base trained from scratch), the starting population, the mixture LM."""
