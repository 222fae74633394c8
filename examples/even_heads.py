"""Even heads in ten lines: patch every subset of one layer's even-numbered heads from a prompt
format the model answers right ('simple') into one it answers wrong ('qa') on 9.8 vs 9.11, and
tabulate which subsets repair it (metric: logit('8') - logit('1') after " 9.").

  python examples/even_heads.py --layer=17
"""

import argparse

import jaxcircuits as jc
from jaxcircuits.interventions import positions as P
from jaxcircuits.engine.subsets import Pool, all_subsets
from jaxcircuits.tasks import decimals as D


def main(model: str = jc.DEFAULT_MODEL, layer: int = 17, out: str = "runs/examples/even_heads"):
    """The sweep as a table (`SweepResult.to_frame`), best subsets first; also written to out/."""
    model = jc.load(model)
    src = D.build_batch([D.STUDY_PAIR], "simple", model.tokenizer)        # the good format: the source
    tgt = D.build_batch([D.STUDY_PAIR], "qa", model.tokenizer)            # the bad format: patched
    _, cache = model.run_with_cache(src.ids, src.mask, sites=("head_out",))
    pos_map = P.token_matched(tgt.ids, tgt.mask, src.ids, src.mask)       # same tokens, same place
    problem = jc.PatchingProblem.make(jc.target_run(model.params, model.cfg, tgt.ids, tgt.mask),
                                      P.align(cache, pos_map), P.weights("all", pos_map), tgt.metric)
    pool = Pool("head_out", [(layer, h) for h in range(0, model.cfg.n_heads, 2)])
    result = jc.run_sweep(model.params, model.cfg, problem, pool, all_subsets(pool.n), out)
    return result.to_frame(pool).sort_values("metric", ascending=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=jc.DEFAULT_MODEL)
    parser.add_argument("--layer", type=int, default=17)
    parser.add_argument("--out", default="runs/examples/even_heads")
    print(main(**vars(parser.parse_args())).head(10).to_string())
