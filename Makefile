# Two entry points, both starting from nothing: `make serve` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test test-fast embedded lint

install:
	bash scripts/install.sh

# Serve the embedded sandbox ensemble on 127.0.0.1:8000.
serve: install
	$(BIN)/ensemble-serve up

# The import boundaries (ARCHITECTURE.md), then the whole suite, end-to-end tests with the real vLLM engine included.
test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

# Unit tests only (no engine start).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Rebuild the embedded substrate and starting population, and record the members' held-out accuracy
# in the manifest (about 12 minutes on 2 cores).
embedded: install
	$(BIN)/ensemble-train substrate --config configs/substrate.yaml --out ensemble_serve/embedded/substrate
	$(BIN)/ensemble-train init --config configs/init.yaml --base ensemble_serve/embedded/substrate \
		--out ensemble_serve/embedded/population --base-name sandbox-substrate --overwrite
	$(BIN)/ensemble-train eval --config configs/eval.yaml --population ensemble_serve/embedded/population --update-manifest

lint: install
	$(BIN)/ruff check ensemble_serve trainer clients tests bench
	$(BIN)/lint-imports --no-cache
