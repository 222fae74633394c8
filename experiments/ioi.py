r"""Indirect object identification (IOI): which heads carry the name, and do others back them up?

Clean prompts ("When Mary and John went to the store, John gave a drink to" -> " Mary") and
corrupted ones (three other names, same template and token length); metric: logit(IO) - logit(S)
at the final position. Steps:

  1. baselines: the metric on the clean and the corrupted runs;
  2. per-head patching map: every head's output patched alone clean -> corrupted (all positions),
     normalised as (patched - corrupted) / (clean - corrupted), as a heatmap;
  3. attribution patching: the gradient of the metric w.r.t. the head mask, against the exact map
     (Pearson / Spearman, scatter plot, top heads by each);
  4. candidate heads: the --top_heads most positive (name movers) and most negative heads;
  5. all subsets of the top heads patched together: threshold and redundancy analysis;
  6. all subsets of the top heads mean-ablated on the clean run: single vs joint effects (backup).

  python -m experiments.ioi --n_prompts=8 --top_heads=6 --out=reports/ioi

Writes report.md, results.json, the plots and the resumable sweeps (sweeps/) under --out.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from jaxcircuits import logs
from jaxcircuits.models.params import PARAM_DTYPES

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct",
                    "Embedded model name, local HF checkpoint dir, .gguf file, or cached HF id.")
flags.DEFINE_enum("dtype", "float32", list(PARAM_DTYPES), "Parameter dtype.")
flags.DEFINE_integer("n_prompts", 8, "Clean IOI prompts (each with its corrupted twin).")
flags.DEFINE_integer("seed", 0, "Seed of the prompts (the corruption uses seed + 1).")
flags.DEFINE_integer("top_heads", 6, "Candidate heads of each sign; the sweeps cover all 2^top_heads subsets "
                     "of the positive ones (at most 12).")
flags.DEFINE_integer("chunk_size", 64, "Masks per compiled chunk (0: from free memory).")
flags.DEFINE_string("out", "reports/ioi", "Report directory.")
flags.DEFINE_bool("resume", True, "Continue sweeps already on disk in --out.")
logs.define_flags()

MAX_TOP_HEADS = 12


def _check_flags():
    if FLAGS.n_prompts < 1:
        raise app.UsageError(f"--n_prompts must be >= 1, got {FLAGS.n_prompts}")
    if not 1 <= FLAGS.top_heads <= MAX_TOP_HEADS:
        raise app.UsageError(f"--top_heads must be in [1, {MAX_TOP_HEADS}] (the sweeps run 2^top_heads subsets), "
                             f"got {FLAGS.top_heads}")
    if FLAGS.chunk_size < 0:
        raise app.UsageError(f"--chunk_size must be >= 0 (0: from free memory), got {FLAGS.chunk_size}")


def main(argv):
    del argv
    logs.apply_flags()
    _check_flags()
    from jaxcircuits.studies import ioi as lib
    from jaxcircuits.studies.common import checked, run_reporting_usage
    opts = lib.Options(model=FLAGS.model, dtype=FLAGS.dtype, n_prompts=FLAGS.n_prompts, seed=FLAGS.seed,
                       top_heads=FLAGS.top_heads, chunk_size=FLAGS.chunk_size, out=FLAGS.out, resume=FLAGS.resume)
    path = run_reporting_usage(lib.run, checked(opts, lib.check_options))
    logging.info("report: %s", os.path.abspath(path))
    print(os.path.abspath(path))


if __name__ == "__main__":
    app.run(main)
