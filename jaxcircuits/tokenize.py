"""Tokenizers: a thin wrapper over Hugging Face ``transformers`` tokenizers, without torch.

`load_tokenizer` takes a local HF tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``)
or a ``.gguf`` file whose metadata embeds the tokenizer. Every tokenizer is loaded as HF's
``TokenizersBackend`` (``PreTrainedTokenizerFast``), i.e. ``tokenizer.json`` as serialized, not through
``AutoTokenizer``, which resolves the model config and so imports torch.

A GGUF tokenizer is converted once, by HF's converter in a child interpreter (with a torch-free
metadata reader, see `_CONVERT_GGUF`), and saved (``save_pretrained``) under ``$JAXCIRCUITS_CACHE`` (default ``~/.cache/jaxcircuits``)
``/tokenizers/<stem>-<key>``, key = hash of the file's path, size and mtime and the transformers
version; later loads read that directory (~0.2 s instead of ~5 s). Its checksum is kept in
``<stem>-<key>.sha256`` (`storage.write_sidecar`) and verified on every load: a damaged directory
is converted again, with a logged warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from jaxcircuits import storage

_log = logging.getLogger(__name__)

# Runs in a child interpreter. transformers converts a GGUF vocabulary with its own converter, but
# reads the metadata through a module that imports torch (for tensors). jaxcircuits never needs
# torch, so the child first registers a metadata reader with the same contract built on `gguf`.
_CONVERT_GGUF = """
import os, sys, types
import gguf


def read_gguf_metadata(path, string_arrays=()):
    reader = gguf.GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        strings = field.types[0] == gguf.GGUFValueType.ARRAY and field.types[-1] == gguf.GGUFValueType.STRING
        meta[key] = len(field.data) if strings and key not in string_arrays else field.contents()
    return meta, tuple(t.name for t in reader.tensors)


reader = types.ModuleType("transformers.integrations.gguf.reader")
reader.read_gguf_metadata = read_gguf_metadata
sys.modules[reader.__name__] = reader
from transformers import PreTrainedTokenizerFast
src, out = sys.argv[1:]
tok = PreTrainedTokenizerFast.from_pretrained(
    os.path.dirname(src), gguf_file=os.path.basename(src), local_files_only=True)
