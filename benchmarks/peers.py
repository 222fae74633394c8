"""The head-subset patching sweep as researchers run it today, in PyTorch: one forward per subset.

Every peer patches the per-head attention outputs z (the o_proj input) of one layer, at the
chosen positions, with the source run's, and returns the logit difference of two tokens at the
last position per prompt: the same quantity as jaxcircuits' `head_out` mask with `LogitDiff`.

  tl_loop    TransformerLens `HookedTransformer.run_with_hooks`, a hook on blocks.{l}.attn.hook_z
             (how `transformer_lens.patching` patches heads).
  tl_prefix  the same hook, but each subset starts from the cached blocks.{l}.hook_resid_pre of the
             target (`start_at_layer=l`): layers before l run once.
  tl_bridge  TransformerLens `TransformerBridge` (wraps the HF model itself) with the same hook_z
             hook; it has no start_at_layer.
  hf_hook    plain transformers, a forward pre-hook on o_proj / c_proj (logits_to_keep=1).

All models are built from the HF model passed in (same weights); nothing is loaded from a hub.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Sequence

import numpy as np
import torch


def _keep_mask(heads: Sequence[int], positions: np.ndarray, n_pos: int, n_heads: int) -> torch.Tensor:
    """bool [T, H]: True where (position, head) takes the source's z."""
    m = torch.zeros(n_pos, n_heads, dtype=torch.bool)
    m[torch.as_tensor(positions)[:, None], torch.as_tensor(list(heads))[None, :]] = True
    return m


def _logit_diff(logits: torch.Tensor, good: int, bad: int) -> np.ndarray:
    last = logits[:, -1]
    return (last[:, good] - last[:, bad]).float().numpy()


class Peer:
    """One peer: `prepare` (untimed: source run, caches), then `run(subsets)` -> [n, B] values."""

    name = ""

    def __init__(self, tgt: np.ndarray, src: np.ndarray, layer: int, positions: np.ndarray,
                 good: int, bad: int, n_heads: int):
        self.tgt, self.src = torch.as_tensor(tgt), torch.as_tensor(src)
        self.layer, self.positions, self.good, self.bad, self.n_heads = layer, positions, good, bad, n_heads

    def prepare(self) -> None:
        raise NotImplementedError

    def one(self, keep: torch.Tensor) -> torch.Tensor:
        """Logits [B, T', V] of the target with keep [T, H] heads patched from the source."""
        raise NotImplementedError

    @torch.inference_mode()
    def run(self, subsets: Sequence[Sequence[int]]) -> np.ndarray:
        T = self.tgt.shape[1]
        return np.stack([_logit_diff(self.one(_keep_mask(s, self.positions, T, self.n_heads)),
                                     self.good, self.bad) for s in subsets])


# --------------------------------------------------------------------------- TransformerLens
def tl_config(hf_config):
    """HookedTransformerConfig with the HF config's dims (GPT-2 or Llama), built without a hub."""
    from transformer_lens import HookedTransformerConfig

    c = hf_config
    if c.model_type == "gpt2":
        return HookedTransformerConfig(
            n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
            d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
            act_fn=c.activation_function, eps=c.layer_norm_epsilon, normalization_type="LN",
            positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
            default_prepend_bos=False, device="cpu")
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    return HookedTransformerConfig(
        n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
        d_head=c.head_dim, d_mlp=c.intermediate_size, d_vocab=c.vocab_size,
        n_ctx=min(c.max_position_embeddings, 2048), act_fn=c.hidden_act, eps=c.rms_norm_eps,
        n_key_value_heads=(c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None),
        normalization_type="RMS", final_rms=True, gated_mlp=True, positional_embedding_type="rotary",
        rotary_dim=c.head_dim, rotary_base=theta, rotary_adjacent_pairs=False,
        original_architecture="LlamaForCausalLM", default_prepend_bos=False, device="cpu")


