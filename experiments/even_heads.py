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

from jaxcircuits.studies import even_heads as lib
from jaxcircuits.studies import kit

kit.define_flags(lib.Options)

if __name__ == "__main__":
    kit.run_binary(lib.Options, lib.run)
