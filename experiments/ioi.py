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

from jaxcircuits.studies import ioi as lib
from jaxcircuits.studies import kit

kit.define_flags(lib.Options)

if __name__ == "__main__":
    kit.run_binary(lib.Options, lib.run)
