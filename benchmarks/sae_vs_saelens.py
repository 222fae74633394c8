"""SAE training and a feature-subset patching sweep: jaxcircuits against SAELens, in one run.

    python -m benchmarks.sae_vs_saelens --saelens_path=/tmp/saevenv/lib/python3.11/site-packages

Needs sae-lens 6.54.12 and transformer-lens 3.9.0 (the `bench` extra of setup.py). Installed in this
interpreter they are used as they are; --saelens_path appends another environment's site-packages
(same Python and torch) to sys.path, after this one's, for the peer. Without sae-lens the run exits
with one line.

The model: a random-weight (seeded) HF GPT-2 with GPT-2 small's shape (12 layers, d = 768), loaded
into jaxcircuits with `load_hf_dir` and into SAELens' `HookedSAETransformer` with TransformerLens'
own weight conversion (no folding), exactly as benchmarks/sweep_vs_peers.py does. Site:
blocks.{layer}.hook_resid_pre ('resid_pre' of --layer). One ReLU SAE kind, one width (--width).

(a) Training throughput (tokens/s). Activations: --harvest_rows rows x --harvest_len random
    tokens run through the model's first --layer layers by jaxcircuits' `stream.ModelActivations`
    (separator positions dropped), held in memory; both tools train on that same array, batch
    --train_batch, --train_steps adam steps, lr 3e-4 constant, grad-norm clip 1, loss
    mse (sum over d, mean over the batch) + --l1 * mean_b sum_i f_i ||W_dec_i|| (SAELens'
    "standard" training SAE = jaxcircuits' 'relu' loss), no b_dec subtraction on input.
      jaxcircuits  `dictionaries.train.train(ArraySource(acts), Options(kind='relu', ...))` (its
                   shuffled buffer, dead-feature tracking and history included)
      SAELens      `SAETrainer(SAETrainerConfig(...), StandardTrainingSAE(...), data_provider).fit()`
                   over an iterator of in-memory batches (no activation store, no wandb, no evals:
                   its fastest path on CPU; dead-feature tracking included)
    Each is called once untimed (compilation, allocator warm-up), then timed; whole calls (init
    included). Where the time goes: the bare step of each (jaxcircuits' compiled step on a device
    batch; SAELens' training_forward_pass + backward + clip + adam) and the matmul floor
    (6 * batch * d * F * 2 FLOPs a step at the machine's measured float32 matmul rate).
    Agreement: on identical params and batch the two losses agree (rel 1e-5), and one adam step from
    identical params gives losses that agree (rel 1e-4).

(b) Feature-subset patching sweep. Target / source = two random prompt batches (--batch x
    --seq_len); the SAE is the one jaxcircuits trained in (a), spliced with its error kept; the pool =
    the --pool features with the largest mean |f_src - f_tgt|; every --k-subset of the pool has its
    features' activations patched from the source at all positions; metric = logit(11) - logit(13)
    at the last position per prompt.
      jaxcircuits  `splice.attach`, then target run + source cache + `run_masks(Mask(features=...))`
                   over all subsets (its time includes the target run and source cache)
      SAELens      `HookedSAETransformer.add_sae(sae, use_error_term=True)`; a hook on
                   blocks.{l}.hook_resid_pre.hook_sae_acts_post replaces the subset's features with
                   the source's; S subsets stacked on the batch axis (per-row feature mask),
                   sae_batched from the tokens, sae_prefix_batched from the target's cached
                   residual at the layer (`start_at_layer`), sae_prefix_last_batched the same,
                   stopped after the last block with the final norm and the two metric columns of
                   the unembedding at the last position only (the strongest loop); sae_loop = S=1.
                   Source cache and prefix excluded (in SAELens' favour). Each runs the first
                   --peer_subsets subsets; its rate is extrapolated.
    Agreement: each SAELens variant's values = jaxcircuits' on those subsets within --atol (fp32),
    else the run fails after writing its results.

(c) Last-position feature-subset sweep: as (b), same model, SAE, prompts and stacks, but each
    subset's features are patched at the last position only, from a pool chosen there (the --pool
    features with the largest mean |f_src - f_tgt| at the last position).
      jaxcircuits  the same `run_masks` with position weights 'last': its fast path starts each
                   masked run from the target's cached residual at the SAE's layer, recomputes the
                   last position only through the remaining layers (the SAE included), reading the
                   earlier positions' keys and values in place from the target's cache, shared by the
                   vmapped masks (`engine.patching`)
      SAELens      sae_kv_last_batched, its strongest usage for this workload: the target's first T-1
                   positions run once (untimed, SAE attached) into TransformerLens' KV cache
                   (`TransformerLensKeyValueCache`: 3.x's HookedTransformerKeyValueCache); each stack of S
                   subsets runs only the last token, from the target's cached residual at the SAE's
                   layer (`start_at_layer`; earlier layers cannot change), through the remaining layers
                   against that cache (repeated S times, frozen, built once per S), the same feature
                   hook, then the final norm and the two unembedding columns: the same computation as
                   jaxcircuits' fast path. Starting from the residual is valid because the patch at the
                   last position changes nothing at earlier positions (causal attention), so their keys
                   and values at every later layer are the target's, which the cache supplies.
                   sae_prefix_last_batched (every position from the layer, the hook patching the last
                   one) shows what the cache saves.

Outputs: a table on stdout, benchmarks/results/sae_vs_saelens-<date>.json, benchmarks/RESULTS_sae.md.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks.peers import use_site_packages
from benchmarks.timing import load_line, machine_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The versions recorded with the results (`timing.environment`).
PACKAGES = ("jax", "jaxlib", "numpy", "torch", "transformers", "transformer-lens", "sae-lens")
GOOD, BAD = 11, 13

FLAGS = flags.FLAGS
flags.DEFINE_string("saelens_path", "", "site-packages directory holding sae-lens 6.54.12 and transformer-lens "
                    "3.9.0, appended to sys.path (empty: this interpreter's own)")
flags.DEFINE_string("gpt2_config", "", "JSON of GPT2Config overrides (tests: a tiny shape); empty: GPT-2 small")
flags.DEFINE_integer("layer", 6, "layer whose hook_resid_pre hosts the SAE")
flags.DEFINE_integer("width", 4096, "SAE features F")
flags.DEFINE_float("l1", 5.0, "L1 coefficient (both tools)")
flags.DEFINE_integer("harvest_rows", 128, "token rows harvested for training")
flags.DEFINE_integer("harvest_len", 128, "tokens per harvested row")
flags.DEFINE_integer("train_batch", 4096, "activations per training step")
flags.DEFINE_integer("train_steps", 20, "timed training steps per tool")
flags.DEFINE_integer("batch", 8, "prompts of the sweep")
flags.DEFINE_integer("seq_len", 24, "tokens per sweep prompt")
flags.DEFINE_integer("pool", 16, "features in the sweep's pool")
flags.DEFINE_integer("k", 2, "features per subset")
flags.DEFINE_integer("peer_subsets", 32, "subsets each SAELens variant runs per repetition (extrapolated)")
flags.DEFINE_list("stacks", ["8", "16", "32"], "stack sizes S tried for each batched SAELens variant (one stack "
                  "each, after a warm-up); the fastest per subset is timed")
flags.DEFINE_integer("chunk_size", 64, "jaxcircuits masks per compiled call")
flags.DEFINE_integer("reps", 3, "timed repetitions of each sweep method (median)")
flags.DEFINE_integer("seed", 0, "seed of weights, tokens and SAE init")
flags.DEFINE_float("atol", 1e-3, "max |SAELens - jaxcircuits| of the sweep's metric values")
flags.DEFINE_list("workloads", ["all", "last"], "feature-subset sweeps run: patched at all positions (b), at the "
                  "last position only (c)")
flags.DEFINE_list("sweep_peers", ["sae_loop", "sae_batched", "sae_prefix_batched", "sae_prefix_last_batched"],
                  "SAELens variants of the all-position sweep (b)")
flags.DEFINE_list("last_peers", ["sae_prefix_last_batched", "sae_kv_last_batched"],
                  "SAELens variants of the last-position sweep (c)")
flags.DEFINE_string("out_dir", os.path.join(REPO, "benchmarks", "results"), "JSON results directory")
flags.DEFINE_string("results_md", os.path.join(REPO, "benchmarks", "RESULTS_sae.md"), "markdown report ('' to skip)")
flags.DEFINE_string("render_json", "", "only re-render --results_md from this results JSON")
flags.DEFINE_string("note", "", "the run's conditions in a sentence, kept in the JSON and the report")


def import_peers():
    """sae_lens and torch, or exit with one line."""
    use_site_packages(FLAGS.saelens_path, "saelens_path")
    try:
        import sae_lens  # noqa: F401
        import transformer_lens  # noqa: F401
    except ImportError as e:
        sys.exit(f"sae_vs_saelens needs sae-lens==6.54.12 and transformer-lens==3.9.0 (pip install -e '.[bench]', "
                 f"or --saelens_path=<their site-packages>): {e}")


# --------------------------------------------------------------------------- setup
def build_models():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from jaxcircuits.weights.hf import load_hf_dir

    torch.manual_seed(FLAGS.seed)
    hf = GPT2LMHeadModel(GPT2Config(**json.loads(FLAGS.gpt2_config or "{}"))).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        cfg, params = load_hf_dir(d)
    return hf, cfg, jax.tree.map(jnp.asarray, params)


def hooked_sae_transformer(hf_model):
    """benchmarks.peers.hooked_transformer, as SAELens' HookedSAETransformer."""
    from sae_lens import HookedSAETransformer
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    from benchmarks.peers import tl_config

    tcfg = tl_config(hf_model.config)
    model = HookedSAETransformer(tcfg)
    state = {k: v.detach().clone() for k, v in convert_gpt2_weights(hf_model, tcfg).items()}
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model.eval()


