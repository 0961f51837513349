# Two entry points, both starting from nothing: `make serve` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test test-fast realshape embedded embedded-population embedded-real lint

install:
	bash scripts/install.sh

# Serve the embedded ensemble (nine SmolLM2-135M-Instruct adapters) on 127.0.0.1:8000; the first start
# converts the packaged model into ~/.cache/ensemble-serve/ (about 20 s). The toy: `ensemble-serve up --embedded sandbox`.
serve: install
	$(BIN)/ensemble-serve up

# The import boundaries (ARCHITECTURE.md), then the whole suite, end-to-end tests with the real vLLM engine
# included; the 40 slowest steps are listed at the end.
test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q --durations=40

# The fast tier: no engine, no Ray cluster, no subprocess (tests/conftest.py fails a test that starts one).
# One tier alone: $(BIN)/python -m pytest -m engine (or evolve, packaging, realshape).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Build the real-shaped test model (a Qwen2 with a byte-level BPE tokenizer, ChatML template and three plain
# PEFT adapters; trainer/testing/realshape.py) into ~/.cache/ensemble-serve/: about 90 s on 2 cores, then
# reused by every checkout on this machine while its cache key holds, and copied to tests/assets/, where a
# clean clone's test run finds it (tests/test_realshape_model.py fails while that copy is of an older key).
realshape: install
	$(BIN)/python -m trainer.testing.realshape --ship tests/assets

# Rebuild the embedded default (about 35 minutes on 2 cores): the substrate (levels 1-2 of every family,
# with and without a system message), 12 specialists (two per family, on its levels 3-4), their held-out
# accuracy in the manifest, the sigmoid_floor router, the reliability table, and the request defaults
# that bench/specialists.py measured best (configs/ensemble-defaults.json).
EMBEDDED := ensemble_serve/embedded
embedded: install
	$(BIN)/ensemble-train substrate --config configs/substrate.yaml --out $(EMBEDDED)/substrate
	$(BIN)/ensemble-train init --config configs/init.yaml --base $(EMBEDDED)/substrate \
		--out $(EMBEDDED)/population --base-name sandbox-substrate --overwrite
	$(MAKE) embedded-population

# The steps after training the members (also after replacing them by hand).
embedded-population: install
	$(BIN)/ensemble-train eval --config configs/eval.yaml --population $(EMBEDDED)/population --update-manifest
	$(BIN)/ensemble-train router --config configs/router.yaml --population $(EMBEDDED)/population
	$(BIN)/ensemble-train calibrate --population $(EMBEDDED)/population --labels ground_truth
	$(BIN)/ensemble-serve defaults $(EMBEDDED)/population --set "$$(cat configs/ensemble-defaults.json)"

# Rebuild the embedded real ensemble (about 65 minutes on 2 cores; configs/real/ says why each number):
# natural-task data (train, and a dev split for evaluation and routing), a shared seed and 8 specialists
# branched from it (configs/real/init.yaml), the two compute-matched generalists bench/real.py compares
# them with, then the shipped copy.
REAL_RUNS := runs/real
REAL_BASE = $$($(BIN)/ensemble-train base --embedded-real --path-only)
embedded-real: install
	mkdir -p $(REAL_RUNS)
	$(BIN)/ensemble-train tasks --kind natural --split train -n 3200 --seed 0 --out $(REAL_RUNS)/train.jsonl
	$(BIN)/ensemble-train tasks --kind natural --split heldout -n 128 --seed dev --out $(REAL_RUNS)/dev.jsonl
	$(BIN)/ensemble-train init --config configs/real/init.yaml --base "$(REAL_BASE)" \
		--data $(REAL_RUNS)/train.jsonl --out $(REAL_RUNS)/population --overwrite
	$(BIN)/ensemble-train init --config configs/real/generalist.yaml --base "$(REAL_BASE)" \
		--data $(REAL_RUNS)/train.jsonl --out $(REAL_RUNS)/generalist-r8 --overwrite
	$(BIN)/ensemble-train init --config configs/real/generalist.yaml --base "$(REAL_BASE)" --ranks 64 \
		--data $(REAL_RUNS)/train.jsonl --out $(REAL_RUNS)/generalist-r64 --overwrite
	$(MAKE) embedded-real-population

# The steps after training the real members: dev accuracy, router, request defaults, the shipped copy.
embedded-real-population: install
	$(BIN)/ensemble-train eval --config configs/real/eval.yaml --population $(REAL_RUNS)/population --update-manifest
	$(BIN)/ensemble-train router --config configs/real/router.yaml --population $(REAL_RUNS)/population
	$(BIN)/ensemble-serve defaults $(REAL_RUNS)/population --set "$$(cat configs/real/ensemble-defaults.json)"
	$(BIN)/ensemble-train export --population $(REAL_RUNS)/population --out $(EMBEDDED)/real --overwrite

lint: install
	$(BIN)/ruff check ensemble_serve trainer clients tests bench
	$(BIN)/lint-imports --no-cache
