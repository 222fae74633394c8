r"""Sweep a family of unit subsets at one site and chart thresholds and redundancy.

  python -m experiments.threshold_sweep --task=decimals --site=head_out --layers=17 --family=all \
      --out=reports/threshold_sweep

Writes report.md, results.json, plots and the resumable sweep (sweep/) under --out.
"""

from __future__ import annotations

import os

from absl import app, flags

from jaxcircuits import logs
from jaxcircuits.interventions import sites
from jaxcircuits.models.params import PARAM_DTYPES
from jaxcircuits.studies import threshold_sweep as lib
from jaxcircuits.studies.common import checked, run_reporting_usage

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "Embedded model, HF checkpoint dir, .gguf file or cached HF id.")
flags.DEFINE_enum("dtype", "float32", list(PARAM_DTYPES), "Parameter dtype.")
flags.DEFINE_enum("task", "decimals", ["decimals", "ioi", "prompts"],
                  "decimals: 9.8/9.11 + generated pairs in two formats; ioi: clean -> corrupted IOI prompts; "
                  "prompts: --source_prompts/--target_prompts files with --answers.")
flags.DEFINE_string("source_format", "simple", "decimals: format of the source run.")
flags.DEFINE_string("target_format", "qa", "decimals: format of the target run.")
flags.DEFINE_string("source_prompts", None, "prompts: file, one source prompt per line (\\n for newlines).")
flags.DEFINE_string("target_prompts", None, "prompts: file, one target prompt per line.")
flags.DEFINE_list("answers", [], "prompts: good,bad answer strings; metric = logit(good) - logit(bad) (first token).")
flags.DEFINE_integer("n_prompts", 4, "decimals/ioi: number of prompts.", lower_bound=1)
flags.DEFINE_enum("site", "head_out", list(sites.NAMES), "Intervention site of the pool (see jaxcircuits.interventions.sites).")
flags.DEFINE_list("layers", ["17"], "Layers whose units form the pool.")
flags.DEFINE_string("pool", "all", "Units per layer: all, even, odd, or comma-separated unit indices "
                    "(heads or blocks; ignored for whole-layer sites).")
flags.DEFINE_enum("family", "all", list(lib.FAMILIES),
                  "all: 2^n subsets; sizes: all subsets of each --sizes; sampled: --samples_per_size per size; "
                  "even/odd: the single even/odd subset; strided: every offset of --stride; "
                  "contiguous: all windows of each --sizes; explicit: --subsets; kv_groups: one subset per KV "
                  "group (the query heads sharing a key/value head, per layer); group_positions: one per position "
                  "within the KV groups (query-head sites).")
flags.DEFINE_list("sizes", [], "Subset sizes for sizes/sampled/contiguous.")
flags.DEFINE_integer("samples_per_size", 100, "sampled: members per size.", lower_bound=1)
flags.DEFINE_integer("stride", 2, "strided: stride.", lower_bound=1)
flags.DEFINE_string("subsets", "", "explicit: subsets as unit indices, e.g. '0 2 4;1 3'.")
flags.DEFINE_string("positions", "all", "Target positions: all, last, last:k, or comma-separated token indices.")
flags.DEFINE_enum("align", "token", list(lib.ALIGNS), "Source->target position map.")
flags.DEFINE_string("success", "recovery>=0.5", "Success of a subset: recovery>=X (normalised recovery (patched - "
                    "target) / (source - target) of the mean metric), metric>X (mean metric), fraction>=X (of "
                    "prompts with metric > 0), fraction(metric>=Y)>=X (of prompts with metric >= Y); or "
                    "positive, above:X, below:X with --aggregate.")
flags.DEFINE_enum("aggregate", "mean", ["mean", "fraction"], "For --success=positive|above:X|below:X, over prompts: "
                  "mean metric, or at least half the prompts.")
flags.DEFINE_integer("n_blocks", None, "attn_block: blocks per layer (default n_heads).", lower_bound=1)
flags.DEFINE_integer("chunk_size", 128, "Subsets per compiled chunk (0: from free memory).", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed of prompts and sampled families.")
flags.DEFINE_string("out", "reports/threshold_sweep", "Report directory.")
flags.DEFINE_bool("resume", True, "Continue a sweep already in --out.")
logs.define_flags()


def options() -> lib.Options:
    """Validate every flag that needs no model into `lib.Options` (`lib.check_options` then checks
    them against the model's config, before any weights are loaded)."""
    def ints(name, values):
        try:
            return tuple(int(v) for v in values)
        except ValueError:
            raise app.UsageError(f"--{name} must be integers, got {values}") from None
    layers, sizes = ints("layers", FLAGS.layers), ints("sizes", FLAGS.sizes)
    if not layers or min(layers) < 0:
        raise app.UsageError("--layers must list layers >= 0")
    if FLAGS.family in ("sizes", "sampled", "contiguous") and not sizes:
        raise app.UsageError(f"--family={FLAGS.family} needs --sizes")
    explicit = tuple(ints("subsets", s.split()) for s in FLAGS.subsets.split(";") if s.strip())
    if FLAGS.family == "explicit" and not explicit:
        raise app.UsageError("--family=explicit needs --subsets")
    if FLAGS.task == "prompts" and not (FLAGS.source_prompts and FLAGS.target_prompts and len(FLAGS.answers) == 2):
        raise app.UsageError("--task=prompts needs --source_prompts, --target_prompts and --answers=good,bad")
    for path in (FLAGS.source_prompts, FLAGS.target_prompts) if FLAGS.task == "prompts" else ():
        if not os.path.isfile(path):
            raise app.UsageError(f"prompt file {path} not found")
    if FLAGS.pool not in ("all", "even", "odd"):
        ints("pool", FLAGS.pool.split(","))
    try:
        lib.parse_positions(FLAGS.positions)
        lib.parse_success(FLAGS.success, FLAGS.aggregate)
        if FLAGS.task == "decimals":
            from jaxcircuits.tasks.formats import get_format
            get_format(FLAGS.source_format), get_format(FLAGS.target_format)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    return lib.Options(
        model=FLAGS.model, task=FLAGS.task, source_format=FLAGS.source_format, target_format=FLAGS.target_format,
        prompts=(FLAGS.source_prompts, FLAGS.target_prompts), answers=tuple(FLAGS.answers), n_prompts=FLAGS.n_prompts,
        site=FLAGS.site, layers=layers, pool=FLAGS.pool, family=FLAGS.family, sizes=sizes,
        samples_per_size=FLAGS.samples_per_size, stride=FLAGS.stride, explicit=explicit, positions=FLAGS.positions,
        align=FLAGS.align, success=FLAGS.success, aggregate=FLAGS.aggregate, n_blocks=FLAGS.n_blocks,
        chunk_size=FLAGS.chunk_size, seed=FLAGS.seed, out=FLAGS.out, resume=FLAGS.resume, dtype=FLAGS.dtype)


def main(argv):
    del argv
    logs.apply_flags()
    opts = checked(options(), lib.check_options)
    print(os.path.abspath(run_reporting_usage(lib.run, opts)))


if __name__ == "__main__":
    app.run(main)
