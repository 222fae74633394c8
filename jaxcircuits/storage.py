"""Files the project writes and later reads: atomic, checksummed, one writer per directory.

- `write_atomic(path, write)`: `write(tmp)` fills a temporary file beside `path` (its name holds
  `TMP_MARK`), then its SHA-256 goes to the sidecar `path + ".sha256"` and the file is renamed into
  place, so `path` appears complete or not at all (a kill -9 or a full disk leaves only a
  temporary file, which readers never match and `remove_temps` deletes).
- `verify(path)` / `read_verified(path, read)`: the bytes must match the sidecar; otherwise, or
  when `read` fails on them, `DamagedFileError` names the file (callers rebuild or recompute it).
- `fingerprint(*trees)`: a short digest of what made a resumable artifact (arrays' shapes, dtypes
  and bytes; other leaves' text); each artifact stores it and is refused when read back by a run
  with another.
- `check_dir(path)`: the path is, or can be made, a writable directory (else an error naming the
  file in the way or the directory that cannot be written).
- `save_checkpoint` / `restore_checkpoint`: a resumable training state (any pytree of arrays), its
  growing history and the JSON meta of what made it, as orbax directories `step_<n>` (the newest
  two kept, each with a sidecar); restoring takes the newest intact one, skips damaged ones with a
  warning and refuses one whose meta differs (`methods.learned`, `dictionaries.train`).
- `DirLock(directory)`: an exclusive `fcntl.flock` on `directory/.lock`; a second process gets
  `LockedError` naming the holder's pid and host; the kernel drops the lock when its holder dies,
  so a stale lock from a killed process is taken over without a word. (flock is per machine: on
  storage shared by several hosts, let one process write.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from typing import Any, Callable, List, Optional, Tuple, TypeVar

import jax
import numpy as np

T = TypeVar("T")
_log = logging.getLogger(__name__)
TMP_MARK = ".tmp-"
SIDECAR = ".sha256"


class DamagedFileError(ValueError):
    """A file whose bytes do not match its checksum, or that cannot be parsed."""

    def __init__(self, path: str, why: str, advice: str = ""):
        super().__init__(f"{path} is damaged ({why})" + (f"; {advice}" if advice else ""))
        self.path, self.why = path, why


class LockedError(RuntimeError):
    """A directory already has a live writer."""


def fingerprint(*trees) -> str:
    """16 hex digits of SHA-256 over the structure of `trees` (containers, keys, None) and their
    leaves in order: each array's shape, dtype and bytes, each other leaf's repr (strings, numbers)."""
    leaves, treedef = jax.tree.flatten(trees)
    h = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            a = np.ascontiguousarray(np.asarray(leaf))
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.reshape(-1).view(np.uint8))
        else:
            h.update(repr(leaf).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file's bytes, or of a directory tree (relative paths and bytes, sorted;
    temporary files and sidecars excluded)."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                if TMP_MARK in name or name.endswith(SIDECAR):
                    continue
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, path).encode() + b"\0")
                h.update(sha256_of(full).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tmp_name(path: str) -> str:
    return f"{path}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_sidecar(path: str) -> str:
    """Record the checksum of file or directory `path` in its sidecar (atomically); returns it."""
    digest = sha256_of(path)
    tmp = _tmp_name(path + SIDECAR)
    with open(tmp, "w") as f:
        f.write(digest + "\n")
    os.replace(tmp, path + SIDECAR)
    return digest


def write_atomic(path: str, write: Callable[[str], None]) -> str:
    """Write `path` through `write(tmp_path)`, checksum it and rename it into place; returns the
    checksum. On any failure the temporary file is removed and `path` is untouched."""
    tmp = _tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_of(tmp)
        side_tmp = _tmp_name(path + SIDECAR)
        with open(side_tmp, "w") as f:
            f.write(digest + "\n")
        os.replace(side_tmp, path + SIDECAR)
        os.replace(tmp, path)
        return digest
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> str:
    """`write_atomic` of `obj` as indented, key-sorted JSON."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
    return write_atomic(path, write)


def verify(path: str, advice: str = "") -> None:
    """Raise DamagedFileError (with `advice` for the user) unless `path` (file or directory)
    matches its sidecar checksum."""
    side = path + SIDECAR
    if not os.path.exists(side):
        raise DamagedFileError(path, "no checksum file", advice)
    with open(side) as f:
        want = f.read().strip()
    got = sha256_of(path)
    if got != want:
        raise DamagedFileError(path, f"checksum {got[:12]}... != recorded {want[:12]}...", advice)


def read_verified(path: str, read: Callable[[str], T], advice: str = "") -> T:
    """`read(path)` after `verify(path, advice)`; a failure of `read` is a DamagedFileError too."""
    verify(path, advice)
    try:
        return read(path)
    except Exception as e:                               # noqa: BLE001 - any parse error means damage
        raise DamagedFileError(path, f"{type(e).__name__}: {e}", advice) from e


