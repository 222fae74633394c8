r"""Attention-output SAE: train one on a layer's head outputs, evaluate it, and read IOI through it.

The SAE reads the heads' z concatenated (site head_out, TransformerLens' hook_z) at --layer. Steps:

  1. train it (`--kind`, default topk) on activations streamed from the model over English
     Wikipedia lead sections (`dictionaries.corpus`), checkpointed under --out/checkpoints
     (resumed with --resume);
  2. evaluate it on held-out corpus rows: L0, explained variance, dead fraction, CE loss recovered
     (clean vs spliced vs zero-ablated), top activating contexts of the features below (HTML);
  3. IOI (clean prompts vs corrupted twins with three other names): the features whose activation
     differs most at the final position (name movers) and at S2 (S-inhibition), with intervals over
     prompts, and the heads each reads from (direct feature attribution by head);
  4. confirmation by feature patching on the spliced model: the top features patched clean ->
     corrupted at those positions only, recovery of the logit difference with intervals over prompts.

  python -m experiments.sae --preset=quick --out=reports/sae

Writes report.md (findings first), results.json, feature_contexts.html and checkpoints/ under --out.
"""

from jaxcircuits.studies import kit
from jaxcircuits.studies import sae as lib

kit.define_flags(lib.Options)

if __name__ == "__main__":
    kit.run_binary(lib.Options, lib.run)
