"""A small sweep in its own process, for the kill -9 / resume / lock tests:
python -m tests.sweep_worker OUT [SLEEP_S] (SLEEP_S: a pause after each chunk), run as `CMD`
with `env(tmp_dir)`."""

import functools
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxcircuits.interventions import positions as P  # noqa: E402
from jaxcircuits.storage import TMP_MARK  # noqa: E402
from jaxcircuits.interventions.ablation import zeros_like_source  # noqa: E402
from jaxcircuits.interventions.metrics import LogitDiff  # noqa: E402
from jaxcircuits.models.config import ModelConfig  # noqa: E402
from jaxcircuits.models.params import init_params  # noqa: E402
from jaxcircuits.models.transformer import run_with_cache  # noqa: E402
from jaxcircuits.interventions.problem import PatchingProblem, target_run  # noqa: E402
from jaxcircuits.engine.subsets import Pool, of_size  # noqa: E402
from jaxcircuits.engine.sweep import run_sweep  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMD = [sys.executable, "-m", "tests.sweep_worker"]
CFG = ModelConfig.from_hf({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 8, "num_key_value_heads": 2,
                           "intermediate_size": 48, "vocab_size": 50})


@functools.lru_cache(None)
def default_params():
    """The worker model's weights (cached: drawing them compiles for seconds)."""
    return init_params(CFG, jax.random.PRNGKey(0), scale=0.3)


def problem(params=None, zero_ablation=False):
    """(params, cfg, patching problem, pool, family) of the worker's sweep, for the model with
    `params` (default: `default_params()`); zero_ablation=True patches zeros instead of the
    source run's head outputs."""
    params = default_params() if params is None else params
    rng = np.random.RandomState(0)
    tgt, src = rng.randint(0, 50, (2, 6)), rng.randint(0, 50, (2, 6))
    _, cache = run_with_cache(params, CFG, src, sites=("head_out",))
    if zero_ablation:
        cache = zeros_like_source(cache)
    metric = LogitDiff(good=jnp.array([[3], [4]]), bad=jnp.array([[5], [6]]))
    return (params, CFG, PatchingProblem.make(target_run(params, CFG, tgt), cache, P.select("all", np.ones(tgt.shape)),
                                              metric), Pool.heads(1, 8), of_size(8, 4))


def env(tmp_dir):
    """Environment of worker processes: the repository importable, and a persistent compilation
    cache in tmp_dir, so that every start after the first takes about a second, not ten."""
    return dict(os.environ, PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=os.path.join(str(tmp_dir), "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def chunks_done(out):
    """How many complete chunk files the sweep directory `out` holds."""
    chunks = os.path.join(out, "chunks")
    names = os.listdir(chunks) if os.path.isdir(chunks) else []
    return sum(n.endswith(".npz") and TMP_MARK not in n for n in names)


if __name__ == "__main__":
    out, sleep_s = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    run_sweep(*problem(), out, chunk_size=4, on_chunk=lambda i, v: time.sleep(sleep_s))
    print("finished")
