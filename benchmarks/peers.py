"""The head-subset patching sweep as researchers run it today, in PyTorch, each tool at its best.

Every peer patches the per-head attention outputs z (the o_proj input) of one layer, at the
chosen positions, with the source run's, and returns the logit difference of two tokens at the
last position per prompt: the same quantity as jaxcircuits' `head_out` mask with `LogitDiff`.

A peer runs `stack` subsets per forward (S; 1 = one forward per subset, as
`transformer_lens.patching` does): the target batch is repeated S times along the batch axis,
prompt-major (row b * S + i is prompt b under subset i), and the hook applies a per-row head mask.

  tl_loop / tl_batched                 TransformerLens `HookedTransformer.run_with_hooks`, a hook
                                       on blocks.{l}.attn.hook_z.
  tl_prefix / tl_prefix_batched        the same hook, starting from the target's cached
                                       blocks.{l}.hook_resid_pre (`start_at_layer=l`): layers
                                       before l run once.
  tl_bridge / tl_bridge_batched        TransformerLens `TransformerBridge` (wraps the HF model
                                       itself), same hook; it has no start_at_layer.
  hf_hook / hf_batched                 plain transformers, a forward pre-hook on o_proj / c_proj,
                                       `logits_to_keep=1`.
  hf_kv_batched                        the same, last position only: the target's first T-1
                                       positions run once into a KV cache, each stack runs the
                                       last token against it.
  nnsight / nnsight_batched            nnsight's `NNsight(model).trace`, assigning o_proj's input.

`PEERS` says which tool (family) each belongs to, whether its S is tuned, and the positions it
can patch. All models are built from the HF model passed in (same weights); nothing is loaded
from a hub.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import torch


def use_site_packages(path: str, flag: str) -> None:
    """Append another environment's site-packages `path` (same Python and torch; the peers installed
    there) to sys.path, after this interpreter's own; '' does nothing. Exits with one line naming
    `flag` when `path` is not a directory."""
    if not path:
        return
    if not os.path.isdir(path):
        sys.exit(f"--{flag}={path}: no such directory")
    sys.path.append(path)


@dataclasses.dataclass(frozen=True)
class Problem:
    """What every peer computes: target and source tokens [B, T], the patched layer, the patched
    positions (indices into T), the logit-difference tokens, heads per layer."""

    tgt: np.ndarray
    src: np.ndarray
    layer: int
    positions: np.ndarray
    good: int
    bad: int
    n_heads: int


def keep_masks(subsets: Sequence[Sequence[int]], positions: np.ndarray, n_pos: int, n_heads: int) -> torch.Tensor:
    """bool [S, T, H]: True where (position, head) takes the source's z, one row per subset."""
    m = torch.zeros(len(subsets), n_pos, n_heads, dtype=torch.bool)
    for i, heads in enumerate(subsets):
        m[i, torch.as_tensor(positions)[:, None], torch.as_tensor(list(heads), dtype=torch.long)[None, :]] = True
    return m


def rows(x: torch.Tensor, s: int) -> torch.Tensor:
    """[B, ...] -> [B * s, ...], each prompt repeated s times (the stacked batch's order)."""
    return x.repeat_interleave(s, 0)