tok.save_pretrained(out)
"""


class Tokenizer:
    """An HF fast tokenizer (`hf`) with the few operations jaxcircuits needs; ids are plain ints."""

    def __init__(self, hf: Any, source: str):
        self.hf = hf
        self.source = source

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        """The pad id, falling back to eos when the tokenizer defines no pad token."""
        pad = self.hf.pad_token_id
        return self.eos_token_id if pad is None else pad

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (HF ``len(tokenizer)``)."""
        return len(self.hf)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (added tokens included), or None if absent."""
        return self.hf.backend_tokenizer.token_to_id(token)

    def token_str(self, token_id: int) -> str:
        """The text of one token, ``decode([id])`` (its vocabulary piece: ``hf.convert_ids_to_tokens``)."""
        return self.decode([token_id])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`, exactly as HF ``tokenizer(text)["input_ids"]``."""
        return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat rendered as text by the tokenizer's own template (HF ``tokenize=False``)."""
        if self.hf.chat_template is None:
            raise ValueError(f"tokenizer {self.source} has no chat template")
        return self.hf.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def pad(self, seqs: Sequence[Sequence[int]], pad_side: str = "left") -> tuple[np.ndarray, np.ndarray]:
        """Left-pad id lists to one length: (ids int32 [B, T], attention_mask int32 [B, T]), every
        sequence ending at the last column, the layout the whole library reads (so `pad_side` may only
        be 'left'). Raises ValueError naming the index of an empty sequence."""
        if pad_side != "left":
            raise ValueError(f"pad_side={pad_side!r} is not supported: jaxcircuits runs on left-padded "
                             "batches (every prompt ends at the last column); use 'left'")
        empty = [i for i, s in enumerate(seqs) if len(s) == 0]
        if empty:
            raise ValueError(f"prompt(s) at index {empty} have no tokens (empty text?); "
                             "every prompt needs at least one token")
        length = max((len(s) for s in seqs), default=0)
        if self.pad_token_id is None and any(len(s) < length for s in seqs):
            raise ValueError(f"tokenizer {self.source} has neither a pad nor an eos token to pad with")
        ids = np.full((len(seqs), length), self.pad_token_id or 0, np.int32)
        mask = np.zeros((len(seqs), length), np.int32)
        for row, seq in enumerate(seqs):
            ids[row, length - len(seq):] = seq
            mask[row, length - len(seq):] = 1
        return ids, mask

    def batch(
        self, texts: Sequence[str], add_special_tokens: bool = True, pad_side: str = "left"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode and left-pad `texts` (`pad`: every prompt ends at the last column, none may be empty)."""
        return self.pad([self.encode(t, add_special_tokens) for t in texts], pad_side)

    def answer_token_ids(self, answer: str, prompt: str = "") -> list[int]:
        """Ids of `answer` as a continuation of `prompt`: the tail of ``encode(prompt + answer)``.

        Both are encoded without special tokens (BOS does not change the tail). Merge-boundary
        caveat: BPE may merge the end of `prompt` with the start of `answer` (e.g. a prompt ending
        in a space before a word), so that ``prompt + answer`` no longer starts with the prompt's
        own ids; then there is no token-level continuation and this raises ValueError.
        """
        if not answer:
            raise ValueError("answer must be a non-empty string")
        head = self.encode(prompt, add_special_tokens=False)
        full = self.encode(prompt + answer, add_special_tokens=False)
        if full[: len(head)] != head:
            raise ValueError(
                f"the answer {answer!r} merges with the end of the prompt {prompt[-20:]!r}: the prompt's "
                f"last tokens {head[-3:]} become {full[max(len(head) - 3, 0):len(head)]} after appending it"
            )
        return full[len(head):]


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    root = cache_dir or os.environ.get("JAXCIRCUITS_CACHE") or "~/.cache/jaxcircuits"
    return Path(root).expanduser() / "tokenizers"


def _gguf_cache_key(path: Path) -> str:
    """``<stem>-<hash>`` of the real path, size, mtime and the transformers version."""
    st = path.stat()
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{importlib.metadata.version('transformers')}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _convert_gguf(path: Path, out: Path) -> None:
    """Save the GGUF's tokenizer as an HF directory, in a child interpreter (see `_CONVERT_GGUF`)."""
    proc = subprocess.run(  # cwd: an empty dir, so no local module shadows one the child imports
        [sys.executable, "-c", _CONVERT_GGUF, str(path.resolve()), str(out.resolve())],
        capture_output=True,
        text=True,
        cwd=out,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"could not read a tokenizer from {path}: {last}")


def _gguf_tokenizer_dir(path: Path, cache_dir: str | os.PathLike | None) -> Path:
    """The cached HF directory of a GGUF's tokenizer, verified against its checksum.

    A hit needs no lock (a read-only cache works). Otherwise ``<dir>.lock`` serialises converters of
    the same file (the others wait, then use its result); under it, a damaged directory is deleted,
    with a warning, and the tokenizer converted into a temporary directory renamed into place.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic bytes)")
    root = _cache_root(cache_dir)
    dest = root / _gguf_cache_key(path)
    with contextlib.suppress(storage.DamagedFileError, OSError):  # a writer may be finishing it
        storage.verify(str(dest))
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with open(f"{dest}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.exists():
            try:
                storage.verify(str(dest))
                return dest
            except storage.DamagedFileError as e:
                _log.warning("%s; converting the tokenizer of %s again", e, path)
        storage.discard(str(dest))
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=root))
        try:
            _convert_gguf(path, tmp)
            os.rename(tmp, dest)
            storage.write_sidecar(str(dest))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_tokenizer(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Load a tokenizer from an HF tokenizer directory (or its ``tokenizer.json``) or a ``.gguf`` file.

    `cache_dir` overrides ``$JAXCIRCUITS_CACHE`` for converted GGUF tokenizers.
    Raises FileNotFoundError when there is no such path or no ``tokenizer.json`` in the directory,
    ValueError when a file is neither ``tokenizer.json`` nor a GGUF holding a tokenizer.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        directory = _gguf_tokenizer_dir(path, cache_dir)
    elif path.is_file() and path.name == "tokenizer.json":
        directory = path.parent
    elif path.is_file():
        raise ValueError(f"{path} is neither a .gguf file nor a tokenizer.json")
    elif (path / "tokenizer.json").is_file():
        directory = path
    else:
        raise FileNotFoundError(
            f"no tokenizer.json in {path}; pass an HF tokenizer directory or the path of a .gguf file"
        )
    from transformers import PreTrainedTokenizerFast  # here: importing transformers takes ~1 s

    return Tokenizer(PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True), str(path))
