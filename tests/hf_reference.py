"""Reference quantities taken from HF models with PyTorch hooks (test-only)."""

import contextlib
import re

import numpy as np
import torch


def blocks_of(model):
    """(decoder layers, attention-module attribute, o_proj attribute, final norm) of an HF model."""
    if model.config.model_type == "gpt2":
        return model.transformer.h, "attn", "c_proj", model.transformer.ln_f
    if model.config.model_type == "gpt_neox":
        return model.gpt_neox.layers, "attention", "dense", model.gpt_neox.final_layer_norm
    return model.model.layers, "self_attn", "o_proj", model.model.norm


def run(model, tokens, attn_mask=None, **kw):
    """HF logits [B, T, V] (numpy) with explicit left-padding-aware position ids."""
    tokens = np.asarray(tokens)
    attn_mask = np.ones_like(tokens) if attn_mask is None else np.asarray(attn_mask)
    pos = np.maximum(attn_mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = model(torch.tensor(tokens), attention_mask=torch.tensor(attn_mask),
                    position_ids=torch.tensor(pos), **kw)
    return out


def sites(model, tokens, attn_mask=None, pattern=True):
    """Every named site from hooks: resid_pre, head_out, attn_out, pattern, mlp_out ([L, ...]) and
    final_norm, as numpy arrays in jaxcircuits' shapes (pattern=False: no 'pattern', for models
    whose attention implementation cannot return it, e.g. sdpa)."""
    layers, attn_name, o_name, norm = blocks_of(model)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    got = {k: [] for k in ("resid_pre", "head_out", "attn_out", "mlp_out")}
    handles = []

    def pre_layer(mod, args, kwargs):
        got["resid_pre"].append((args[0] if args else kwargs["hidden_states"]).numpy().copy())

    def pre_o(mod, args):
        z = args[0]
        got["head_out"].append(z.reshape(*z.shape[:2], n_heads, -1).numpy().copy())

    for layer in layers:
        attn = getattr(layer, attn_name)
        handles.append(layer.register_forward_pre_hook(pre_layer, with_kwargs=True))
        handles.append(getattr(attn, o_name).register_forward_pre_hook(pre_o))
        handles.append(attn.register_forward_hook(lambda m, a, o: got["attn_out"].append(o[0].numpy().copy())))
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o: got["mlp_out"].append(o.numpy().copy())))
    final = []
    handles.append(norm.register_forward_hook(lambda m, a, o: final.append(o.numpy().copy())))
    try:
        out = run(model, tokens, attn_mask, output_attentions=pattern)
    finally:
        for h in handles:
            h.remove()
    res = {k: np.stack(v) for k, v in got.items()}
    if pattern:
        res["pattern"] = np.stack([a.numpy() for a in out.attentions])
    res["final_norm"] = final[0]
    res["logits"] = out.logits.numpy()
    return res


