r"""Per-head attribution four ways: DLA, attribution patching, integrated gradients, exact patching.

  python -m experiments.attribution --task=ioi --n_prompts=8 --out=reports/attribution

For a source -> target task (IOI clean -> corrupted by default, the decimal formats, or prompt
files) every head's DLA change, attribution-patching and integrated-gradients estimates and exact
single-head patching effect, as fractions of the source - target gap: their rank correlations,
the heads all methods agree on and where they differ, heat maps and scatter plots.
Writes report.md, results.json and plots under --out.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from jaxcircuits import logs
from jaxcircuits.models.params import PARAM_DTYPES

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "Embedded model, HF checkpoint dir, .gguf file or cached HF id.")
flags.DEFINE_enum("dtype", "float32", list(PARAM_DTYPES), "Parameter dtype.")
flags.DEFINE_enum("task", "ioi", ["ioi", "decimals", "prompts"],
                  "ioi: clean -> corrupted IOI prompts; decimals: --source_format -> --target_format pairs; "
                  "prompts: --source_prompts/--target_prompts files with --answers.")
flags.DEFINE_string("source_format", "simple", "decimals: format of the source run.")
flags.DEFINE_string("target_format", "qa", "decimals: format of the target run.")
flags.DEFINE_string("source_prompts", None, "prompts: file, one source prompt per line (\\n for newlines).")
flags.DEFINE_string("target_prompts", None, "prompts: file, one target prompt per line.")
flags.DEFINE_list("answers", [], "prompts: good,bad answer strings; metric = logit(good) - logit(bad) (first token).")
flags.DEFINE_integer("n_prompts", 8, "Prompts (ioi, decimals).", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the prompts.")
flags.DEFINE_integer("ig_steps", 8, "Integrated-gradients steps (midpoint rule).", lower_bound=1)
flags.DEFINE_integer("top", 5, "Heads per method compared for agreement.", lower_bound=1)
flags.DEFINE_integer("chunk_size", 64, "Masks per compiled chunk of the exact map (0: from free memory).",
                     lower_bound=0)
flags.DEFINE_string("out", "reports/attribution", "Report directory.")
logs.define_flags()


def main(argv):
    del argv
    logs.apply_flags()
    if FLAGS.task == "prompts" and not (FLAGS.source_prompts and FLAGS.target_prompts and len(FLAGS.answers) == 2):
        raise app.UsageError("--task=prompts needs --source_prompts, --target_prompts and --answers=good,bad")
    from jaxcircuits.studies import attribution as lib
    from jaxcircuits.studies.common import checked, run_reporting_usage
    opts = lib.Options(model=FLAGS.model, dtype=FLAGS.dtype, task=FLAGS.task, source_format=FLAGS.source_format,
                       target_format=FLAGS.target_format, prompts=(FLAGS.source_prompts, FLAGS.target_prompts),
                       answers=tuple(FLAGS.answers), n_prompts=FLAGS.n_prompts, seed=FLAGS.seed,
                       ig_steps=FLAGS.ig_steps, top=FLAGS.top, chunk_size=FLAGS.chunk_size, out=FLAGS.out)
    path = run_reporting_usage(lib.run, checked(opts, lib.check_options))
    logging.info("report: %s", os.path.abspath(path))
    print(os.path.abspath(path))


if __name__ == "__main__":
    app.run(main)
