"""Sweep directories under damage: stray temporary files, damaged or wrong chunks, damaged
results.npz and spec.json, another model's resume, two writers, a real kill -9 during a write."""

import os
import random
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from jaxcircuits import storage
from jaxcircuits.engine.sweep import load_results, run_sweep
from tests import sweep_worker

ROOT, WORKER = sweep_worker.ROOT, sweep_worker.CMD
CHUNK = "chunk_{:08d}.npz"


@pytest.fixture(scope="module")
def prob():
    return sweep_worker.problem()


def _sweep(prob, out, **kw):
    """The worker's sweep in this process: 70 members in 18 chunks of 4."""
    return run_sweep(*prob, str(out), chunk_size=4, shard=False, **kw)


@pytest.fixture(scope="module")
def ref(prob, tmp_path_factory):
    return _sweep(prob, tmp_path_factory.mktemp("ref") / "s")


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory):
    return sweep_worker.env(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def worker_ref(worker_env, tmp_path_factory):
    """An uninterrupted run of the worker process."""
    out = str(tmp_path_factory.mktemp("worker_ref") / "s")
    subprocess.run(WORKER + [out], cwd=ROOT, env=worker_env, check=True, timeout=300)
    return load_results(out)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def _assert_equal(res, ref):
    for k in ("ranks", "bitmask", "metric"):
        np.testing.assert_array_equal(getattr(res, k), getattr(ref, k), err_msg=k)


def _write_npz(path, **arrays):
    """A valid npz with a matching checksum sidecar: wrong contents, but no damage to the bytes."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    storage.write_atomic(str(path), write)


def test_stray_temp_file_is_ignored_and_deleted(prob, ref, tmp_path):
    """The issue's reproduction: results.npz and a chunk deleted, a temp file beside the chunks."""
    out, chunks = tmp_path / "s", tmp_path / "s" / "chunks"
    _sweep(prob, out)
    os.remove(out / "results.npz")
    os.remove(chunks / CHUNK.format(4))
    shutil.copy(chunks / CHUNK.format(3), chunks / "chunk_00000009.npz.tmp-99999.npz")
    _assert_equal(_sweep(prob, out), ref)
    assert not [n for n in os.listdir(chunks) if storage.TMP_MARK in n]
    _assert_equal(load_results(str(out)), ref)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "emptied", "no checksum"])
def test_damaged_chunk_is_named_and_recomputed(prob, ref, tmp_path, caplog, damage):
    out = tmp_path / "s"
    _sweep(prob, out)
    path = out / "chunks" / CHUNK.format(5)
    raw = path.read_bytes()
    if damage == "no checksum":
        os.remove(str(path) + storage.SIDECAR)
    else:
        path.write_bytes({"truncated": raw[:-9], "flipped byte": raw[:200] + bytes([raw[200] ^ 4]) + raw[201:],
                          "emptied": b""}[damage])
    _assert_equal(_sweep(prob, out), ref)
    assert [w for w in _warnings(caplog) if f"{path} is damaged" in w and "recomputing" in w], _warnings(caplog)
    storage.verify(str(path))                                      # rewritten


@pytest.mark.parametrize("wrong", ["other rows", "other members", "non-finite metric", "other prompt count",
                                   "float64 metric", "no metric", "no spec fingerprint"])
