"""An IOI head map: each attention head patched alone from clean IOI prompts ("When Mary and John
went to the store, John gave a drink to" -> " Mary") into corrupted ones (three other names),
as a [layers, heads] map of the mean change in logit(IO) - logit(S); written as PNG and
interactive HTML, with the attention patterns of the three strongest heads on the first prompt.

  python examples/ioi_head_map.py --n_prompts=4
"""

import argparse
import os

import jax.numpy as jnp
import numpy as np

import jaxcircuits as jc
from jaxcircuits.reports import plots, viz
from jaxcircuits.interventions import positions as P
from jaxcircuits.studies.common import unpatched_metric
from jaxcircuits.tasks.ioi import corrupt, generate_ioi, ioi_batch


def main(model: str = jc.DEFAULT_MODEL, n_prompts: int = 4, seed: int = 0, out: str = "runs/examples/ioi"):
    """Returns the head map [L, H]; writes head_map.png/.html and attention.png/.html under out/."""
    model = jc.load(model)
    cfg, tok = model.cfg, model.tokenizer
    clean_prompts = generate_ioi(n_prompts, seed, tok)
    clean, corrupted = ioi_batch(clean_prompts, tok), ioi_batch(corrupt(clean_prompts, seed + 1, tok), tok)
    _, cache = model.run_with_cache(clean.ids, clean.mask, sites=("head_out", "pattern"))
    pos_map = P.right_aligned(corrupted.mask, clean.mask)              # same token lengths, by construction
    target = jc.target_run(model.params, cfg, corrupted.ids, corrupted.mask)
    problem = jc.PatchingProblem.make(target, P.align({"head_out": cache["head_out"]}, pos_map),
                                      P.weights("all", pos_map), corrupted.metric)
    one_head_each = jc.Mask(head_out=jnp.eye(cfg.n_layers * cfg.n_heads).reshape(-1, cfg.n_layers, cfg.n_heads))
    patched = jc.run_masks(model.params, cfg, problem, one_head_each).mean(1)
    base = unpatched_metric(model, corrupted.ids, corrupted.mask, corrupted.metric).mean()
    head_map = (patched - base).reshape(cfg.n_layers, cfg.n_heads)
    os.makedirs(out, exist_ok=True)
    plots.plot_head_map(head_map, os.path.join(out, "head_map.png"), "IOI: one head patched clean -> corrupted",
                        "change in logit(IO) - logit(S)")
    viz.head_map_html(head_map, os.path.join(out, "head_map.html"), "change in logit(IO) - logit(S)")
    top = [tuple(int(c) for c in np.unravel_index(i, head_map.shape)) for i in np.argsort(-head_map, None)[:3]]
    tokens = model.to_str_tokens(clean.ids[0])
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
