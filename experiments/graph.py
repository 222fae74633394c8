r"""Attribution graph: the circuit of one prompt over transcoders, checked by intervention.

Steps:

  1. transcoders: loaded from --transcoders (circuit-tracer's set, or SAELens directories), or trained
     on --layers (default 4 evenly spaced) over English Wikipedia lead sections (`dictionaries.corpus`;
     one pass of the model collects every layer's MLP inputs and outputs), checkpointed under
     --out/checkpoints (resumed with --resume); evaluated on held-out rows;
  2. the graph (`methods.graphs`): the local replacement model of --prompt (attention patterns and norm
     scales frozen, an error node per layer and position; layers without a transcoder are error nodes
     whole), edges by vmapped backward passes, circuit-tracer's pruning (--node_threshold,
     --edge_threshold) and scores; the graph files circuit-tracer's server and Neuronpedia read
     (--out/graphs) and a local view (--out/graph.html);
  3. single-node edits (--edits: zero, scale:C, set:V) of the most influential feature nodes in the
     real model (the transcoders spliced with their errors kept), the measured change of the top logit
     against the graph's prediction (with the other features responding, and direct edges only);
  4. a region: every subset of the --region_size most influential features at the last position
     zero-ablated (an exhaustive sweep), against the graph's predictions: fit, additivity, and the
     smallest subsets that carry half and 80% of the logit.

  python -m experiments.graph --preset=quick --out=reports/graph

Writes report.md (findings first), results.json, graph.html, graphs/, region_sweep/ and checkpoints/ under --out.
"""

from jaxcircuits.studies import graph as lib
from jaxcircuits.studies import kit

kit.define_flags(lib.Options)

if __name__ == "__main__":
    kit.run_binary(lib.Options, lib.run)