def test_self_consistent_chunk_with_wrong_contents_is_recomputed(prob, ref, tmp_path, caplog, wrong):
    """A chunk file with a valid checksum whose contents are not chunk 5's members and values."""
    out = tmp_path / "s"
    _sweep(prob, out)
    path, other = out / "chunks" / CHUNK.format(5), out / "chunks" / CHUNK.format(6)
    with np.load(path) as z, np.load(other) as o:
        good, rows = dict(z), dict(o)
    _write_npz(path, **{
        "other rows": rows,
        "other members": dict(good, bitmask=rows["bitmask"]),
        "non-finite metric": dict(good, metric=np.full_like(good["metric"], np.nan)),
        "other prompt count": dict(good, metric=good["metric"][:, :1]),
        "float64 metric": dict(good, metric=good["metric"].astype(np.float64)),
        "no metric": {k: good[k] for k in ("ranks", "bitmask", "spec")},
        "no spec fingerprint": {k: good[k] for k in ("ranks", "bitmask", "metric")},
    }[wrong])
    _assert_equal(_sweep(prob, out), ref)
    assert [w for w in _warnings(caplog) if f"{path} is damaged" in w], _warnings(caplog)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A finished sweep with the same layout (model, pool, family, chunks) but another source."""
    out = tmp_path_factory.mktemp("other") / "s"
    _sweep(sweep_worker.problem(zero_ablation=True), out)
    return out


def _copy(src, dst):
    for suffix in ("", storage.SIDECAR):
        shutil.copy(str(src) + suffix, str(dst) + suffix)


def test_chunk_of_another_sweep_is_named_and_recomputed(prob, ref, other, tmp_path, caplog):
    """A checksummed chunk copied in from a sweep with the same layout is not merged."""
    out = tmp_path / "s"
    _sweep(prob, out)
    path = out / "chunks" / CHUNK.format(5)
    _copy(other / "chunks" / CHUNK.format(5), path)
    assert not np.array_equal(np.load(path)["metric"], ref.metric[20:24])
    _assert_equal(_sweep(prob, out), ref)
    assert [w for w in _warnings(caplog) if f"{path} is damaged" in w and "written by another sweep" in w], \
        _warnings(caplog)


def test_results_of_another_sweep_are_refused(prob, other, tmp_path):
    out = tmp_path / "s"
    _sweep(prob, out)
    _copy(other / "results.npz", out / "results.npz")
    with pytest.raises(storage.DamagedFileError, match=r"results\.npz is damaged .*written by another sweep"):
        load_results(str(out))


def test_damaged_results_raise_naming_them_and_a_rerun_rebuilds_them(prob, ref, tmp_path):
    out = tmp_path / "s"
    _sweep(prob, out)
    path = out / "results.npz"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(storage.DamagedFileError, match=r"results\.npz is damaged .*rerun the sweep to rebuild it"):
        load_results(str(out))
    _sweep(prob, out)
    _assert_equal(load_results(str(out)), ref)


@pytest.mark.parametrize("damage", ["edited", "unparsable", "no checksum", "deleted"])
def test_damaged_spec_stops_the_sweep_and_is_kept(prob, tmp_path, damage):
    out = tmp_path / "s"
    _sweep(prob, out)
    spec = out / "spec.json"
    if damage == "edited":
        spec.write_text(spec.read_text().replace('"size": 70', '"size": 71'))
    elif damage == "unparsable":
        spec.write_text("{not json")
        storage.write_sidecar(str(spec))                   # bytes match their checksum, yet unreadable
    else:
        os.remove(str(spec) + storage.SIDECAR if damage == "no checksum" else spec)
    before = spec.read_bytes() if spec.exists() else None
    with pytest.raises(storage.DamagedFileError, match=r"spec\.json is damaged .*delete the directory or choose"):
        _sweep(prob, out)
    assert (spec.read_bytes() if spec.exists() else None) == before


def test_resume_with_other_weights_is_refused_naming_the_fingerprint(tmp_path):
    """Same config, zero ablation (a source that does not depend on the weights), other weights."""
    first = sweep_worker.problem(zero_ablation=True)
    other = sweep_worker.problem(jax.tree.map(lambda x: 1.5 * x, first[0]), zero_ablation=True)
    out = tmp_path / "s"

    class Stop(Exception):
        pass

    def stop(start, _):
        if start == 3 * 4:                 # the fourth chunk of 4
            raise Stop
    with pytest.raises(Stop):
        _sweep(first, out, on_chunk=stop)
    with pytest.raises(ValueError, match=r"different sweep \(differs in \['fingerprint\.params'\]\)"):
        _sweep(other, out)
    assert len(os.listdir(out / "chunks")) == 2 * 4                  # 4 chunks and their checksums
    assert not (out / "results.npz").exists()


def test_processes_other_than_0_write_nothing(prob, ref, tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    _assert_equal(_sweep(prob, tmp_path / "s"), ref)
    assert not (tmp_path / "s").exists()


def _start_worker(out, env, sleep_s, chunks_done):
    """A worker process sweeping into `out`, once it has written `chunks_done` chunks."""
    proc = subprocess.Popen(WORKER + [str(out), str(sleep_s)], cwd=ROOT, env=env)
    path = out / "chunks" / CHUNK.format(chunks_done - 1)
    deadline = time.time() + 120
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert path.exists() and proc.poll() is None, proc.returncode
    return proc


def test_second_writer_gets_locked_error_naming_the_holder(prob, tmp_path, worker_env, worker_ref):
    out = tmp_path / "s"
    proc = _start_worker(out, worker_env, 0.1, 1)
    try:
        with pytest.raises(storage.LockedError, match=f"in use by another process \\(pid {proc.pid} on "):
            run_sweep(*prob, str(out), chunk_size=4)
    finally:
        assert proc.wait(timeout=120) == 0
    _assert_equal(load_results(str(out)), worker_ref)


def test_lock_of_a_killed_writer_is_taken_over(tmp_path, worker_env, worker_ref):
    out = tmp_path / "s"
    proc = _start_worker(out, worker_env, 10.0, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / ".lock").read_text().startswith(f"pid {proc.pid} ")
    subprocess.run(WORKER + [str(out)], cwd=ROOT, env=worker_env, check=True, timeout=300)
    _assert_equal(load_results(str(out)), worker_ref)


def test_resume_after_sigkill_during_a_chunk_write(tmp_path, worker_env, worker_ref):
    """A real kill -9 landing while a chunk's temporary file exists (retried in fresh directories
    until it does), then a resume: the results equal an uninterrupted run's."""
    rng = random.Random(0)
    for attempt in range(20):
        out = tmp_path / f"a{attempt}"
        chunks, after = out / "chunks", rng.randint(1, 12)       # kill during a write after `after` chunks
        proc = subprocess.Popen(WORKER + [str(out)], cwd=ROOT, env=worker_env)
        while proc.poll() is None:                                # polls without pause near the kill
            done = sweep_worker.chunks_done(str(out))
            if done >= after and any(storage.TMP_MARK in n for n in os.listdir(chunks)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01 if done < after - 1 else 0)
        proc.wait()
        if proc.returncode == -signal.SIGKILL and [n for n in os.listdir(chunks) if storage.TMP_MARK in n]:
            break
    else:
        pytest.fail("no kill landed during a chunk write in 20 attempts")
    assert not (out / "results.npz").exists()
    subprocess.run(WORKER + [str(out)], cwd=ROOT, env=worker_env, check=True, timeout=300)
    _assert_equal(load_results(str(out)), worker_ref)
    assert not [n for n in os.listdir(chunks) if storage.TMP_MARK in n]