def patch(z: torch.Tensor, src_z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """z [B * S, T, ...] (heads flattened or not) with keep [S, T, H] heads taken from src_z [B, T, H, Dh]."""
    B, T, H, Dh = src_z.shape
    s = keep.shape[0]
    out = torch.where(keep[None, :, :, :, None], src_z[:, None], z.reshape(B, s, T, H, Dh))
    return out.reshape(z.shape)


class Peer:
    """One peer: `prepare` (untimed: source run, caches), then `run(subsets)` -> [n, B] values."""

    def __init__(self, model, problem: Problem, stack: int = 1):
        if stack < 1:
            raise ValueError(f"stack must be >= 1, got {stack}")
        self.model, self.p, self.stack = model, problem, stack
        self.tgt, self.src = torch.as_tensor(problem.tgt), torch.as_tensor(problem.src)

    def prepare(self) -> None:
        raise NotImplementedError

    def forward(self, keep: torch.Tensor) -> torch.Tensor:
        """Logits [B * S, T', V] of the stacked target, keep [S, T, H] heads patched per subset."""
        raise NotImplementedError

    @torch.inference_mode()
    def run(self, subsets: Sequence[Sequence[int]]) -> np.ndarray:
        B, T = self.tgt.shape
        out = []
        for i in range(0, len(subsets), self.stack):
            keep = keep_masks(subsets[i:i + self.stack], self.p.positions, T, self.p.n_heads)
            last = self.forward(keep)[:, -1]
            diff = (last[:, self.p.good] - last[:, self.p.bad]).float().reshape(B, len(keep))
            out.append(diff.T.numpy())
        return np.concatenate(out)


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


class TLHookZ(Peer):
    """TransformerLens (HookedTransformer or TransformerBridge): replace heads in blocks.{l}.attn.hook_z."""

    def prepare(self) -> None:
        self.hook_name = f"blocks.{self.p.layer}.attn.hook_z"
        with torch.inference_mode():
            _, cache = self.model.run_with_cache(self.src, names_filter=self.hook_name)
        self.src_z = cache[self.hook_name]

    def hooks(self, keep):
        return [(self.hook_name, lambda z, hook: patch(z, self.src_z, keep))]

    def forward(self, keep):
        return self.model.run_with_hooks(rows(self.tgt, len(keep)), fwd_hooks=self.hooks(keep))


class TLPrefix(TLHookZ):
    """TLHookZ starting at the patched layer from the target's cached resid_pre (`start_at_layer`)."""

    def prepare(self) -> None:
        super().prepare()
        resid = f"blocks.{self.p.layer}.hook_resid_pre"
        with torch.inference_mode():
            _, cache = self.model.run_with_cache(self.tgt, names_filter=resid)
        self.resid = cache[resid]

    def forward(self, keep):
        return self.model.run_with_hooks(rows(self.resid, len(keep)), start_at_layer=self.p.layer,
                                         fwd_hooks=self.hooks(keep))


# --------------------------------------------------------------------------- plain transformers
def o_proj_path(hf_config, layer: int) -> str:
    """Dotted path of the module whose input is the layer's per-head z (heads flattened)."""
    if hf_config.model_type == "gpt2":
        return f"transformer.h.{layer}.attn.c_proj"
    return f"model.layers.{layer}.self_attn.o_proj"


class HFHook(Peer):
    """A forward pre-hook on the layer's o_proj replaces the kept heads' slices of its input
    (registered around each forward, as TransformerLens' run_with_hooks does); logits_to_keep=1."""

    def _forward(self, tokens, pre_hook, **kw):
        site = self.model.get_submodule(o_proj_path(self.model.config, self.p.layer))
        handle = site.register_forward_pre_hook(pre_hook)
        try:
            return self.model(tokens, logits_to_keep=1, **kw).logits
        finally:
            handle.remove()

    def prepare(self) -> None:
        def record(mod, args):
            self.src_z = args[0].reshape(*args[0].shape[:2], self.p.n_heads, -1).clone()
        with torch.inference_mode():
            self._forward(self.src, record)

    def forward(self, keep):
        return self._forward(rows(self.tgt, len(keep)), lambda mod, args: (patch(args[0], self.src_z, keep),))


class HFKV(HFHook):
    """HFHook for last-position patching: the target's first T-1 positions run once (untimed) into
    a KV cache; each stack runs only the last token against the cache, repeated S times."""

    def prepare(self) -> None:
        T = self.tgt.shape[1]
        if list(self.p.positions) != [T - 1]:
            raise ValueError(f"{type(self).__name__} patches the last position ({T - 1}) only, "
                             f"got positions {np.asarray(self.p.positions).tolist()}")
        super().prepare()
        self.src_z = self.src_z[:, -1:]
        with torch.inference_mode():
            cache = self.model(self.tgt[:, :-1], use_cache=True).past_key_values
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]

    def forward(self, keep):
        from transformers import DynamicCache

        s = len(keep)
        cache = DynamicCache([(rows(k, s), rows(v, s)) for k, v in self.kv])
        return self._forward(rows(self.tgt[:, -1:], s), lambda mod, args: (patch(args[0], self.src_z, keep[:, -1:]),),
                             cache=cache)


# --------------------------------------------------------------------------- nnsight
class NNsightPeer(Peer):
    """nnsight: inside `model.trace(tokens)`, o_proj's input is read and assigned back patched."""

    def _o_proj(self):
        return self.model.get(o_proj_path(self.model.config, self.p.layer))

    def prepare(self) -> None:
        with torch.inference_mode(), self.model.trace(self.src, logits_to_keep=1):
            z = self._o_proj().input.save()
        self.src_z = z.reshape(*z.shape[:2], self.p.n_heads, -1).clone()

    def forward(self, keep):
        with self.model.trace(rows(self.tgt, len(keep)), logits_to_keep=1):
            site = self._o_proj()
            site.input = patch(site.input, self.src_z, keep)
            logits = self.model.output.logits.save()
        return logits


@dataclasses.dataclass(frozen=True)
class PeerKind:
    """A peer variant: its tool, class, the `build_models` entry it runs on, whether its stack
    size S is tuned (else 1: one forward per subset) and the position selectors it can patch."""

    family: str
    cls: Callable
    model: str
    batched: bool
    wheres: Tuple[str, ...] = ("all", "last")


PEERS: Dict[str, PeerKind] = {
    "tl_loop": PeerKind("TransformerLens", TLHookZ, "tl", False),
    "tl_batched": PeerKind("TransformerLens", TLHookZ, "tl", True),
    "tl_prefix": PeerKind("TransformerLens", TLPrefix, "tl", False),
    "tl_prefix_batched": PeerKind("TransformerLens", TLPrefix, "tl", True),
    "tl_bridge": PeerKind("TransformerLens", TLHookZ, "bridge", False),
    "tl_bridge_batched": PeerKind("TransformerLens", TLHookZ, "bridge", True),
    "hf_hook": PeerKind("transformers", HFHook, "hf", False),
    "hf_batched": PeerKind("transformers", HFHook, "hf", True),
    "hf_kv_batched": PeerKind("transformers", HFKV, "hf", True, ("last",)),
    "nnsight": PeerKind("nnsight", NNsightPeer, "nnsight", False),
    "nnsight_batched": PeerKind("nnsight", NNsightPeer, "nnsight", True),
}

def nnsight_model(hf_model):
    """nnsight's `NNsight` envoy around a copy of `hf_model` (nnsight wraps its modules)."""
    from nnsight import NNsight

    return NNsight(copy.deepcopy(hf_model))


_MODELS = {"tl": hooked_transformer, "bridge": transformer_bridge, "nnsight": nnsight_model}


def build_models(hf_model, names: Sequence[str]) -> dict:
    """The torch models the named peers need, all holding `hf_model`'s weights."""
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}; known: {sorted(PEERS)}")
    models = {"hf": hf_model}
    for key in {PEERS[n].model for n in names} - {"hf"}:
        models[key] = _MODELS[key](hf_model)
    return models


def make_peer(name: str, models: dict, problem: Problem, stack: int = 1) -> Peer:
    """Peer `name` on its model from `build_models`; stack = S subsets per forward."""
    return PEERS[name].cls(models[PEERS[name].model], problem, stack)
