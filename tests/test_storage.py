"""storage: atomic checksummed files, damage detection, temp cleaning, one writer per directory."""

import os
import subprocess
import sys

import numpy as np
import pytest

from jaxcircuits import storage


def _npz(tmp):
    np.savez(tmp, a=np.arange(5))


def _load(p):
    with open(p, "rb") as f, np.load(f) as z:
        return z["a"].copy()


def test_roundtrip_and_every_kind_of_damage(tmp_path):
    path = str(tmp_path / "x.npz")
    storage.write_atomic(path, lambda t: np.savez(open(t, "wb"), a=np.arange(5)))
    np.testing.assert_array_equal(storage.read_verified(path, _load), np.arange(5))
    raw = open(path, "rb").read()
    for name, bytes_ in [("flipped", raw[:40] + bytes([raw[40] ^ 1]) + raw[41:]), ("truncated", raw[:-7]),
                         ("emptied", b"")]:
        open(path, "wb").write(bytes_)
        with pytest.raises(storage.DamagedFileError, match="x.npz is damaged"):
            storage.read_verified(path, _load)
    open(path, "wb").write(raw)
    os.remove(path + storage.SIDECAR)
    with pytest.raises(storage.DamagedFileError, match="no checksum"):
        storage.read_verified(path, _load)


def test_failed_write_leaves_nothing(tmp_path):
    path = str(tmp_path / "y.json")
    def boom(tmp):
        open(tmp, "w").write("{")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        storage.write_atomic(path, boom)
    assert os.listdir(tmp_path) == []


def test_remove_temps_and_directory_checksums(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.npz").write_bytes(b"1")
    (d / f"b.npz{storage.TMP_MARK}99999-abcd").write_bytes(b"2")
    assert storage.remove_temps(str(d)) == [f"b.npz{storage.TMP_MARK}99999-abcd"]
    assert os.listdir(d) == ["a.npz"]
    storage.write_sidecar(str(d))
    storage.verify(str(d))
    (d / "a.npz").write_bytes(b"3")
    with pytest.raises(storage.DamagedFileError):
        storage.verify(str(d))


def test_one_writer_per_directory_and_stale_locks(tmp_path):
    d = str(tmp_path / "run")
    with storage.DirLock(d):
        holder = "import sys; from jaxcircuits import storage; storage.DirLock(sys.argv[1]).__enter__()"
        r = subprocess.run([sys.executable, "-c", holder, d], capture_output=True, text=True)
        assert r.returncode != 0 and f"pid {os.getpid()}" in r.stderr and "in use by another process" in r.stderr
    # A holder killed with SIGKILL leaves the lock file, not the lock.
    p = subprocess.Popen([sys.executable, "-c", holder + "; import time; print('held', flush=True); time.sleep(60)", d],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(storage.LockedError):
        storage.DirLock(d).__enter__()
    p.kill()
    p.wait()
    with storage.DirLock(d):
        pass
