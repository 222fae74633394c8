r"""Weight space of the heads: composition map, spectra, and the low-rank channel check.

  python -m experiments.weight_space --task=colors --n_prompts=8 --out=reports/weight_space

Q/K/V composition scores of every head pair in one compiled call (heat maps, top pairs against a
random-matrix baseline), the OV/QK singular-value spectra of the heads in the top pairs, a Q/K
massive-values profile with the task metric under zeroed top dimensions, and for the top pairs the
Talking-Heads check: the writer's head output patched from a contrast run (each option replaced
by the next one in the prompt, so the answer changes) only within the top-k singular directions
of the writer -> reader link, against random k-dim subspaces of the same rank and the full patch.
Writes report.md, results.json and plots under --out.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from jaxcircuits.models.params import PARAM_DTYPES

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "Embedded model, HF checkpoint dir, .gguf file or cached HF id.")
flags.DEFINE_enum("dtype", "float32", list(PARAM_DTYPES), "Parameter dtype.")
flags.DEFINE_enum("task", "colors", ["colors", "mc", "recall"],
                  "Choice task of the check: Colored Objects, lettered multiple choice, list recall.")
flags.DEFINE_integer("n_prompts", 8, "Prompts of the check.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the prompts and random subspaces.")
flags.DEFINE_integer("top", 3, "Top pairs per composition type listed (and checked, overall).", lower_bound=1)
flags.DEFINE_list("ranks", ["1", "4", "16"], "Subspace ranks of the check (each in [1, d_head]).")
flags.DEFINE_integer("n_random", 3, "Random subspaces per rank (one vmapped call per pair with the top-k ones).", lower_bound=1)
flags.DEFINE_list("zero_dims", ["1", "4"], "Numbers of top Q/K head dimensions zeroed (massive values; 0 is added).")
flags.DEFINE_bool("fold", False, "Fold the norms into the weights first (folding.fold_norms).")
flags.DEFINE_string("out", "reports/weight_space", "Report directory.")


def main(argv):
    del argv
    from jaxcircuits.studies import weight_space as lib
    from jaxcircuits.studies.common import checked, run_reporting_usage
    try:
        ranks, zero_dims = tuple(int(k) for k in FLAGS.ranks), tuple(int(k) for k in FLAGS.zero_dims)
    except ValueError:
        raise app.UsageError(f"--ranks / --zero_dims ({','.join(FLAGS.ranks)} / {','.join(FLAGS.zero_dims)}): "
                             "expected integers") from None
    opts = lib.Options(model=FLAGS.model, dtype=FLAGS.dtype, task=FLAGS.task, n_prompts=FLAGS.n_prompts,
                       seed=FLAGS.seed, top=FLAGS.top, ranks=ranks, n_random=FLAGS.n_random, zero_dims=zero_dims,
                       fold=FLAGS.fold, out=FLAGS.out)
    path = run_reporting_usage(lib.run, checked(opts, lib.check_options))
    logging.info("report: %s", os.path.abspath(path))
    print(os.path.abspath(path))


if __name__ == "__main__":
    app.run(main)
