"""Q/K/V composition scores of every head pair of SmolLM2-135M: one compiled call.

    python -m benchmarks.composition_smollm2              # the embedded model, 5 timed reps
    python -m benchmarks.composition_smollm2 --fold       # on LN-folded weights

Times `weight_space.composition_scores` (30 x 9 = 270 heads, 72,900 writer/reader pairs, 3 types,
from the Dh=64 factors; pairs whose reader is not in a later layer come back NaN) after
jax.clear_caches(): the first call (compile + run) and the median of --reps further calls; checks
a few pairs against dense D x D matrices and prints the random-matrix baseline. One JSON line.
"""

from __future__ import annotations

import json
import platform
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks.timing import first_and_median

FLAGS = flags.FLAGS
flags.DEFINE_integer("reps", 5, "Timed calls after the first.", lower_bound=1)
flags.DEFINE_integer("batch_size", 8, "Writer heads per step of the map (each vmapped over all readers).")
flags.DEFINE_bool("fold", False, "Fold the norms into the weights first (folding.fold_norms).")


def main(argv):
    del argv
    import jaxcircuits as jc
    from jaxcircuits.methods import folding
    from jaxcircuits.methods import weight_space as ws
    model = jc.load()
    params, cfg = model.params, model.cfg
    if FLAGS.fold:
        params, cfg = folding.fold_norms(params, cfg)
    fn = jax.jit(ws.composition_scores, static_argnums=(1, 2))
    run = lambda: jax.block_until_ready(fn(params, cfg, FLAGS.batch_size))
    scores, first, median = first_and_median(run, FLAGS.reps)
    scores = np.asarray(scores)
    ov, qk = (np.asarray(ws.head_factors(params, cfg, k).dense()[np.array([0, 5, 20])]) for k in ws.HEAD_MATRICES)
    fro = np.linalg.norm
    checks = [(scores[0, 0, 1, 5, 2], fro(ov[0, 1] @ qk[1, 2]) / (fro(ov[0, 1]) * fro(qk[1, 2]))),
              (scores[1, 5, 3, 20, 8], fro(ov[1, 3] @ qk[2, 8].T) / (fro(ov[1, 3]) * fro(qk[2, 8]))),
              (scores[2, 0, 4, 20, 0], fro(ov[0, 4] @ ov[2, 0]) / (fro(ov[0, 4]) * fro(ov[2, 0])))]
    base = np.asarray(ws.random_baseline(jax.random.PRNGKey(0), cfg, 256))
    valid = ~np.isnan(scores[0])
    print(json.dumps({
        "benchmark": "composition_smollm2", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "folded": FLAGS.fold,
        "heads": cfg.n_layers * cfg.n_heads, "pairs_later_layer": int(valid.sum()),
        "first_call_s": round(first, 3), "median_call_s": round(median, 4),
        "max_rel_err_vs_dense": float(max(abs(a - b) / b for a, b in checks)),
        "mean_score": [round(float(np.nanmean(s)), 4) for s in scores],
        "max_score": [round(float(np.nanmax(s)), 4) for s in scores],
        "baseline_mean": [round(float(b.mean()), 4) for b in base],
        "baseline_std": [round(float(b.std()), 4) for b in base],
        "device": jax.devices()[0].device_kind, "cpus": platform.processor() or platform.machine(),
        "jax": jax.__version__}))


if __name__ == "__main__":
    app.run(main)