def hooked_transformer(hf_model):
    """A HookedTransformer holding `hf_model`'s weights exactly: TL's own weight conversion, with
    no LayerNorm folding, weight centering or value-bias folding (so logits match HF's)."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

    cfg = tl_config(hf_model.config)
    model = HookedTransformer(cfg)
    convert = convert_gpt2_weights if cfg.original_architecture == "GPT2LMHeadModel" else convert_llama_weights
    state = {k: v.detach().clone() for k, v in convert(hf_model, cfg).items()}
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model.eval()


def transformer_bridge(hf_model):
    """TransformerLens' TransformerBridge around a copy of `hf_model` (raw HF weights, no processing).

    The bridge insists on a tokenizer; a two-word one stands in (we feed token ids)."""
    from tokenizers import Tokenizer, models
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
        unk_token="<unk>")
    bridge = TransformerBridge.boot_transformers("local-random", hf_model=copy.deepcopy(hf_model),
                                                 device="cpu", tokenizer=tok)
    return bridge.eval()


class _TLHookZ(Peer):
    """Shared by the TransformerLens peers: replace heads in blocks.{l}.attn.hook_z."""

    def __init__(self, model, *a, **kw):
        super().__init__(*a, **kw)
        self.model, self.hook_name = model, f"blocks.{self.layer}.attn.hook_z"

    def prepare(self) -> None:
        with torch.inference_mode():
            _, cache = self.model.run_with_cache(self.src, names_filter=self.hook_name)
        self.src_z = cache[self.hook_name]

    def hook(self, keep):
        def patch(z, hook):
            return torch.where(keep[None, :, :, None], self.src_z, z)
        return [(self.hook_name, patch)]


class TLLoop(_TLHookZ):
    name = "tl_loop"

    def one(self, keep):
        return self.model.run_with_hooks(self.tgt, fwd_hooks=self.hook(keep))


class TLBridge(TLLoop):
    name = "tl_bridge"


class TLPrefix(_TLHookZ):
    name = "tl_prefix"

    def prepare(self) -> None:
        super().prepare()
        resid = f"blocks.{self.layer}.hook_resid_pre"
        with torch.inference_mode():
            _, cache = self.model.run_with_cache(self.tgt, names_filter=resid)
        self.resid = cache[resid]

    def one(self, keep):
        return self.model.run_with_hooks(self.resid, start_at_layer=self.layer, fwd_hooks=self.hook(keep))


# --------------------------------------------------------------------------- plain transformers
def _o_proj(hf_model, layer: int):
    if hf_model.config.model_type == "gpt2":
        return hf_model.transformer.h[layer].attn.c_proj
    return hf_model.model.layers[layer].self_attn.o_proj


class HFHook(Peer):
    """A forward pre-hook on the layer's o_proj replaces the kept heads' slices of its input
    (registered around each forward, as TransformerLens' run_with_hooks does)."""

    name = "hf_hook"

    def __init__(self, model, *a, **kw):
        super().__init__(*a, **kw)
        self.model = model

    def _forward(self, tokens, pre_hook):
        handle = _o_proj(self.model, self.layer).register_forward_pre_hook(pre_hook)
        try:
            return self.model(tokens, logits_to_keep=1).logits
        finally:
            handle.remove()

    def _heads(self, z):
        return z.reshape(*z.shape[:2], self.n_heads, -1)

    def prepare(self) -> None:
        def record(mod, args):
            self.src_z = self._heads(args[0]).clone()
        with torch.inference_mode():
            self._forward(self.src, record)

    def one(self, keep):
        def patch(mod, args):
            z = args[0]
            return (torch.where(keep[None, :, :, None], self.src_z, self._heads(z)).reshape(z.shape),)
        return self._forward(self.tgt, patch)


PEERS: Dict[str, Callable] = {
    "tl_loop": lambda models, *a: TLLoop(models["tl"], *a),
    "tl_prefix": lambda models, *a: TLPrefix(models["tl"], *a),
    "tl_bridge": lambda models, *a: TLBridge(models["bridge"], *a),
    "hf_hook": lambda models, *a: HFHook(models["hf"], *a),
}


def build_models(hf_model, names: Sequence[str]) -> dict:
    """The torch models the named peers need, all holding `hf_model`'s weights."""
    models = {"hf": hf_model}
    if {"tl_loop", "tl_prefix"} & set(names):
        models["tl"] = hooked_transformer(hf_model)
    if "tl_bridge" in names:
        models["bridge"] = transformer_bridge(hf_model)
    return models
