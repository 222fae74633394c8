"""Two local JAX processes (jax.distributed, gloo on CPU) run one sweep: the multi-host path."""

import os
import socket
import subprocess
import sys

import numpy as np

from jaxcircuits.engine.sweep import load_results, run_sweep
from tests import sweep_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_share_one_sweep_and_match_one_process(tmp_path):
    out, port = str(tmp_path / "sweep"), str(_free_port())
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", str(i), port, out], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    logs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, logs):
        assert p.returncode == 0, err[-3000:]
    # "finished PID process_index device_count": two processes, four devices in all.
    assert [o.strip().splitlines()[-1].split()[1:] for o, _ in logs] == [["0", "0", "4"], ["1", "1", "4"]]
    got = [np.load(f"{out}.process{i}.npz") for i in (0, 1)]
    on_disk = load_results(out)                                   # written once, by process 0
    params, cfg, problem, pool, family = sweep_worker.problem()
    single = run_sweep(params, cfg, problem, pool, family, str(tmp_path / "single"), chunk_size=8, shard=False)
    for g in got:
        np.testing.assert_array_equal(g["ranks"], on_disk.ranks)
        np.testing.assert_array_equal(g["metric"], on_disk.metric)
        np.testing.assert_allclose(g["metric"], single.metric, atol=1e-5)
        np.testing.assert_allclose(g["masks_metric"], single.metric[:10], atol=1e-5)
