"""Tokenizers: a thin wrapper over Hugging Face ``transformers`` tokenizers, without torch.

`load_tokenizer` takes a local HF tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``)
or a ``.gguf`` file whose metadata embeds the tokenizer. Every tokenizer is loaded as HF's
``TokenizersBackend`` (``PreTrainedTokenizerFast``), i.e. ``tokenizer.json`` as serialized, not through
``AutoTokenizer``, which resolves the model config and so imports torch.

A GGUF tokenizer is converted once, from the vocabulary, merges and special tokens in its metadata
(`_gguf_hf_tokenizer`: the `gguf` reader and public `tokenizers` / `transformers` classes, built as
transformers builds it, whose own GGUF path imports torch), and saved (``save_pretrained``) under
``$JAXCIRCUITS_CACHE`` (default ``~/.cache/jaxcircuits``) ``/tokenizers/<stem>-<key>``, key = hash
of the file's path, size and mtime, `_CONVERTER` and the transformers version; later loads read
that directory. Its checksum is kept in ``<stem>-<key>.sha256`` (`storage.write_sidecar`) and
verified on every load: a damaged directory is converted again, with a logged warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from jaxcircuits import logs, storage

_log = logging.getLogger(__name__)

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) of byte-level vocabularies whose merges were
# learned on Llama 3's split (the others split as GPT-2 does), and that split, as transformers has them.
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL, _USER_DEFINED = 3, 4                                   # llama.cpp token types
_CONVERTER = 2                # bump when `_gguf_hf_tokenizer`'s output changes (1: transformers' own)


@functools.cache
def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character map of byte-level vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


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
        attn_mask = np.zeros((len(seqs), length), np.int32)
        for row, seq in enumerate(seqs):
            ids[row, length - len(seq):] = seq
            attn_mask[row, length - len(seq):] = 1
        return ids, attn_mask

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
    """``<stem>-<hash>`` of the real path, size, mtime, the converter and the transformers version."""
    st = path.stat()
    ident = (f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{_CONVERTER}\0"
             f"{importlib.metadata.version('transformers')}")
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list:
    """A sentencepiece vocabulary's BPE merges, best first: every split of a token into two tokens,
    ranked by the merged token's score (as transformers' `generate_merges` ranks them)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges += [(l, r, score) for l, r in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(l, r) for l, r, _ in merges]


def _gguf_hf_tokenizer(path: Path):
    """The HF fast tokenizer a GGUF's metadata describes, built with public APIs only: the `gguf`
    reader, `tokenizers`, and transformers' GPT2Tokenizer / LlamaTokenizer / PreTrainedTokenizerFast,
    the way transformers builds it itself (byte-level 'gpt2' and sentencepiece 'llama' vocabularies:
    the Llama family, SmolLM2, TinyLlama). ValueError when it holds no tokenizer we can build."""
    import gguf
    from tokenizers import AddedToken, Regex, pre_tokenizers
    from transformers import GPT2Tokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    fields = gguf.GGUFReader(str(path)).fields
    meta = {k[len("tokenizer."):]: f.contents() for k, f in fields.items() if k.startswith("tokenizer.")}
    kind, tokens = meta.get("ggml.model"), meta.get("ggml.tokens")
    if kind not in ("gpt2", "llama") or not tokens:
        raise ValueError(f"no byte-level ('gpt2') or sentencepiece ('llama') vocabulary in its metadata "
                         f"(tokenizer.ggml.model = {kind!r})")
    if "ggml.merges" in meta:
        merges = [tuple(m.split(" ")) for m in meta["ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, meta["ggml.scores"])
    alphabet = _bytes_to_unicode()
    spelled = set(alphabet.values())
    if kind == "gpt2":
        vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode()): i for i, t in enumerate(tokens)}
        base = GPT2Tokenizer(vocab=vocab, merges=merges)
    else:
        base = LlamaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    types = meta.get("ggml.token_type") or ()
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == _CONTROL and (kind != "gpt2" or set(t) <= spelled)]   # else a mislabel: skipped
    if control:
        base.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    known = base.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED and t in known]
    if user:
        base.add_tokens(user)
    backend = base.backend_tokenizer
    if kind == "gpt2" and meta.get("ggml.pre") in _LLAMA3_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    specials = {name: tokens[meta[key]] if key in meta else None for name, key in (
        ("bos_token", "ggml.bos_token_id"), ("eos_token", "ggml.eos_token_id"),
        ("unk_token", "ggml.unknown_token_id"), ("pad_token", "ggml.padding_token_id"))}
    config = {k: meta[f"ggml.{k}"] for k in ("add_bos_token", "add_eos_token") if f"ggml.{k}" in meta}
    if kind == "llama":
        config.setdefault("add_bos_token", True)          # llama.cpp adds BOS to sentencepiece by default
    if "chat_template" in meta:
        config["chat_template"] = meta["chat_template"]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials, **config)


def _convert_gguf(path: Path, out: Path) -> None:
    """Save the GGUF's tokenizer (`_gguf_hf_tokenizer`) as an HF directory `out`."""
    try:
        tok = _gguf_hf_tokenizer(path)
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"could not read a tokenizer from {path}: {e}") from None
    tok.save_pretrained(str(out))


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
            with logs.progress(1, f"converting the tokenizer of {path.name}", "step") as bar:
                _convert_gguf(path, tmp)
                bar.update()
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