def discard(path: str) -> None:
    """Remove `path` and its sidecar, if present."""
    for p in (path, path + SIDECAR):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def remove_temps(directory: str) -> List[str]:
    """Delete temporary files left in `directory` by killed writers (call it holding the
    directory's lock); returns their names."""
    if not os.path.isdir(directory):
        return []
    stale = sorted(n for n in os.listdir(directory) if TMP_MARK in n)
    for n in stale:
        discard(os.path.join(directory, n))
    return stale


def check_dir(path: str) -> None:
    """NotADirectoryError naming the file in the way, or PermissionError naming the directory that
    cannot be written, unless `path` is, or can be made, a writable directory."""
    found = os.path.abspath(path)
    while not os.path.exists(found):
        found = os.path.dirname(found)
    if not os.path.isdir(found):
        raise NotADirectoryError(f"{path} cannot be a directory: {found} is a file")
    if not os.access(found, os.W_OK | os.X_OK):
        raise PermissionError(f"{found} is not writable")


class DirLock:
    """`with DirLock(directory):` one writer per directory (see the module doc)."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, ".lock")
        self.fd = None

    def __enter__(self) -> "DirLock":
        directory = os.path.dirname(self.path)
        check_dir(directory)
        os.makedirs(directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"{os.path.dirname(self.path)} is in use by another process ({holder}); "
                              "wait for it to finish or choose another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def maybe_lock(directory: Optional[str]):
    """`DirLock(directory)`, or a no-op context without a directory."""
    return DirLock(directory) if directory else contextlib.nullcontext()


# ---- training checkpoints ---------------------------------------------------------------------

_STEP_DIR = re.compile(r"^step_(\d+)$")
_ADVICE = "delete it (training resumes from the previous checkpoint) or choose another checkpoint_dir"


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def checkpoint_steps(directory: str) -> List[int]:
    """Checkpoint steps in `directory`, newest first."""
    if not os.path.isdir(directory):
        return []
    return sorted((int(m.group(1)) for n in os.listdir(directory) if (m := _STEP_DIR.match(n))), reverse=True)


def save_checkpoint(directory: str, step: int, state: Any, history: np.ndarray, meta: dict) -> None:
    """Write `directory/step_<step>` (orbax: temp dir + rename): the leaves of pytree `state`, the
    array `history` (any length) and `meta` (JSON, with the step); then its sidecar checksum; then
    keep only the newest two checkpoints."""
    import orbax.checkpoint as ocp
    path = os.path.join(os.path.abspath(directory), f"step_{step}")
    arrays = {"state": {f"{i:04d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))},
              "history": np.asarray(history)}
    discard(path)
    with _checkpointer() as ckpt:
        ckpt.save(path, args=ocp.args.Composite(arrays=ocp.args.PyTreeSave(arrays),
                                                meta=ocp.args.JsonSave({**meta, "step": step})))
    write_sidecar(path)
    for old in checkpoint_steps(directory)[2:]:
        discard(os.path.join(directory, f"step_{old}"))


def _read_checkpoint(path: str, template: Any) -> Tuple[dict, Any, np.ndarray]:
    import orbax.checkpoint as ocp
    with _checkpointer() as ckpt:
        got = ckpt.restore(path, args=ocp.args.Composite(arrays=ocp.args.PyTreeRestore(),
                                                         meta=ocp.args.JsonRestore()))
    leaves, treedef = jax.tree.flatten(template)
    saved = [np.asarray(got["arrays"]["state"][k]) for k in sorted(got["arrays"]["state"])]
    if [(a.shape, a.dtype) for a in saved] != [(np.shape(a), np.asarray(a).dtype) for a in leaves]:
        raise ValueError("saved state leaves do not match this run's shapes and dtypes")
    return got["meta"], jax.tree.unflatten(treedef, saved), np.asarray(got["arrays"]["history"])


def restore_checkpoint(directory: str, meta: dict, state: Any, history: np.ndarray) -> Tuple[int, Any, np.ndarray]:
    """(step, state, history) from the newest intact checkpoint of `directory` (leaves as numpy
    arrays in the structure, shapes and dtypes of `state`), else (0, state, history) unchanged. A
    damaged checkpoint is skipped with a warning; one written with other `meta` is a ValueError
    naming the first key that differs. Call it holding the directory's lock."""
    import orbax.checkpoint as ocp
    remove_temps(directory)
    for name in os.listdir(directory):                      # writes of a killed run (orbax's temp dirs)
        if ocp.utils.TMP_DIR_SUFFIX in name:
            discard(os.path.join(directory, name))
    for step in checkpoint_steps(directory):
        path = os.path.join(directory, f"step_{step}")
        try:
            got, restored, h = read_verified(path, lambda p: _read_checkpoint(p, state), _ADVICE)
        except DamagedFileError as e:
            _log.warning("skipping checkpoint: %s", e)
            continue
        for key, want in meta.items():
            if got.get(key) != want:
                raise ValueError(f"checkpoint {path} was written for {key}={got.get(key)}, this run has "
                                 f"{key}={want}; use another checkpoint_dir")
        return step, restored, h
    return 0, state, history
