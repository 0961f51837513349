"""The offline evolve command: population self-play, scoring, training and the evolutionary step (see `loop`)."""
