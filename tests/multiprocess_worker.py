"""One of two local JAX processes sharing a sweep: python -m tests.multiprocess_worker PID PORT OUT.

Each process has two CPU devices, so the sweep's mask axis is sharded over four devices in two
processes, as on a multi-host machine; jax.distributed connects them (gloo collectives on CPU).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402

if __name__ == "__main__":
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    from tests import sweep_worker
    from jaxcircuits.engine.patching import run_masks
    from jaxcircuits.interventions.sites import Mask
    from jaxcircuits.engine.subsets import unrank_np
    from jaxcircuits.engine.sweep import run_sweep
    params, cfg, problem, pool, family = sweep_worker.problem()
    res = run_sweep(params, cfg, problem, pool, family, out, chunk_size=8)
    masks = Mask(**{pool.site: np.asarray(pool.scatter(unrank_np(family, np.arange(10)), pool.site_shape(cfg)))})
    np.savez(f"{out}.process{pid}.npz", metric=res.metric, ranks=res.ranks,
             masks_metric=run_masks(params, cfg, problem, masks, chunk_size=4))
    print("finished", pid, jax.process_index(), jax.device_count(), flush=True)
