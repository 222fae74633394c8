"""A small sweep in its own process, for the kill -9 / resume test: python -m tests.sweep_worker OUT [SLEEP_S]."""

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxcircuits import positions as P  # noqa: E402
from jaxcircuits.metrics import LogitDiff  # noqa: E402
from jaxcircuits.models.config import ModelConfig  # noqa: E402
from jaxcircuits.models.params import init_params  # noqa: E402
from jaxcircuits.models.transformer import run_with_cache  # noqa: E402
from jaxcircuits.patching import PatchingProblem, target_run  # noqa: E402
from jaxcircuits.subsets import Pool, of_size  # noqa: E402
from jaxcircuits.sweep import run_sweep  # noqa: E402

CFG = ModelConfig.from_hf({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 8, "num_key_value_heads": 2,
                           "intermediate_size": 48, "vocab_size": 50})


def problem():
    """(params, cfg, patching problem, pool, family) of the worker's sweep."""
    params = init_params(CFG, jax.random.PRNGKey(0), scale=0.3)
    rng = np.random.RandomState(0)
    tgt, src = rng.randint(0, 50, (2, 6)), rng.randint(0, 50, (2, 6))
    _, cache = run_with_cache(params, CFG, src, sites=("head_out",))
    metric = LogitDiff(good=jnp.array([[3], [4]]), bad=jnp.array([[5], [6]]))
    return (params, CFG, PatchingProblem.make(target_run(params, CFG, tgt), cache, P.select("all", np.ones(tgt.shape)),
                                              metric), Pool.heads(1, 8), of_size(8, 4))


if __name__ == "__main__":
    out, sleep_s = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    run_sweep(*problem(), out, chunk_size=4, on_chunk=lambda i, v: time.sleep(sleep_s))
    print("finished")
