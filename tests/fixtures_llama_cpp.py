"""llama.cpp's own HF -> GGUF converter, the reference for the GGUF architectures transformers cannot
read (olmo2, gptneox, smollm3): a tiny random HF model, converted by it, must give HF's logits.

Source: the PyPI sdist ``llama-cpp-python==0.3.36`` (76.6 MB, SHA-256 pinned below) vendors llama.cpp.
It is fetched once with ``pip download --no-deps --no-binary :all:`` (the package registry only; pip
prepares its metadata, which fetches its build backend, but compiles nothing), checked, and only the
converter (``convert_hf_to_gguf.py``, its ``conversion/`` package, its own ``gguf-py``, the licence;
about 2 MB) is unpacked into ``$JAXCIRCUITS_TEST_ASSETS/llama.cpp-converter-0.3.36``. ``install.sh
test`` prefetches it (``python -m tests.fixtures_llama_cpp``); a test that needs it and cannot fetch
it skips, saying so.

`convert` runs the converter in a subprocess (its own gguf-py first on sys.path, as the script does)
as shipped, with three offline stand-ins that leave the tensors and the model metadata as it writes
them: the tokenizer's pre-tokenizer, which it identifies by hashing a known tokenizer's output (the
tiny test vocabulary has no entry), is named 'gpt-2'; Llama-derived models (SmolLM3) skip its
sentencepiece attempt for the same byte-level vocabulary; config.json is read as written (its own
fallback when transformers' AutoConfig fails: transformers 5's AutoConfig drops GPT-NeoX's
``rotary_pct``, which the converter reads).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.fixtures_tokenizers import _build_once, _run, assets_dir

PACKAGE = "llama-cpp-python==0.3.36"
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# what is unpacked from the sdist's vendor/llama.cpp/: files and folders
MEMBERS = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/gguf/")
_RUN = """
import json, runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root, root + "/gguf-py"]
from conversion import base, llama
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
llama.LlamaModel.set_vocab = base.TextModel._set_vocab_gpt2
read = lambda d, is_mistral_format=False: json.loads((d / "config.json").read_text())
base.ModelBase.load_hparams = staticmethod(read)
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def converter() -> Path:
    """The unpacked converter's directory (fetched and checked first when absent; the test skips, with
    the pip command's error, when it cannot be fetched)."""

    def build(tmp: Path) -> None:
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(tmp),
              PACKAGE], f"llama.cpp's converter ({PACKAGE} sdist)")
        sdist = tmp / SDIST
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SHA256:
            raise AssertionError(f"{sdist.name} has sha256 {digest}, expected {SHA256}")
        prefix = f"{SDIST[:-len('.tar.gz')]}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(MEMBERS)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members, filter="data")
        sdist.unlink()

    return _build_once(assets_dir() / "llama.cpp-converter-0.3.36", build)


def tiny_tokenizer(path: Path) -> None:
    """Save a byte-level BPE tokenizer (printable ASCII, 'Ġ' for the space, the merge 'a b': 96 ids)
    to HF model directory `path`: the converter needs one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {**{chr(i): i - 33 for i in range(33, 127)}, "Ġ": 94, "ab": 95}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(path))


def convert(model_dir: Path, out: Path) -> None:
    """Write HF model directory `model_dir` (config.json, safetensors, a tokenizer) as F32 GGUF file
    `out` with llama.cpp's converter (`converter()`); RuntimeError with its output's tail on failure."""
    cmd = [sys.executable, "-c", _RUN, str(converter()), str(model_dir), "--outfile", str(out), "--outtype", "f32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {model_dir}: {proc.stderr[-2000:]}")


if __name__ == "__main__":
    print(converter())
