"""A custom prompt-pair sweep: your own source and target prompts and answers. Patch every head
and every pair of heads of two layers from source runs into target runs at the last position,
and list the subsets that move the target's answer most toward the source's.

  python examples/prompt_pairs.py --layers=15,20
"""

import argparse

import jaxcircuits as jc
from jaxcircuits.engine.subsets import Pool, of_sizes
from jaxcircuits.studies import kit
from jaxcircuits.tasks import registry

# (source prompt, its answer, target prompt, its answer): metric = logit(source answer) -
# logit(target answer) on the target, > 0 once the patched heads carry the source's fact.
PAIRS = [
    ("The Eiffel Tower is in the city of", " Paris", "The Colosseum is in the city of", " Rome"),
    ("The Brandenburg Gate is in the city of", " Berlin", "The Big Ben clock tower is in the city of", " London"),
]


def main(model: str = jc.DEFAULT_MODEL, layers=(15, 20), out: str = "runs/examples/prompt_pairs"):
    """The sweep as a table (`SweepResult.to_frame`), best subsets first; also written to out/."""
    model = jc.load(model)
    source, source_answer, target, target_answer = zip(*PAIRS)
    task = registry.text_batches(model.tokenizer, (source, target), (source_answer, target_answer))
    problem = kit.problem(model, task, ("head_out",), positions="last")    # right-aligned: last token to last
    pool = Pool.heads_of_layers(layers, model.cfg.n_heads)
    result = jc.run_sweep(model.params, model.cfg, problem, pool, of_sizes(pool.n, [1, 2]), out)
    return result.to_frame(pool).sort_values("metric", ascending=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=jc.DEFAULT_MODEL)
    parser.add_argument("--layers", default="15,20", help="comma-separated layers whose heads are swept")
    parser.add_argument("--out", default="runs/examples/prompt_pairs")
    args = parser.parse_args()
    print(main(args.model, tuple(int(l) for l in args.layers.split(",")), args.out).head(10).to_string())
