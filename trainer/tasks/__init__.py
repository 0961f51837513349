"""Where problems come from: the sandbox's task families, JSONL datasets, the character tokenizer."""
