r"""Circuits: discover them with several methods and check them against exhaustive ground truth.

  python -m experiments.circuit --task=ioi --level=head --n_prompts=8 --out=reports/circuit

On the task's clean prompts, a circuit keeps its units (heads at --level=head, sender -> receiver
edges at --level=edge) and every other unit is patched from the corrupted prompts. Steps:

  1. each --method finds circuits: path (exact single-unit patching), eap / eap_ig (attribution
     patching and integrated gradients; at head level of the heads' outputs) rank the units and
     take the top k for a grid of k up to --max_size; learned trains masks with optax, one binary
     circuit per --lambdas value;
  2. the faithfulness (m(C) - m(none)) / (m(full) - m(none)) of every circuit of every method, in
     one batched call;
  3. ground truth (--level=head): every subset of the heads of --layer (the
     layer that matters most by default) kept in turn, its minimal sufficient sets under
     --criterion, and each method's top-k heads of that layer against them (sufficient? minimal?
     Hamming / Jaccard distance to the nearest minimal set) and against the best k heads;
  4. a layered picture of the circuit.

Writes report.md (findings first), results.json and the PNGs under --out.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from jaxcircuits import logs
from jaxcircuits.models.params import PARAM_DTYPES

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "Embedded model, HF checkpoint dir, .gguf file or cached HF id.")
flags.DEFINE_enum("dtype", "float32", list(PARAM_DTYPES), "Parameter dtype.")
flags.DEFINE_string("task", "ioi", "Task (a key of jaxcircuits.studies.circuit.TASKS): ioi = clean -> corrupted IOI.")
flags.DEFINE_string("level", "head", "Units of a circuit: head (head outputs) or edge (sender -> receiver edges).")
flags.DEFINE_list("method", [], "Discovery methods (path, eap, eap_ig, learned); default: all four at head level, "
                  "path, eap and eap_ig at edge level (path only up to --max_path_edges edges).")
flags.DEFINE_integer("layer", -1, "Ground-truth pool: the heads of this layer (-1: the layer whose heads, patched "
                     "together, lower the metric most).")
flags.DEFINE_string("criterion", "recovery>=0.8", "When a circuit is sufficient: recovery>=X is faithfulness >= X.")
flags.DEFINE_integer("n_prompts", 8, "Prompts.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the prompts.")
flags.DEFINE_integer("max_size", 0, "Largest circuit on the curves (0: every unit).", lower_bound=0)
flags.DEFINE_integer("n_points", 48, "Circuit sizes on the curves (every size when there are fewer).", lower_bound=2)
flags.DEFINE_integer("ig_steps", 8, "Integrated-gradients steps.", lower_bound=1)
flags.DEFINE_bool("abs_scores", False, "Rank units by |importance| (a unit whose patching raises the metric "
                  "counts too) rather than by importance.")
flags.DEFINE_list("lambdas", ["1", "3", "10"], "learned: sparsity penalties, one run each; each is "
                  "the penalty of keeping every unit (divided by the unit count per unit).")
flags.DEFINE_integer("learned_steps", 100, "learned: adam steps.", lower_bound=1)
flags.DEFINE_float("learning_rate", 0.1, "learned: adam's learning rate.", lower_bound=0)
flags.DEFINE_integer("max_path_edges", 4096, "Largest edge count for --method=path at --level=edge (one patched "
                     "run per edge).", lower_bound=1)
flags.DEFINE_integer("chunk_size", 64, "Masks per compiled chunk (edge masks hold every sender's delta: use "
                     "fewer at --level=edge on large models).", lower_bound=1)
flags.DEFINE_string("out", "reports/circuit", "Report directory.")
logs.define_flags()


def _floats(name: str) -> tuple:
    try:
        return tuple(float(v) for v in FLAGS[name].value)
    except ValueError:
        raise app.UsageError(f"--{name} must be numbers, got {','.join(FLAGS[name].value)}") from None


def main(argv):
    del argv
    logs.apply_flags()
    from jaxcircuits.studies import circuit as lib
    from jaxcircuits.studies.common import OptionError, checked, run_reporting_usage
    opts = lib.Options(model=FLAGS.model, dtype=FLAGS.dtype, task=FLAGS.task, level=FLAGS.level,
                       methods=tuple(FLAGS.method), layer=FLAGS.layer, criterion=FLAGS.criterion,
                       n_prompts=FLAGS.n_prompts, seed=FLAGS.seed, max_size=FLAGS.max_size, n_points=FLAGS.n_points,
                       ig_steps=FLAGS.ig_steps, abs_scores=FLAGS.abs_scores, lambdas=_floats("lambdas"), learned_steps=FLAGS.learned_steps,
                       learning_rate=FLAGS.learning_rate, max_path_edges=FLAGS.max_path_edges, chunk_size=FLAGS.chunk_size,
                       out=FLAGS.out)
    try:
        lib.check_flags(opts)                   # before the model's config is read
    except OptionError as e:
        raise app.UsageError(str(e)) from None
    path = run_reporting_usage(lib.run, checked(opts, lib.check_options))
    logging.info("report: %s", os.path.abspath(path))
    print(os.path.abspath(path))


if __name__ == "__main__":
    app.run(main)
