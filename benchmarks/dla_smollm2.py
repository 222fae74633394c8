"""DLA of every head of every layer of SmolLM2-135M for a batch of prompts: one compiled call.

    python -m benchmarks.dla_smollm2                      # 16 IOI prompts, the embedded model
    python -m benchmarks.dla_smollm2 --n_prompts=64 --reps=5

Times `dla.direct_logit_attribution` (plain run + decomposition into 30 x 9 head outputs,
embeddings, MLPs and biases + projection through the final norm onto the IO - S logit direction)
after jax.clear_caches(): the first call (compile + run) and the median of --reps further calls,
and checks the contributions sum to the run's logit difference. Prints one JSON line.
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
flags.DEFINE_integer("n_prompts", 16, "IOI prompts in the batch.", lower_bound=1)
flags.DEFINE_integer("reps", 5, "Timed calls after the first.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the prompts.")


def main(argv):
    del argv
    import jaxcircuits as jc
    from jaxcircuits.methods import dla
    from jaxcircuits.tasks.ioi import generate_ioi, ioi_batch
    model = jc.load()
    batch = ioi_batch(generate_ioi(FLAGS.n_prompts, FLAGS.seed, model.tokenizer), model.tokenizer)
    direction = dla.answer_direction(model.params, batch.metric.good, batch.metric.bad)
    run = lambda: jax.block_until_ready(dla.direct_logit_attribution(model.params, model.cfg, batch.ids,
                                                                     batch.attn_mask,
                                                                     direction))
    out, first, median = first_and_median(run, FLAGS.reps)
    logits = np.asarray(jc.forward(model.params, model.cfg, batch.ids, batch.attn_mask)[0])[:, -1]
    rows = np.arange(FLAGS.n_prompts)
    want = logits[rows, np.asarray(batch.metric.good)[:, 0]] - logits[rows, np.asarray(batch.metric.bad)[:, 0]]
    print(json.dumps({
        "benchmark": "dla_smollm2", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "prompts": FLAGS.n_prompts,
        "tokens": int(batch.ids.shape[1]), "heads": int(out["heads"].shape[0] * out["heads"].shape[1]),
        "first_call_s": round(first, 3), "median_call_s": round(median, 4),
        "max_abs_total_minus_logit_diff": float(np.abs(np.asarray(out["total"][:, 0]) - want).max()),
        "device": jax.devices()[0].device_kind, "cpus": platform.processor() or platform.machine(),
        "jax": jax.__version__}))


if __name__ == "__main__":
    app.run(main)
