"""On-disk cache of converted params (orbax-checkpoint), so a second load of the same source is fast.

An entry is ``$JAXCIRCUITS_CACHE/params/<key>/`` (default ``~/.cache/jaxcircuits``) holding the params
(orbax PyTree of numpy arrays) and the `ModelConfig` (JSON). The key hashes the source's path, the size and
mtime of each file it consists of, the dtype, `FORMAT_VERSION` and the `ModelConfig` field names,
so an edited source, a new dtype or a changed config schema never hits a stale entry.
Orbax writes to a temporary directory and renames it when the write is complete, so an
interrupted write never appears under the key; then the entry's checksum goes to ``<key>.sha256``
(`storage.write_sidecar`). A hit is verified against it first, so an entry whose bytes changed
after the write (even by a same-size edit) is never served: an entry that does not match its
checksum, fails to restore or fails to validate (structure, shapes, dtype) is deleted and rebuilt,
with a logged warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
from typing import Callable, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcircuits import logs, storage  # logs: orbax's INFO lines and warnings hidden by default
from jaxcircuits.models.config import ModelConfig, RopeConfig
from jaxcircuits.models.params import Params, check_params

FORMAT_VERSION = 2  # bump whenever a loader's output for the same file changes (2: tied config + own lm_head)
_CHUNK_BYTES = 64 * 2**20
Loader = Callable[[str, object], Tuple[ModelConfig, Params]]
_log = logging.getLogger(__name__)


def cache_dir() -> str:
    """``$JAXCIRCUITS_CACHE`` or ``~/.cache/jaxcircuits``."""
    return os.environ.get("JAXCIRCUITS_CACHE") or os.path.expanduser("~/.cache/jaxcircuits")


def _files(source: str):
    """The files `source` consists of: itself, or the regular files directly inside a directory."""
    if os.path.isdir(source):
        return sorted(os.path.join(source, n) for n in os.listdir(source)
                      if os.path.isfile(os.path.join(source, n)))
    return [source]


def cache_key(source: str, dtype) -> str:
    """Hex key of (source path, each file's name/size/mtime, dtype, format version, config schema)."""
    source = os.path.realpath(source)
    stats = [(os.path.basename(f), (st := os.stat(f)).st_size, st.st_mtime_ns) for f in _files(source)]
    schema = [f.name for c in (ModelConfig, RopeConfig) for f in dataclasses.fields(c)]
    blob = json.dumps([source, stats, np.dtype(dtype).name, FORMAT_VERSION, schema])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def config_to_json(cfg: ModelConfig) -> dict:
    """`ModelConfig` -> JSON-able dict (inverse: `config_from_json`)."""
    return dataclasses.asdict(cfg)


def config_from_json(d: dict) -> ModelConfig:
    """Inverse of `config_to_json` (JSON lists back to the tuples of per-layer fields, so the config hashes)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return ModelConfig(**{**fields, **{k: RopeConfig(**d[k]) if d.get(k) else None for k in ("rope", "local_rope")}})


def _checkpointer() -> ocp.Checkpointer:
    """Params as uncompressed numpy arrays in plain zarr (no OCDBT, which buffers a whole write in
    memory), written without orbax's defensive host copy (the save is synchronous and nothing
    mutates the arrays meanwhile), so writing and reading add little to peak memory."""
    numpy_only = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    params = ocp.PyTreeCheckpointHandler(type_handler_registry=numpy_only, use_compression=False,
                                         use_ocdbt=False, save_concurrent_gb=1, restore_concurrent_gb=1)
    config = ocp.JsonCheckpointHandler()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for name, handler, args in (("params", params, (ocp.args.PyTreeSave, ocp.args.PyTreeRestore)),
                                ("config", config, (ocp.args.JsonSave, ocp.args.JsonRestore))):
        for arg in args:
            registry.add(name, arg, handler)
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


def _restore(entry: str, dtype) -> Tuple[ModelConfig, Params]:
    """The entry's (config, numpy params); raises if it is absent, does not match its checksum, or
    fails to restore or to validate."""
    storage.verify(entry)
    with _checkpointer() as ckpt:
        got = ckpt.restore(entry, args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), params=ocp.args.PyTreeRestore()))
    cfg, params = config_from_json(got["config"]), got["params"]
    check_params(params, cfg)
    bad = [str(x.dtype) for x in jax.tree.leaves(params)
           if not isinstance(x, np.ndarray) or x.dtype != np.dtype(dtype)]
    if bad:
        raise ValueError(f"cached leaves have dtype(s) {sorted(set(bad))}, expected {np.dtype(dtype)}")
    return cfg, params


def _save(entry: str, cfg: ModelConfig, params: Params) -> None:
    """Write the entry atomically (orbax: temp dir + rename), clearing any interrupted write's temp dir."""
    parent, name = os.path.split(entry)
    for stale in os.listdir(parent):
        if stale.startswith(name + ocp.utils.TMP_DIR_SUFFIX):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    # 64 MiB chunks: a restore streams chunk by chunk instead of buffering whole leaves
    # (peak ~1.2x instead of ~1.4x the params on a 1B model).
    chunked = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES), params)
    with _checkpointer() as ckpt:
        ckpt.save(entry, args=ocp.args.Composite(config=ocp.args.JsonSave(config_to_json(cfg)),
                                                 params=ocp.args.PyTreeSave(params, save_args=chunked)))


def cached_load(source: str, dtype, loader: Loader) -> Tuple[ModelConfig, Params]:
    """`loader(source, dtype)`, memoised on disk under `cache_key(source, dtype)`.

    Returns (config, numpy params). On a miss, ``<entry>.lock`` serialises converters of the same
    entry across processes (the others wait, then read its result); under it, a damaged entry is
    deleted, with a warning, and rebuilt, under a progress bar (`logs.progress`). A cache write
    failure is logged and the loaded params returned.
    """
    entry = os.path.join(cache_dir(), "params", cache_key(source, dtype))
    if os.path.isdir(entry):
        with contextlib.suppress(Exception):  # a writer may be finishing it: decided under the lock
            return _restore(entry, dtype)
    os.makedirs(os.path.dirname(entry), exist_ok=True)
    with open(entry + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(entry) or os.path.exists(entry + storage.SIDECAR):
            try:
                return _restore(entry, dtype)
            except Exception as e:  # any damage, whatever orbax/tensorstore raise: rebuild
                _log.warning("params cache entry %s is damaged or invalid (%s); rebuilding it", entry, e)
                with contextlib.suppress(OSError):  # what cannot be deleted fails the write below, logged
                    storage.discard(entry)
        with logs.progress(total=2, desc=f"converting {os.path.basename(source)}", unit="step") as bar:
            bar.set_postfix_str("reading")
            cfg, params = loader(source, dtype)
            bar.set_postfix_str("writing the params cache")
            bar.update()
            try:
                _save(entry, cfg, params)
                storage.write_sidecar(entry)
            except Exception as e:  # the cache is an optimisation: never fail a load because of it
                _log.warning("could not write params cache entry %s: %r", entry, e)
            bar.update()
    return cfg, params
