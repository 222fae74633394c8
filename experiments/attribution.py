r"""Per-head attribution four ways: DLA, attribution patching, integrated gradients, exact patching.

  python -m experiments.attribution --task=ioi --n_prompts=8 --out=reports/attribution

For a source -> target task (IOI clean -> corrupted by default, the decimal formats, or prompt
files) every head's DLA change, attribution-patching and integrated-gradients estimates and exact
single-head patching effect, as fractions of the source - target gap: their rank correlations,
the heads all methods agree on and where they differ, heat maps and scatter plots.
Writes report.md, results.json and plots under --out.
"""

from jaxcircuits.studies import attribution as lib
from jaxcircuits.studies import kit

kit.define_flags(lib.Options)

if __name__ == "__main__":
    kit.run_binary(lib.Options, lib.run)
