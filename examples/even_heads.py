"""Even heads in ten lines: patch every subset of one layer's even-numbered heads from a prompt
format the model answers right ('simple') into one it answers wrong ('qa') on 9.8 vs 9.11, and
tabulate which subsets repair it (metric: logit('8') - logit('1') after " 9.").

  python examples/even_heads.py --layer=17
"""

import argparse

import jaxcircuits as jc
from jaxcircuits.engine.subsets import Pool, all_subsets
from jaxcircuits.studies import kit
from jaxcircuits.tasks import decimals as D
from jaxcircuits.tasks import registry


def main(model: str = jc.DEFAULT_MODEL, layer: int = 17, out: str = "runs/examples/even_heads"):
    """The sweep as a table (`SweepResult.to_frame`), best subsets first; also written to out/."""
    model = jc.load(model)
    task = registry.decimal_batches([D.STUDY_PAIR], "simple", "qa", model.tokenizer)   # good format -> bad one
    problem = kit.problem(model, task, ("head_out",), align="token")                  # same tokens, same place
    pool = Pool("head_out", [(layer, h) for h in range(0, model.cfg.n_heads, 2)])
    result = jc.run_sweep(model.params, model.cfg, problem, pool, all_subsets(pool.n), out)
    return result.to_frame(pool).sort_values("metric", ascending=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=jc.DEFAULT_MODEL)
    parser.add_argument("--layer", type=int, default=17)
    parser.add_argument("--out", default="runs/examples/even_heads")
    print(main(**vars(parser.parse_args())).head(10).to_string())
