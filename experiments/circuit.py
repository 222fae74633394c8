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

from jaxcircuits.studies import circuit as lib
from jaxcircuits.studies import kit

kit.define_flags(lib.Options)

if __name__ == "__main__":
    kit.run_binary(lib.Options, lib.run)
