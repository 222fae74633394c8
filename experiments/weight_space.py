r"""Weight space of the heads: composition map, spectra, and the low-rank channel check.

  python -m experiments.weight_space --task=colors --n_prompts=8 --out=reports/weight_space

Q/K/V composition scores of every head pair in one compiled call (heat maps, top pairs against a
random-matrix baseline), the OV/QK singular-value spectra of the heads in the top pairs, a Q/K
massive-values profile with the task metric under zeroed top dimensions, and for the top pairs the
Talking-Heads check: the writer's head output patched from a contrast run (each option replaced
by the next one in the prompt, so the answer changes) only within the top-k singular directions
of the writer -> reader link, against random k-dim subspaces of the same rank and the full patch.
Writes report.md, results.json and plots under --out.
"""

from jaxcircuits.studies import weight_space as lib
from jaxcircuits.studies import kit

kit.define_flags(lib.Options)

if __name__ == "__main__":
    kit.run_binary(lib.Options, lib.run)
