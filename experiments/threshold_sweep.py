r"""Sweep a family of unit subsets at one site and chart thresholds and redundancy.

  python -m experiments.threshold_sweep --task=decimals --site=head_out --layers=17 --family=all \
      --out=reports/threshold_sweep

Writes report.md, results.json, plots and the resumable sweep (sweep/) under --out.
"""

from jaxcircuits.studies import kit
from jaxcircuits.studies import threshold_sweep as lib

kit.define_flags(lib.Options)

if __name__ == "__main__":
    kit.run_binary(lib.Options, lib.run)