@contextlib.contextmanager
def patch_heads(model, layer_heads, source_z, positions):
    """Replace per-head o_proj inputs: layer_heads {layer: [heads]}, source_z [L, B, T, H, Dh],
    positions: target slots patched (list)."""
    layers, attn_name, o_name, _ = blocks_of(model)
    handles = []
    for l, heads in layer_heads.items():
        def pre(mod, args, l=l, heads=heads):
            z = args[0].clone()
            B, T, _ = z.shape
            z = z.reshape(B, T, model.config.num_attention_heads, -1)
            src = torch.tensor(source_z[l])
            for t in positions:
                for h in heads:
                    z[:, t, h] = src[:, t, h]
            return (z.reshape(B, T, -1),)
        handles.append(getattr(getattr(layers[l], attn_name), o_name).register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def patch_attn_output(model, layer, blocks, n_blocks, source_out, positions, decode_source=None):
    """Replace residual blocks of one attention module's output (after o_proj), as the original
    even-heads hook did. source_out [B, T_src, D] aligned to `positions` (target slot t takes
    source slot t); during decoding (T == 1) take `decode_source` [B, D] if given."""
    layers, attn_name, _, _ = blocks_of(model)

    def hook(mod, args, out):
        o = out[0].clone()
        B, T, D = o.shape
        w = D // n_blocks
        src = torch.tensor(source_out)
        for b in blocks:
            sl = slice(b * w, (b + 1) * w)
            if T == 1 and decode_source is not None:
                o[:, 0, sl] = torch.tensor(decode_source)[:, sl]
            elif T > 1:
                for t in positions:
                    o[:, t, sl] = src[:, t, sl]
        return (o, *out[1:])

    h = getattr(layers[layer], attn_name).register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def qkv_neuron_hooks(model, site, fn):
    """Route HF's value of `site` ('head_q', 'head_k' (after RoPE), 'head_v', 'mlp_neuron') in every
    layer through fn(layer, x) -> x, x in jaxcircuits' layout: [B, T, n, Dh] per head, [B, T, F] per
    neuron. Llama: queries/keys from `apply_rotary_pos_emb` (wrapped; the layer from a pre-hook on
    self_attn), values from v_proj, neurons into down_proj. GPT-2: q/k/v column blocks of c_attn's
    output, neurons into mlp.c_proj."""
    from unittest import mock

    layers, attn_name, _, _ = blocks_of(model)
    gpt2 = model.config.model_type == "gpt2"
    handles, current, patches = [], [None], []

    def heads(x, dh):                                  # [B, T, n*Dh] <-> [B, T, n, Dh]
        return x.reshape(*x.shape[:2], -1, dh)

    for l, layer in enumerate(layers):
        attn = getattr(layer, attn_name)
        if site == "mlp_neuron":
            down = layer.mlp.c_proj if gpt2 else layer.mlp.down_proj
            handles.append(down.register_forward_pre_hook(lambda m, a, l=l: (fn(l, a[0].clone()),)))
        elif gpt2:
            D = model.config.n_embd
            lo = {"head_q": 0, "head_k": D, "head_v": 2 * D}[site]

            def c_attn_hook(m, a, out, l=l, lo=lo, D=D):
                out = out.clone()
                dh = D // model.config.n_head
                out[..., lo:lo + D] = fn(l, heads(out[..., lo:lo + D], dh)).reshape(*out.shape[:2], D)
                return out
            handles.append(attn.c_attn.register_forward_hook(c_attn_hook))
        elif site == "head_v":
            def v_hook(m, a, out, l=l):
                return fn(l, heads(out.clone(), attn.head_dim)).reshape(out.shape)
            handles.append(attn.v_proj.register_forward_hook(v_hook))
        else:
            handles.append(attn.register_forward_pre_hook(lambda m, a, l=l: current.__setitem__(0, l)))
    if site in ("head_q", "head_k") and not gpt2:
        from transformers.models.llama import modeling_llama
        orig = modeling_llama.apply_rotary_pos_emb

        def rotary(q, k, *args, **kw):
            q, k = orig(q, k, *args, **kw)              # [B, n, T, Dh]
            if site == "head_q":
                q = fn(current[0], q.transpose(1, 2).clone()).transpose(1, 2)
            else:
                k = fn(current[0], k.transpose(1, 2).clone()).transpose(1, 2)
            return q, k
        patches.append(mock.patch.object(modeling_llama, "apply_rotary_pos_emb", rotary))
    try:
        for p in patches:
            p.start()
        yield
    finally:
        for p in patches:
            p.stop()
        for h in handles:
            h.remove()


_SENDER = re.compile(r"^embed$|^L(?P<l>\d+)H(?P<h>\d+)$|^L(?P<mlp>\d+)MLP$")
_RECEIVER = re.compile(r"^L(?P<l>\d+)(?:H(?P<h>\d+)\.(?P<q>q)|K(?P<k>\d+)\.(?P<kv>[kv]))$|^L(?P<mlp>\d+)MLP$|^logits$")


def _parsed(labels, pattern, what):
    """Regex matches of edge labels; ValueError naming the unknown ones."""
    got = [pattern.match(s) for s in labels]
    bad = [s for s, m in zip(labels, got) if m is None]
    if bad:
        raise ValueError(f"unknown {what} label(s) {bad}")
    return got


@contextlib.contextmanager
def patch_path(model, senders, receivers, source, pos_w=None):
    """Wang-style path patching of an HF model: every receiver in `receivers` computes its projection
    (or the MLP / final norm reads its input) from resid + pos_w * sum_s (src_s - cur_s) over
    `senders`; every other consumer reads the unchanged resid.

    senders: 'embed' (layer 0's input), 'LlHh' (head h's contribution z_h W_O[h]^T, no bias, z from
    the o_proj / c_proj input) or 'LlMLP' (the MLP's output). receivers: 'LlHh.q' (head h's query
    slice of q_proj / c_attn's q block, computed from input_layernorm / ln_1 of the shifted resid),
    'LlKk.k' / 'LlKk.v' (KV head k's slice), 'LlMLP' (post_attention_layernorm / ln_2 input), 'logits'
    (final norm input). source: `sites(model, source_tokens)`; cur_s is read from this run's own
    hooks as it goes, so senders must precede receivers. pos_w [B, T] (None: every position).
    """
    layers, attn_name, o_name, final_norm = blocks_of(model)
    gpt2 = model.config.model_type == "gpt2"
    n_heads = model.config.num_attention_heads
    cur = {}
    src = {k: torch.tensor(source[k]) for k in ("resid_pre", "head_out", "mlp_out")}
    w = 1.0 if pos_w is None else torch.tensor(np.asarray(pos_w, np.float32))[..., None]

    def w_o(l, h):                                     # [Dh, D]: head h's rows of W_O (x @ W_O)
        o = getattr(getattr(layers[l], attn_name), o_name)
        rows = o.weight if gpt2 else o.weight.T        # Conv1D stores [in, out]; Linear [out, in]
        dh = rows.shape[0] // n_heads
        return rows[h * dh:(h + 1) * dh]

    def sender_delta(m):
        if m["h"] is not None:
            l, h = int(m["l"]), int(m["h"])
            return (src["head_out"][l][..., h, :] - cur["z", l][..., h, :]) @ w_o(l, h)
        if m["mlp"] is not None:
            l = int(m["mlp"])
            return src["mlp_out"][l] - cur["mlp", l]
        return src["resid_pre"][0] - cur["resid", 0]

    snd = _parsed(senders, _SENDER, "sender")
    delta = lambda: w * sum(sender_delta(m) for m in snd)

    def keep(key, value):
        cur[key] = value.detach()

    handles = []
    for l, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, kw, l=l: keep(("resid", l), a[0] if a else kw["hidden_states"]), with_kwargs=True))
        o = getattr(getattr(layer, attn_name), o_name)
        handles.append(o.register_forward_pre_hook(
            lambda m, a, l=l: keep(("z", l), a[0].reshape(*a[0].shape[:2], n_heads, -1))))
        handles.append(layer.mlp.register_forward_hook(lambda m, a, out, l=l: keep(("mlp", l), out)))

    def shifted_input(m, a):
        return (a[0] + delta(), *a[1:])

    def projection_hook(l, norm, lo, hi):
        def hook(mod, args, out):
            out = out.clone()
            out[..., lo:hi] = mod.forward(norm(cur["resid", l] + delta()))[..., lo:hi]
            return out
        return hook

    for m in _parsed(receivers, _RECEIVER, "receiver"):
        if m[0] == "logits":
            handles.append(final_norm.register_forward_pre_hook(shifted_input))
        elif m["mlp"] is not None:
            layer = layers[int(m["mlp"])]
            handles.append((layer.ln_2 if gpt2 else layer.post_attention_layernorm).register_forward_pre_hook(
                shifted_input))
        else:
            l, n, kind = int(m["l"]), int(m["h"] or m["k"]), m["q"] or m["kv"]
            layer, attn = layers[l], getattr(layers[l], attn_name)
            if gpt2:
                D = model.config.n_embd
                dh, proj, norm, lo = D // n_heads, attn.c_attn, layer.ln_1, "qkv".index(kind) * D
            else:
                dh, proj, norm, lo = attn.head_dim, getattr(attn, f"{kind}_proj"), layer.input_layernorm, 0
            handles.append(proj.register_forward_hook(projection_hook(l, norm, lo + n * dh, lo + (n + 1) * dh)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
