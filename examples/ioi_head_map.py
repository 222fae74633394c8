"""An IOI head map: each attention head patched alone from clean IOI prompts ("When Mary and John
went to the store, John gave a drink to" -> " Mary") into corrupted ones (three other names),
as a [layers, heads] map of the mean change in logit(IO) - logit(S); written as PNG and
interactive HTML, with the attention patterns of the three strongest heads on the first prompt.

  python examples/ioi_head_map.py --n_prompts=4
"""

import argparse
import os

import numpy as np

import jaxcircuits as jc
from jaxcircuits.reports import plots, viz
from jaxcircuits.studies import kit
from jaxcircuits.tasks import registry


def main(model: str = jc.DEFAULT_MODEL, n_prompts: int = 4, seed: int = 0, out: str = "runs/examples/ioi"):
    """Returns the head map [L, H]; writes head_map.png/.html and attention.png/.html under out/."""
    model = jc.load(model)
    task = registry.build("ioi", model.tokenizer, registry.TaskSpec(n_prompts=n_prompts, seed=seed))
    problem = kit.problem(model, task, ("head_out",))      # right-aligned: same token lengths, by construction
    corrupted = kit.baselines(model, task)[1].mean()
    head_map = kit.unit_map(model, problem, chunk_size=0).mean(-1) - corrupted           # [layers, heads]
    _, cache = model.run_with_cache(task.source_ids, task.source_attn_mask, sites=("pattern",))   # the clean run
    os.makedirs(out, exist_ok=True)
    plots.plot_head_map(head_map, os.path.join(out, "head_map.png"), "IOI: one head patched clean -> corrupted",
                        "change in logit(IO) - logit(S)")
    viz.head_map_html(head_map, os.path.join(out, "head_map.html"), "change in logit(IO) - logit(S)")
    top = [tuple(int(c) for c in np.unravel_index(i, head_map.shape)) for i in np.argsort(-head_map, None)[:3]]
    tokens = model.to_str_tokens(task.source_ids[0])
    viz.attention_html(cache["pattern"], top, tokens, path=os.path.join(out, "attention.html"))
    viz.attention_png(cache["pattern"], top, tokens, os.path.join(out, "attention.png"))
    return head_map


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=jc.DEFAULT_MODEL)
    parser.add_argument("--n_prompts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/examples/ioi")
    args = parser.parse_args()
    print(np.array2string(main(**vars(args)), precision=2, suppress_small=True))
    print(f"written: {args.out}/head_map.png, head_map.html, attention.png, attention.html")
