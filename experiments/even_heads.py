r"""The "even heads" decimal-comparison study, measured instead of sampled.

A model judges 9.11 > 9.8 in one prompt format and answers right in another; patching one layer's
attention from the good-format run into the bad-format run is said to repair it, with a sharp
threshold in the number of "heads" patched. Steps:

  1. format scan: every (pair, format) answered by logit metrics and by greedy generation; the
     premise (the source format answers right and beats the target), with intervals over pairs;
  2. layer scan: each layer's heads patched at once (source format -> target format), ranked by
     recovery (patched - target) / (source - target);
  3. exhaustive sweeps over the heads (--protocol=heads) and/or residual blocks
     (--protocol=original) of the best layer(s), with threshold and redundancy analysis and
     intervals over the pairs (bootstrap);
  4. unit families patched on all pairs: even/odd, and for true heads the KV groups and the
     positions within them (GQA), tested separately;
  5. blend-weight crossing of the whole layer; generation on the boundary subsets.

The report opens with findings stated from these numbers by fixed rules. Success of a subset:
--success (default recovery>=0.5). Pairs: --n_pairs generated pairs plus 9.8/9.11 give the
headline rates (fractions of pairs; 64 pairs by default keep their 95% intervals within +-0.15);
the first --sweep_pairs of them run steps 2, 3 and 5.

--protocol=heads (default): true per-head sites (o_proj input), token-matched positions, prefill
only, logit metric (first distinguishing answer token) for the sweep.
--protocol=original: what the original code did: blocks of the o_proj OUTPUT, positions aligned
from the start, patched in prefill and at every decoded token (with the source's first token),
success judged on greedy text. --protocol=both writes them side by side.

  python -m experiments.even_heads --preset=quick --protocol=both --out=reports/even_heads
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
flags.DEFINE_enum("protocol", "heads", ["heads", "original", "both"], "Which protocol(s) to run.")
flags.DEFINE_enum("preset", "quick", ["quick", "full"],
                  "quick: study pair + 63 generated pairs, the first 3 for the sweeps, 1 layer swept (CPU, "
                  "minutes); full: 95 generated pairs, the first 16 for the sweeps, 2 layers.")
flags.DEFINE_string("source_format", "simple", "Prompt format of the good (source) run; 'auto' = the scanned "
                    "format with the highest mean first-token logit difference.")
flags.DEFINE_string("target_format", "qa", "Prompt format of the bad (target) run; 'auto' = the scanned format "
                    "with the lowest.")
flags.DEFINE_list("scan_formats", ["simple", "qa", "chat", "chat_raw"], "Formats of the format scan.")
flags.DEFINE_integer("n_pairs", None, "Generated trap pairs besides 9.8/9.11 (default by preset): the headline "
                     "rates use them all.", lower_bound=0)
flags.DEFINE_integer("sweep_pairs", None, "The first pairs (9.8/9.11 first) for the layer scan, the sweeps, the "
                     "blend and the generation checks (default by preset).", lower_bound=1)
flags.DEFINE_string("success", "recovery>=0.5", "Success of a subset: recovery>=X (normalised recovery of the mean "
                    "metric toward the source), metric>X (mean metric), fraction>=X (of pairs answered right) "
                    "or fraction(metric>=Y)>=X (of pairs with metric >= Y).")
flags.DEFINE_list("sweep_layers", [], "Layers to sweep (default: the best of the layer scan).")
flags.DEFINE_integer("top_layers", None, "How many best layers to sweep (default by preset).", lower_bound=1)
flags.DEFINE_integer("n_blocks", None, "Residual blocks of the original protocol (default: n_heads).", lower_bound=1)
flags.DEFINE_integer("max_new_tokens", 20, "Greedy tokens per generation.", lower_bound=1)
flags.DEFINE_integer("confirm", 4, "Boundary subsets confirmed by generation per sweep.", lower_bound=0)
flags.DEFINE_integer("chunk_size", 64, "Masks per compiled chunk (0: from free memory).", lower_bound=0)
flags.DEFINE_integer("samples_per_size", 200, "Layers with more than 16 heads/blocks (e.g. Llama-3.1-8B): "
                     "all subsets of the even and of the odd units, and this many sampled subsets per size "
                     "over all units.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the generated pairs.")
flags.DEFINE_string("out", "reports/even_heads", "Report directory.")
flags.DEFINE_bool("resume", True, "Continue sweeps already on disk in --out.")
logs.define_flags()


def _check_flags():
    from jaxcircuits.tasks.formats import get_format
    for name in [FLAGS.source_format, FLAGS.target_format, *FLAGS.scan_formats]:
        if name != "auto":
            get_format(name)                   # raises listing the known formats
    if "auto" in (FLAGS.source_format, FLAGS.target_format) and len(FLAGS.scan_formats) < 2:
        raise app.UsageError("'auto' formats need at least two --scan_formats")
    if FLAGS.source_format == FLAGS.target_format != "auto":
        raise app.UsageError("--source_format and --target_format must differ")
    from jaxcircuits.stats.criteria import Criterion
    try:
        Criterion.parse(FLAGS.success)
    except ValueError as e:
        raise app.UsageError(f"--success: {e}") from None
    try:
        layers = [int(l) for l in FLAGS.sweep_layers]
    except ValueError:
        raise app.UsageError(f"--sweep_layers must be integers, got {FLAGS.sweep_layers}") from None
    if any(l < 0 for l in layers):
        raise app.UsageError("--sweep_layers must be >= 0")
    return layers


def main(argv):
    del argv
    logs.apply_flags()
    sweep_layers = _check_flags()
    from jaxcircuits.studies import even_heads as lib
    from jaxcircuits.studies.common import checked, run_reporting_usage
    quick = FLAGS.preset == "quick"
    opts = lib.Options(
        model=FLAGS.model, dtype=FLAGS.dtype, protocols=("heads", "original") if FLAGS.protocol == "both" else (FLAGS.protocol,),
        source_format=FLAGS.source_format, target_format=FLAGS.target_format, scan_formats=tuple(FLAGS.scan_formats),
        n_pairs=FLAGS.n_pairs if FLAGS.n_pairs is not None else (63 if quick else 95),
        sweep_pairs=FLAGS.sweep_pairs or (3 if quick else 16), success=FLAGS.success,
        sweep_layers=tuple(sweep_layers), top_layers=FLAGS.top_layers or (1 if quick else 2),
        n_blocks=FLAGS.n_blocks, max_new_tokens=FLAGS.max_new_tokens, confirm=FLAGS.confirm,
        chunk_size=FLAGS.chunk_size, seed=FLAGS.seed, out=FLAGS.out, resume=FLAGS.resume,
        samples_per_size=FLAGS.samples_per_size)
    path = run_reporting_usage(lib.run, checked(opts, lib.check_options))
    logging.info("report: %s", os.path.abspath(path))
    print(os.path.abspath(path))


if __name__ == "__main__":
    app.run(main)