def to_torch_params(p: dict):
    import torch
    return {"W_enc": torch.tensor(np.asarray(p["w_enc"])), "b_enc": torch.tensor(np.asarray(p["b_enc"])),
            "W_dec": torch.tensor(np.asarray(p["w_dec"])), "b_dec": torch.tensor(np.asarray(p["b_dec"]))}


def saelens_training_sae(d: int, params=None):
    import torch
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig

    torch.manual_seed(FLAGS.seed)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=FLAGS.width, l1_coefficient=FLAGS.l1,
                                                        apply_b_dec_to_input=False, normalize_activations="none"))
    if params is not None:
        sae.load_state_dict(to_torch_params(params))
    return sae


def saelens_trainer(sae, acts_t, steps: int):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    B = FLAGS.train_batch

    def provider():
        i = 0
        while True:
            idx = (np.arange(B) + i * B) % len(acts_t)
            yield acts_t[idx]
            i += 1
    cfg = SAETrainerConfig(total_training_samples=steps * B, train_batch_size_samples=B, lr=3e-4, lr_end=3e-4, device="cpu")
    return SAETrainer(cfg, sae, provider())


# --------------------------------------------------------------------------- (a) training
def training_part(params, cfg, result):
    import torch
    from jaxcircuits.dictionaries import stream, train

    L, F, B = FLAGS.layer, FLAGS.width, FLAGS.train_batch
    rng = np.random.default_rng(FLAGS.seed)
    tokens = rng.integers(1, cfg.vocab_size, (FLAGS.harvest_rows, FLAGS.harvest_len)).astype(np.int32)
    tokens[:, 0] = 0
    src_model = stream.ModelActivations(params, cfg, tokens, "resid_pre", L, separator=0, rows_per_chunk=16)
    t = time.perf_counter()
    acts = np.concatenate([src_model.chunk(i) for i in range(FLAGS.harvest_rows // 16)])
    harvest_s = time.perf_counter() - t
    d = acts.shape[1]
    print(f"harvested {len(acts)} activations [{d}] in {harvest_s:.1f} s (jaxcircuits ModelActivations, "
          f"incl. compile)", flush=True)
    source = stream.ArraySource(acts, d_in=d, rows=B, seed=FLAGS.seed)
    acts_t = torch.tensor(acts)

    def options(steps):
        return train.Options(kind="relu", width=F, sparsity=FLAGS.l1, lr=3e-4, steps=steps, batch=B, buffer=4 * B,
                             seed=FLAGS.seed, checkpoint_every=steps, decay=0.0, clip=1.0)

    # agreement: same loss on the same params and batch; one step from the same params
    o = options(FLAGS.train_steps)
    dc = o.config(d)
    p0 = jax.tree.map(np.asarray, train.core.init(dc, jax.random.PRNGKey(FLAGS.seed)))
    p0["b_dec"] = acts.mean(0)
    p0["b_enc"] = np.full(F, -0.05, np.float32)
    x = acts[:B]
    dead = jnp.zeros(F, bool)
    jc_loss = float(train._relu_loss(dc, o, jax.tree.map(jnp.asarray, p0), jnp.asarray(x), jnp.asarray(x), dead)[0])
    sae = saelens_training_sae(d, p0)
    trainer = saelens_trainer(sae, acts_t, FLAGS.train_steps)
    from sae_lens.saes.sae import TrainStepInput
    with torch.no_grad():
        sl_loss = float(sae.training_forward_pass(TrainStepInput(torch.tensor(x), {"l1": FLAGS.l1}, None, 0, False)).loss)
    state = train.TrainState(jax.tree.map(jnp.asarray, p0), train.optimizer(o).init(jax.tree.map(jnp.asarray, p0)),
                             jnp.zeros(F, jnp.int32))
    step = jax.jit(lambda s, b: train._train_step(dc, o, 10 ** 9, s, b))
    state1, _ = step(state, jnp.asarray(x))
    jc_loss1 = float(train._relu_loss(dc, o, state1.params, jnp.asarray(x), jnp.asarray(x), dead)[0])
    trainer._train_step(sae, torch.tensor(x))
    with torch.no_grad():
        sl_loss1 = float(sae.training_forward_pass(TrainStepInput(torch.tensor(x), {"l1": FLAGS.l1}, None, 0, False)).loss)
    agree = {"loss_same_params": [jc_loss, sl_loss], "loss_after_one_step": [jc_loss1, sl_loss1],
             "rel_diff_same_params": abs(jc_loss - sl_loss) / abs(sl_loss),
             "rel_diff_after_one_step": abs(jc_loss1 - sl_loss1) / abs(sl_loss1)}
    agree["ok"] = agree["rel_diff_same_params"] <= 1e-5 and agree["rel_diff_after_one_step"] <= 1e-4
    print(f"training agreement: loss {jc_loss:.6g} vs {sl_loss:.6g}, after one adam step {jc_loss1:.6g} vs "
          f"{sl_loss1:.6g} ({'ok' if agree['ok'] else 'MISMATCH'})", flush=True)

    n = FLAGS.train_steps
    tokens_n = n * B

    # jaxcircuits: warm call (compiles), then timed
    train.train(source, o)
    t = time.perf_counter()
    trained = train.train(source, o)
    jc_s = time.perf_counter() - t
    # bare compiled step on a device batch
    xb = jnp.asarray(x)
    s = state
    s, h = step(s, xb)
    jax.block_until_ready(h)
    t = time.perf_counter()
    for _ in range(n):
        s, h = step(s, xb)
    jax.block_until_ready(h)
    jc_step_s = (time.perf_counter() - t) / n

    # SAELens: warm call, then timed
    saelens_trainer(saelens_training_sae(d), acts_t, 2).fit()
    t = time.perf_counter()
    saelens_trainer(saelens_training_sae(d), acts_t, n).fit()
    sl_s = time.perf_counter() - t
    sae = saelens_training_sae(d, p0)
    tr = saelens_trainer(sae, acts_t, n)
    xt = torch.tensor(x)
    tr._train_step(sae, xt)
    t = time.perf_counter()
    for _ in range(n):
        tr._train_step(sae, xt)
    sl_step_s = (time.perf_counter() - t) / n

    gflops = timing.matmul_gflops(reps=5)
    flops_step = 6 * B * d * F * 2
    floor_s = flops_step / (gflops * 1e9)
    out = {"activations": int(len(acts)), "d": d, "width": F, "batch": B, "steps": n, "l1": FLAGS.l1,
           "harvest_s_incl_compile": harvest_s, "agreement": agree,
           "jaxcircuits": {"wall_s": jc_s, "tokens_per_s": tokens_n / jc_s, "bare_step_s": jc_step_s,
                           "final_loss": float(trained.history["loss"][-1])},
           "saelens": {"wall_s": sl_s, "tokens_per_s": tokens_n / sl_s, "bare_step_s": sl_step_s},
           "matmul_gflops": gflops, "flops_per_step": flops_step, "floor_step_s": floor_s}
    out["ratio"] = out["jaxcircuits"]["tokens_per_s"] / out["saelens"]["tokens_per_s"]
    result["training"] = out
    print(f"training: jaxcircuits {out['jaxcircuits']['tokens_per_s']:.0f} tok/s, SAELens "
          f"{out['saelens']['tokens_per_s']:.0f} tok/s: {out['ratio']:.2f}x; bare steps {jc_step_s:.3f} s vs "
          f"{sl_step_s:.3f} s; matmul floor {floor_s:.3f} s/step ({gflops:.0f} GFLOP/s)", flush=True)
    return trained.params, d


# --------------------------------------------------------------------------- (b, c) sweeps
def logit_diff(model, resid_last):
    """logit(GOOD) - logit(BAD) [N] from the residual after the last block at the last position
    [N, D]: the final norm, then the two unembedding columns only."""
    h = model.ln_final(resid_last[:, None])[:, 0]
    w, b = model.unembed.W_U[:, [GOOD, BAD]], model.unembed.b_U[[GOOD, BAD]]
    out = h @ w + b
    return out[:, 0] - out[:, 1]


class SAELensSweep:
    """HookedSAETransformer with the SAE attached (error term kept); `run(subsets)` -> [n, B]: each
    subset's features replaced by the source's at the positions `at` (bool [T]) by a hook on the SAE's
    hook_sae_acts_post, S = `stack` subsets stacked along the batch axis (prompt-major).

    prefix: start from the target's cached residual at the layer (`start_at_layer`), else from the
    tokens; last_only: stop after the last block and unembed the last position's two logits
    (`logit_diff`), else the full logits at every position."""

    def __init__(self, model, hook, tgt, src, at, layer: int, stack: int = 1, prefix: bool = False,
                 last_only: bool = False):
        import torch
        self.model, self.hook, self.stack, self.prefix, self.last_only = model, hook, stack, prefix, last_only
        self.tgt, self.src = torch.as_tensor(tgt, dtype=torch.long), torch.as_tensor(src, dtype=torch.long)
        self.at, self.layer = torch.as_tensor(at, dtype=torch.bool), layer

    def prepare(self):
        import torch
        with torch.inference_mode():
            _, cache = self.model.run_with_cache(self.src, names_filter=self.hook)
            self.src_f = cache[self.hook]
            self.resid = self.model(self.tgt, stop_at_layer=self.layer) if self.prefix else None

    def forward(self, hooks, S: int):
        """logit(GOOD) - logit(BAD) [B * S] at the last position of the target repeated S times."""
        inp = (self.resid if self.prefix else self.tgt).repeat_interleave(S, 0)
        kw = {"start_at_layer": self.layer} if self.prefix else {}
        if not self.last_only:
            last = self.model.run_with_hooks(inp, fwd_hooks=hooks, **kw)[:, -1]
            return last[:, GOOD] - last[:, BAD]
        resid = self.model.run_with_hooks(inp, fwd_hooks=hooks, stop_at_layer=self.model.cfg.n_layers, **kw)
        return logit_diff(self.model, resid[:, -1])

    def run(self, subsets):
        import torch
        B, F = self.tgt.shape[0], self.src_f.shape[-1]
        out = []
        with torch.inference_mode():
            for i in range(0, len(subsets), self.stack):
                chunk = subsets[i:i + self.stack]
                S = len(chunk)
                keep = torch.zeros(S, F, dtype=torch.bool)
                for j, s in enumerate(chunk):
                    keep[j, list(s)] = True

                def hook(acts, hook):
                    t = acts.shape[1]                     # the positions this forward runs: the last t
                    put = keep[None, :, None, :] & self.at[-t:, None]
                    return torch.where(put, self.src_f[:, None, -t:], acts.reshape(B, S, t, F)).reshape(acts.shape)
                out.append(self.forward([(self.hook, hook)], S).reshape(B, S).T.numpy())
        return np.concatenate(out)


class SAELensKV(SAELensSweep):
    """Last-position patching with TransformerLens' KV cache: the target's first T-1 positions run once
    (untimed, SAE attached) into a `TransformerLensKeyValueCache` (TransformerLens 3.x's HookedTransformerKeyValueCache);
    each stack runs only the last position, from the target's cached residual at the SAE's layer
    (`start_at_layer`), through the remaining layers against that cache (repeated S times and frozen,
    built once per S), then `logit_diff`."""

    def __init__(self, model, hook, tgt, src, at, layer: int, stack: int = 1):
        super().__init__(model, hook, tgt, src, at, layer, stack, prefix=True, last_only=True)
        if self.at.nonzero().flatten().tolist() != [len(self.at) - 1]:
            raise ValueError("SAELensKV patches the last position only")

    def prepare(self):
        import torch
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        super().prepare()
        self.resid = self.resid[:, -1:]
        B, T = self.tgt.shape
        with torch.inference_mode():
            cache = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.model.cfg.device, B)
            self.model(self.tgt[:, :-1], past_kv_cache=cache, attention_mask=torch.ones(B, T - 1, dtype=torch.long))
        self.kv = [(e.past_keys, e.past_values) for e in cache.entries]
        self.caches = {}

    def cache(self, S: int):
        """The prefix's cache repeated S times (prompt-major), frozen; layers before the SAE's, which
        this run never reaches, hold None."""
        import torch
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry as Entry

        if S not in self.caches:
            entries = [Entry(k.repeat_interleave(S, 0), v.repeat_interleave(S, 0), frozen=True) if i >= self.layer
                       else None for i, (k, v) in enumerate(self.kv)]
            mask = torch.ones(self.tgt.shape[0] * S, self.tgt.shape[1] - 1, dtype=torch.long)
            self.caches[S] = TransformerLensKeyValueCache(entries, mask, frozen=True)
        return self.caches[S]

    def forward(self, hooks, S: int):
        resid = self.model.run_with_hooks(self.resid.repeat_interleave(S, 0), fwd_hooks=hooks, start_at_layer=self.layer,
                                          stop_at_layer=self.model.cfg.n_layers, past_kv_cache=self.cache(S))
        return logit_diff(self.model, resid[:, -1])


# name: (the position selectors it can patch, its constructor from (model, hook, tgt, src, at, layer));
# sae_loop runs one subset a forward, the others a tuned stack of S
SAELENS_VARIANTS = {
    "sae_loop": (("all", "last"), SAELensSweep),
    "sae_batched": (("all", "last"), SAELensSweep),
    "sae_prefix_batched": (("all", "last"), lambda *a: SAELensSweep(*a, prefix=True)),
    "sae_prefix_last_batched": (("all", "last"), lambda *a: SAELensSweep(*a, prefix=True, last_only=True)),
    "sae_kv_last_batched": (("last",), SAELensKV),
}


def saelens_breakdown(model, tgt, layer: int, n_layers: int, stack: int, reps: int = 3) -> dict:
    """Median seconds of one stacked (S = stack) forward from the layer's cached residual: with the SAE
    (no patch hook), without the final norm and unembedding (stop_at_layer), and without the SAE."""
    import torch
    with torch.inference_mode():
        resid = model(torch.as_tensor(tgt, dtype=torch.long), stop_at_layer=layer).repeat_interleave(stack, 0)

        def med(fn):
            fn()
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return float(np.median(ts))
        full = med(lambda: model(resid, start_at_layer=layer))
        no_unembed = med(lambda: model(resid, start_at_layer=layer, stop_at_layer=n_layers))
        model.reset_saes()
        no_sae = med(lambda: model(resid, start_at_layer=layer))
    return {"stack": stack, "forward_s": full, "sae_s": full - no_sae, "unembed_s": full - no_unembed,
            "layers_s": no_unembed - (full - no_sae)}


def subset_flops(cfg, layer: int, width: int, batch: int, seq: int, recomputed: int) -> int:
    """Matmul FLOPs of one patched run in jaxcircuits' path: layers layer.. over the last `recomputed`
    positions of `batch` prompts (per position and layer 24 D^2 of projections and MLP, 4 seq D of
    attention against every key), the SAE's encode and decode there (4 D F); the unembedding (2
    columns) and elementwise ops not counted."""
    D = cfg.d_model
    return batch * recomputed * ((cfg.n_layers - layer) * (24 * D * D + 4 * seq * D) + 4 * D * width)


def feature_pool(f_src, f_tgt, at) -> list:
    """The --pool features with the largest mean |f_src - f_tgt| over prompts and the positions `at`
    (bool [T]); f: [B, T, F]."""
    diff = np.abs(np.asarray(f_src) - np.asarray(f_tgt))[:, np.asarray(at)].mean((0, 1))
    return [int(i) for i in np.argsort(-diff)[:FLAGS.pool]]


def sweep_workload(where: str, names, p2, c2, model, acts_hook, tgt, src, f_src, f_tgt) -> tuple:
    """One feature-subset sweep, patched at the positions of selector `where` ('all', 'last'):
    jaxcircuits' `run_masks` and each named SAELens variant, interleaved --reps times. Returns (its
    results dict, the agreement failures)."""
    from jaxcircuits.engine.patching import run_masks
    from jaxcircuits.interventions import positions as P
    from jaxcircuits.interventions.metrics import LogitDiff
    from jaxcircuits.interventions.problem import PatchingProblem, target_run
    from jaxcircuits.interventions.sites import Mask
    from jaxcircuits.models.transformer import forward

    L, F = FLAGS.layer, FLAGS.width
    pos_w = P.select(where, np.ones(tgt.shape))
    at = pos_w[0] > 0
    pool = feature_pool(f_src, f_tgt, at)
    subsets = [tuple(pool[i] for i in c) for c in itertools.combinations(range(FLAGS.pool), FLAGS.k)]
    N = len(subsets)
    m = np.zeros((N, c2.n_layers, F), np.float32)
    for i, s in enumerate(subsets):
        m[i, L, list(s)] = 1
    masks = Mask(features=m)
    metric = LogitDiff(good=jnp.full((FLAGS.batch, 1), GOOD, jnp.int32), bad=jnp.full((FLAGS.batch, 1), BAD, jnp.int32))

    def problem():                              # the target run and the source cache (no logits)
        target = target_run(p2, c2, tgt)
        _, cache = forward(p2, c2, src, collect=("features",), return_logits=False)
        return PatchingProblem.make(target, {"features": cache["features"]}, pos_w, metric)

    jc_sweep = lambda: run_masks(p2, c2, problem(), masks, chunk_size=FLAGS.chunk_size, shard=False)
    jax.clear_caches()
    t = time.perf_counter()
    jc_vals = np.asarray(jc_sweep())
    jc_first = time.perf_counter() - t
    print(f"[{where}] jaxcircuits first sweep call (compile + run, {N} subsets): {jc_first:.1f} s", flush=True)

    peers = {}
    n_peer = min(FLAGS.peer_subsets, N)
    stacks = sorted({min(int(x), n_peer) for x in FLAGS.stacks})
    for name in names:
        if where not in SAELENS_VARIANTS.get(name, ((),))[0]:
            raise app.UsageError(f"SAELens variant {name!r} cannot patch positions {where!r} (variants: "
                                 f"{ {k: v[0] for k, v in SAELENS_VARIANTS.items()} })")
        peer = SAELENS_VARIANTS[name][1](model, acts_hook, tgt, src, at, L)
        peer.prepare()
        peer.run(subsets[:1])                                          # warm-up
        tuning = {}
        if name != "sae_loop":
            for S in stacks:
                peer.stack = S
                t = time.perf_counter()
                peer.run(subsets[:S])
                tuning[S] = (time.perf_counter() - t) / S
            peer.stack = min(tuning, key=tuning.get)
            print(f"[{where}] {name}: seconds a subset by S {({k: round(v, 4) for k, v in tuning.items()})}: "
                  f"S = {peer.stack}", flush=True)
        peers[name] = {"peer": peer, "stack": peer.stack, "times": [], "tuning": tuning}
    jc_times = []
    for rep in range(FLAGS.reps):
        t = time.perf_counter()
        jc_sweep()
        jc_times.append(time.perf_counter() - t)
        for name, p in peers.items():
            t = time.perf_counter()
            p["values"] = p["peer"].run(subsets[:n_peer])
            p["times"].append(time.perf_counter() - t)
        print(f"[{where}] rep {rep}: jaxcircuits {jc_times[-1]:.2f} s; " +
              ", ".join(f"{k} {v['times'][-1]:.2f} s" for k, v in peers.items()), flush=True)

    setup_times = []
    for _ in range(FLAGS.reps):
        t = time.perf_counter()
        jax.block_until_ready(problem())
        setup_times.append(time.perf_counter() - t)
    jc_s = float(np.median(jc_times))
    T = tgt.shape[1]
    recomputed = T - int(np.flatnonzero(at)[0])
    out = {"where": where, "subsets": N, "pool": pool, "k": FLAGS.k, "batch": FLAGS.batch, "seq_len": FLAGS.seq_len,
           "chunk_size": FLAGS.chunk_size, "recomputed_positions": recomputed, "setup_s": float(np.median(setup_times)),
           "jaxcircuits": {"first_call_s": jc_first, "median_s": jc_s, "times": jc_times, "subsets_per_s": N / jc_s},
           "saelens": {}, "metric_range": [float(jc_vals.min()), float(jc_vals.max())],
           "flops_per_subset": subset_flops(c2, L, F, FLAGS.batch, T, recomputed)}
    failures = []
    for name, p in peers.items():
        s = float(np.median(p["times"]))
        err = float(np.abs(p["values"] - jc_vals[:n_peer]).max())
        out["saelens"][name] = {"stack": p["stack"], "stack_tuning_s_per_subset": p["tuning"], "subsets": n_peer,
                                "median_s": s, "times": p["times"], "subsets_per_s": n_peer / s, "max_abs_diff": err,
                                "jaxcircuits_ratio": (N / jc_s) / (n_peer / s)}
        if not err <= FLAGS.atol:
            failures.append(f"{where}/{name}: max |diff| {err:.3g} > atol {FLAGS.atol}")
    if out["saelens"]:
        best = max(out["saelens"], key=lambda k: out["saelens"][k]["subsets_per_s"])
        out["strongest_peer"], out["ratio"] = best, out["saelens"][best]["jaxcircuits_ratio"]
    return out, failures


def sweep_part(hf, params, cfg, sae_params, d, result):
    """(b) all positions and (c) the last position: `sweep_workload` of each, on one spliced model."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from jaxcircuits.dictionaries import splice
    from jaxcircuits.dictionaries.core import DictConfig, Dictionary
    from jaxcircuits.engine.patching import run_masks
    from jaxcircuits.interventions import positions as P
    from jaxcircuits.interventions.metrics import LogitDiff
    from jaxcircuits.interventions.problem import PatchingProblem, target_run
    from jaxcircuits.interventions.sites import Mask
    from jaxcircuits.models.transformer import forward, run_with_cache

    L, F = FLAGS.layer, FLAGS.width
    rng = np.random.default_rng(FLAGS.seed + 1)
    tgt = rng.integers(0, cfg.vocab_size, (FLAGS.batch, FLAGS.seq_len)).astype(np.int32)
    src = rng.integers(0, cfg.vocab_size, (FLAGS.batch, FLAGS.seq_len)).astype(np.int32)
    sae_params = {k: jnp.asarray(v) for k, v in sae_params.items()}
    p2, c2 = splice.attach(params, cfg, [Dictionary(DictConfig("relu", d, F), sae_params, "resid_pre", L)])
    f_src, f_tgt = (forward(p2, c2, x, collect=("features",), return_logits=False)[1]["features"][L] for x in (src, tgt))

    model = hooked_sae_transformer(hf)
    hook_name = f"blocks.{L}.hook_resid_pre"
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=F, apply_b_dec_to_input=False,
                                        metadata=SAEMetadata(hook_name=hook_name)))
    sae.load_state_dict(to_torch_params(sae_params))
    model.add_sae(sae, use_error_term=True)
    acts_hook = f"{hook_name}.hook_sae_acts_post"
    # the unpatched spliced logits agree (both keep the error)
    with torch.inference_mode():
        tl_logits = model(torch.as_tensor(tgt, dtype=torch.long)).numpy()
    jc_logits = np.asarray(forward(p2, c2, jnp.asarray(tgt))[0])
    logits_diff = float(np.abs(tl_logits - jc_logits).max())

    failures = []
    for where, key, names in (("all", "sweep", FLAGS.sweep_peers), ("last", "sweep_last", FLAGS.last_peers)):
        if where not in FLAGS.workloads:
            continue
        out, fails = sweep_workload(where, names, p2, c2, model, acts_hook, tgt, src, f_src, f_tgt)
        out["spliced_logits_max_abs_diff"] = logits_diff
        result[key] = out
        failures += fails
    if "sweep" not in result:
        return failures

    # jaxcircuits' path without the dictionary: the same N masks on the plain model's head_out at layer L
    # (one head each, cycling), the same chunking: what the layers after L cost without the splice
    out = result["sweep"]
    N = out["subsets"]
    hm = np.zeros((N, cfg.n_layers, cfg.n_heads), np.float32)
    hm[np.arange(N), L, np.arange(N) % cfg.n_heads] = 1
    metric = LogitDiff(good=jnp.full((FLAGS.batch, 1), GOOD, jnp.int32), bad=jnp.full((FLAGS.batch, 1), BAD, jnp.int32))
    _, hcache = run_with_cache(params, cfg, src, sites=("head_out",))
    hprob = PatchingProblem.make(target_run(params, cfg, tgt), {"head_out": hcache["head_out"]},
                                 P.select("all", np.ones(tgt.shape)), metric)
    plain = lambda: run_masks(params, cfg, hprob, Mask(head_out=hm), chunk_size=FLAGS.chunk_size, shard=False)
    plain()
    plain_times = []
    for _ in range(FLAGS.reps):
        t = time.perf_counter()
        plain()
        plain_times.append(time.perf_counter() - t)
    out["jaxcircuits_plain_head_out_median_s"] = float(np.median(plain_times))
    stack = out["saelens"].get("sae_prefix_batched", {}).get("stack", max(int(s) for s in FLAGS.stacks))
    out["saelens_prefix_forward_breakdown"] = saelens_breakdown(model, tgt, L, cfg.n_layers, stack)
    return failures


# --------------------------------------------------------------------------- report
def times(r: float) -> str:
    return f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower"


def render(r: dict) -> str:
    tr = r["training"]
    lines = [f"# SAE training and feature-subset patching: jaxcircuits vs SAELens ({r['date']})", "",
             r["load_line"], "", "Command:", "", f"    {r['command']}", ""]
    if r.get("note"):
        lines += [f"Note: {r['note']}", ""]
    lines += [f"Model: random-weight GPT-2 (GPT2Config defaults = GPT-2 small's shape, 12 layers, d = 768; overrides "
              f"{r['gpt2_config'] or 'none'}), site blocks.{r['layer']}.hook_resid_pre, "
              f"ReLU SAE (L1 weighted by decoder norms, coefficient {tr['l1']}), width {tr['width']}. "
              f"Versions: {json.dumps(r['environment'])}.", "",
              "## (a) Training throughput", "",
              f"{tr['activations']} activations harvested by jaxcircuits' `ModelActivations` (random tokens), held in "
              f"memory; batch {tr['batch']}, {tr['steps']} timed adam steps per tool, whole calls (init included).", "",
              "| tool | wall s | tokens/s | bare step s |", "|---|---:|---:|---:|",
              f"| jaxcircuits `train.train` (ArraySource, buffer) | {tr['jaxcircuits']['wall_s']:.2f} | "
              f"{tr['jaxcircuits']['tokens_per_s']:.0f} | {tr['jaxcircuits']['bare_step_s']:.3f} |",
              f"| SAELens `SAETrainer.fit` (StandardTrainingSAE) | {tr['saelens']['wall_s']:.2f} | "
              f"{tr['saelens']['tokens_per_s']:.0f} | {tr['saelens']['bare_step_s']:.3f} |", "",
              f"**jaxcircuits / SAELens: {tr['ratio']:.2f}x** (goal >= 3x). Matmul floor "
              f"{tr['floor_step_s']:.3f} s/step ({tr['flops_per_step'] / 1e9:.0f} GFLOP at {tr['matmul_gflops']:.0f} "
              f"GFLOP/s): jaxcircuits' bare step is {tr['floor_step_s'] / tr['jaxcircuits']['bare_step_s']:.0%} of it, "
              f"SAELens' {tr['floor_step_s'] / tr['saelens']['bare_step_s']:.0%}: a dense SAE step is its six matmuls, so "
              f"no implementation can train more than {tr['saelens']['wall_s'] / tr['steps'] / tr['floor_step_s']:.1f}x "
              f"faster than SAELens here.", "",
              f"Agreement: loss on identical params and batch {tr['agreement']['loss_same_params'][0]:.6g} vs "
              f"{tr['agreement']['loss_same_params'][1]:.6g} (rel {tr['agreement']['rel_diff_same_params']:.1e}); "
              f"after one adam step from identical params {tr['agreement']['loss_after_one_step'][0]:.6g} vs "
              f"{tr['agreement']['loss_after_one_step'][1]:.6g} (rel {tr['agreement']['rel_diff_after_one_step']:.1e}).",
              ""]
    for key, title in SWEEPS:
        if key in r:
            lines += sweep_section(r, r[key], title)
    lines += ["## Where the time goes", ""] + [f"- {w}" for w in r["where"]]
    return "\n".join(lines) + "\n"


# the sweeps' results keys and report sections
SWEEPS = (("sweep", "(b) Feature-subset patching sweep"), ("sweep_last", "(c) Last-position feature-subset patching sweep"))


def patched_where(sw: dict) -> str:
    return "at all positions" if sw.get("where", "all") == "all" else "at the last position only"


def floor_what(r: dict, sw: dict) -> str:
    """What one subset's matmul floor counts."""
    layers = f"layers {r['layer']}-{r['n_layers'] - 1}"
    if sw.get("where", "all") == "all":
        return f"{layers} over all positions and one SAE"
    return f"{layers} and one SAE at the last position, attending to all {sw['seq_len']} keys"


def sweep_section(r: dict, sw: dict, title: str) -> list:
    """The report's lines of one sweep workload (`sweep_workload`'s results)."""
    lines = [f"## {title}", "",
             f"{sw['batch']} prompts x {sw['seq_len']} tokens; all {sw['subsets']} {sw['k']}-feature subsets of a "
             f"{len(sw['pool'])}-feature pool (the largest mean |f_src - f_tgt| there) patched from the source "
             f"{patched_where(sw)} (SAE spliced, error kept); logit difference at the last position (values in "
             f"[{sw['metric_range'][0]:.3g}, {sw['metric_range'][1]:.3g}]). Spliced unpatched logits of the two differ "
             f"by at most {sw['spliced_logits_max_abs_diff']:.2g}.", "",
             "| method | S | subsets timed | median s | subsets/s | jaxcircuits is | max abs diff |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| jaxcircuits `run_masks` (chunk {sw['chunk_size']}) | - | {sw['subsets']} | "
             f"{sw['jaxcircuits']['median_s']:.2f} | {sw['jaxcircuits']['subsets_per_s']:.1f} | - | - |"]
    for name, p in sw["saelens"].items():
        lines.append(f"| SAELens {name} | {p['stack']} | {p['subsets']} | {p['median_s']:.2f} | "
                     f"{p['subsets_per_s']:.2f} | {times(p['jaxcircuits_ratio'])} | {p['max_abs_diff']:.1e} |")
    lines.append("")
    if "strongest_peer" in sw:
        ideal = sw["flops_per_subset"] / (r["training"]["matmul_gflops"] * 1e9)
        best_s = 1 / sw["saelens"][sw["strongest_peer"]]["subsets_per_s"]
        lines += [f"**Against SAELens' strongest variant ({sw['strongest_peer']}): {sw['ratio']:.2f}x, i.e. jaxcircuits "
                  f"is {times(sw['ratio'])}** (goal >= 10x). That variant takes {best_s * 1e3:.1f} ms a subset, "
                  f"{best_s / ideal:.1f}x the matmul floor of the computation itself ({ideal * 1e3:.2f} ms: "
                  f"{floor_what(r, sw)}), so no implementation can beat it by more than {best_s / ideal:.1f}x on this "
                  f"CPU at this shape. jaxcircuits' first call (compile + run) {sw['jaxcircuits']['first_call_s']:.1f} s.",
                  ""]
    return lines


def saelens_costs(name: str, where: str) -> str:
    """What one forward of SAELens variant `name` computes."""
    if name == "sae_kv_last_batched":
        return ("the last position only, from the SAE's layer (start_at_layer) against TransformerLens' KV cache "
                "of the first T-1 positions (repeated S times, built once per S), the SAE encoded twice there, the "
                "final norm and two unembedding columns.")
    return (("every layer from the embedding, " if not name.startswith("sae_prefix") else
             "layers from the SAE's on (start_at_layer), ")
            + f"at every position (the hook patching {'every position' if where == 'all' else 'the last one'}), "
            + "the SAE encoded twice (the hooked pass and the error term's clean pass), "
            + ("the final norm and two unembedding columns at the last position only." if name.endswith("last_batched")
               else "the final norm and full unembedding at every position."))


def where(r: dict):
    tr = r["training"]
    jc, sl = tr["jaxcircuits"], tr["saelens"]
    per_step_jc, per_step_sl = jc["wall_s"] / tr["steps"], sl["wall_s"] / tr["steps"]
    share = jc['bare_step_s'] / per_step_jc
    out = [f"Training, jaxcircuits: {per_step_jc:.3f} s a step in `train.train`, its compiled step alone "
           f"{jc['bare_step_s']:.3f} s ({share:.0%}): "
           + ("the shuffled buffer, transfers and init add nothing measurable; " if share >= 0.95 else
              "the rest is the shuffled buffer (host copies and shuffles), host-to-device transfer and init; ")
           + f"the step runs at {tr['floor_step_s'] / jc['bare_step_s']:.0%} of the matmul floor.",
           f"Training, SAELens: {per_step_sl:.3f} s a step in `SAETrainer.fit`, of which its bare step (forward, "
           f"backward, clip, adam, dead-feature counts) is {sl['bare_step_s']:.3f} s ({sl['bare_step_s'] / per_step_sl:.0%}).",
           f"Both steps are dominated by the six [{tr['batch']} x {tr['d']}] x [{tr['d']} x {tr['width']}] matmuls "
           f"(encode, decode and their gradients): floor {tr['floor_step_s']:.3f} s.",
           ]
    for key, _ in SWEEPS:
        if key not in r:
            continue
        sw = r[key]
        jsw, w = sw["jaxcircuits"], sw.get("where", "all")
        floor = sw["flops_per_subset"] / (tr["matmul_gflops"] * 1e9)
        label = "Sweep" if w == "all" else "Last-position sweep"
        line = (f"{label}, jaxcircuits: {jsw['median_s'] / sw['subsets'] * 1e3:.2f} ms a subset (target run and source "
                f"cache included), matmul floor {floor * 1e3:.2f} ms ({floor_what(r, sw)}). ")
        if w == "all":
            line += (f"It recomputes only the layers from the SAE's on, vmapped over {sw['chunk_size']} masks a call; "
                     f"layers without a dictionary skip the splice (a lax.cond on the layer's flag). The same "
                     f"{sw['subsets']} masks on the plain model (head_out of layer {r['layer']}, no dictionary) take "
                     f"{sw['jaxcircuits_plain_head_out_median_s']:.2f} s against {jsw['median_s']:.2f} s spliced "
                     f"(the one SAE's encode and (f' - f) W_dec, and its feature blend, at every position).")
        else:
            line += (f"Each masked run starts from the target's cached residual at layer {r['layer']} at the last "
                     f"position and reads the other positions' keys and values in place from the target's cache (one "
                     f"copy shared by the {sw['chunk_size']} vmapped masks of a call): every layer from there and the "
                     f"SAE run that one position. Of the sweep's {jsw['median_s']:.3f} s, the target run and source cache "
                     f"take {sw['setup_s']:.3f} s.")
        out.append(line)
        b = sw.get("saelens_prefix_forward_breakdown")
        if b:
            out.append(f"SAELens, one stacked forward from the cached residual (S = {b['stack']}, no patch hook): "
                       f"{b['forward_s']:.3f} s = transformer layers {b['layers_s']:.3f} s + the attached SAE (encoded "
                       f"twice with the error term, decoded, hook points) {b['sae_s']:.3f} s + final norm and unembedding "
                       f"at every position {b['unembed_s']:.3f} s.")
        for name, p in sw["saelens"].items():
            out.append(f"{label}, SAELens {name}: {p['median_s'] / p['subsets'] * 1e3:.2f} ms a subset: "
                       + saelens_costs(name, w))
    return out


def main(argv):
    del argv
    if FLAGS.render_json:
        with open(FLAGS.render_json) as f:
            result = json.load(f)
        if FLAGS.note:
            result["note"] = FLAGS.note
        result["where"] = where(result)
        md = render(result)
        if FLAGS.results_md:
            with open(FLAGS.results_md, "w") as f:
                f.write(md)
        print(md)
        return
    import_peers()
    start = machine_load()
    print(load_line(start), flush=True)
    result = {"date": datetime.date.today().isoformat(), "command": "python -m benchmarks.sae_vs_saelens "
              + " ".join(sys.argv[1:]), "layer": FLAGS.layer, "gpt2_config": FLAGS.gpt2_config, "note": FLAGS.note, "load_start": start,
              "environment": timing.environment(PACKAGES)}
    hf, cfg, params = build_models()
    result["n_layers"] = cfg.n_layers
    sae_params, d = training_part(params, cfg, result)
    failures = sweep_part(hf, params, cfg, sae_params, d, result)
    if not result["training"]["agreement"]["ok"]:
        failures.append("training losses disagree")
    end = machine_load()
    result["load_end"] = end
    result["load_line"] = load_line(start, end)
    result["where"] = where(result)
    result["failures"] = failures
    timing.finish(result, "sae_vs_saelens", render(result), FLAGS.out_dir, FLAGS.results_md)


if __name__ == "__main__":
    app.run(main)
