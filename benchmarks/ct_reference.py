"""circuit-tracer (0.5.0) attribution graphs on a tiny local model: the reference for our graphs.

Runs in its own virtualenv (torch CPU, circuit-tracer 0.5.0, transformer-lens, no jax):

    python3 -m venv /tmp/ctvenv
    /tmp/ctvenv/bin/pip install torch==2.13.0 circuit-tracer==0.5.0

    /tmp/ctvenv/bin/python benchmarks/ct_reference.py fixture OUT [--arch gpt2|llama] [--no-skip] [--act jumprelu]
        [--layers L --d-model D --heads H --vocab V --width F --enc-bias B]
    /tmp/ctvenv/bin/python benchmarks/ct_reference.py graph OUT/model OUT/transcoders --tokens 1,5,9,13 \
        --out graph.npz [--json-dir DIR --slug NAME] [--max-feature-nodes N] [--batch-size B] [--reps R] [--trim]

(--trim: the .npz holds only `TEST_FIELDS`, what tests/test_graph_circuit_tracer.py compares.)

`make_fixture(out_dir)` saves a random HF model (`save_pretrained`, with a word-level tokenizer
"<pad> <bos> <eos> t3 ... t{V-1}", ids = index) in out_dir/model and random per-layer transcoders
in circuit-tracer's on-disk format in out_dir/transcoders: config.yaml (model_kind transcoder_set,
feature_input_hook ln2.hook_normalized, i.e. the MLP's norm output BEFORE the norm weight,
feature_output_hook mlp.hook_out, transcoders: [layer_0.safetensors, ...] relative to the directory)
and layer_{l}.safetensors with W_enc [F, D], b_enc [F], W_dec [F, D], b_dec [D], W_skip [D, D]
(used as x @ W_skip.T) and, for JumpReLU, activation_function.threshold [F] (kept > 0). Encoders are
random (pre-activations ~ N(enc_bias, 1): enc_bias sets how many features fire); W_dec, b_dec (and
W_skip) are the least-squares fit of the model's MLP output on random prompts, so features carry most
of the MLP and error nodes stay smaller (`fit_relative_error`). Paths in fixture.json are relative to
OUT. jaxcircuits reads the transcoders with `dictionaries.files.load(OUT/transcoders, cfg,
params=params)` (the ln2.hook_normalized input folded).

`circuit_tracer_graph(model_dir, transcoder_dir, tokens, **opts)` builds circuit-tracer's
TransformerLens ReplacementModel offline (HookedTransformer.from_pretrained on the local dir with
hf_model/tokenizer given; fold_ln etc. off, as circuit-tracer does) and returns its graph as a dict
of numpy arrays/lists (see its docstring), with wall and CPU seconds per graph (the first call,
warm-up, reported apart). circuit-tracer prepends a special token when tokens[0] is not one; pass
tokens starting with <bos> (id 1) to keep them as given: the returned `input_tokens` are what it used.

`independent_adjacency` (graph --verify) recomputes the adjacency from the definition without
circuit-tracer or TransformerLens (forward propagation of each source through the HF model with
attention patterns and norm scales frozen, MLPs = skip only): it agrees to ~1e-6 relative on GPT-2
and Llama (GQA), ReLU and JumpReLU, with and without skip, and with max_feature_nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
FEATURE_INPUT_HOOK = "ln2.hook_normalized"
FEATURE_OUTPUT_HOOK = "mlp.hook_out"
# what the agreement test compares (graph --trim keeps only these)
TEST_FIELDS = ("adjacency", "active_features", "activation_values", "selected_features", "input_tokens",
               "logit_tokens", "logit_probabilities", "node_threshold", "edge_threshold", "node_mask", "edge_mask",
               "cumulative_scores", "replacement_score", "completeness_score")


# ---- fixture ---------------------------------------------------------------------------------------


def make_tokenizer(vocab: int):
    """A word-level fast tokenizer: <pad>=0, <bos>=1, <eos>=2, t3..t{vocab-1}; whitespace-split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<bos>", "<eos>"] + [f"t{i}" for i in range(3, vocab)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<pad>")


def hf_config(arch: str, n_layers: int, d_model: int, vocab: int, heads: int = 4):
    from transformers import GPT2Config, LlamaConfig
    ids = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if arch == "gpt2":
        return GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=heads, n_positions=64, n_ctx=64, vocab_size=vocab,
                          n_inner=4 * d_model, **ids)
    if arch == "llama":   # GQA, untied, no biases, plain RoPE (theta 10000)
        return LlamaConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=heads,
                           num_key_value_heads=heads // 2, intermediate_size=2 * d_model, vocab_size=vocab,
                           max_position_embeddings=128, tie_word_embeddings=False, **ids)
    raise ValueError(f"arch {arch!r}: gpt2 or llama")


def make_fixture(out_dir: str, arch: str = "gpt2", n_layers: int = 2, d_model: int = 64, vocab: int = 101,
                 width: int = 128, skip: bool = True, act: str = "relu", seed: int = 0, heads: int = 4,
                 enc_bias: float = -1.0) -> dict:
    """Save the HF model (out_dir/model) and transcoders (out_dir/transcoders); fixture.json's dict."""
    import yaml
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, n_layers, d_model, vocab, heads),
                                             attn_implementation="eager").eval()
    with torch.no_grad():   # weights large enough that logits and activations are O(1)
        for n, p in model.named_parameters():
            if "norm" in n or "ln_" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if n.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)
    model_dir = os.path.join(out_dir, "model")
    model.save_pretrained(model_dir)
    make_tokenizer(vocab).save_pretrained(model_dir)

    tc_dir = os.path.join(out_dir, "transcoders")
    os.makedirs(tc_dir, exist_ok=True)
    g = torch.Generator().manual_seed(seed + 1)
    if act not in ("relu", "jumprelu"):
        raise ValueError(f"act {act!r}: relu or jumprelu")
    sample = torch.randint(3, vocab, (64, 16), generator=g)
    sample[:, 0] = BOS
    ins, outs = mlp_io(model, sample)   # [L, B, T, D] each, position 0 left out of the fit below
    names, rel_err = [], []
    for layer in range(n_layers):
        # the input (norm output before its weight) has entries of size ~1: pre-activations ~ N(b_enc, 1);
        # the decoder (and skip) is the least-squares fit of the MLP's output on the features (and input),
        # so error nodes are smaller than features' contributions
        t = {"W_enc": torch.randn(width, d_model, generator=g) / d_model ** 0.5,
             "b_enc": enc_bias + 0.3 * torch.randn(width, generator=g)}
        if act == "jumprelu":
            t["b_enc"] = t["b_enc"] + 1.0   # thresholds take the place of the negative bias
            t["activation_function.threshold"] = 0.8 + 0.4 * torch.rand(width, generator=g)
        x = ins[layer][:, 1:].reshape(-1, d_model).double()
        y = outs[layer][:, 1:].reshape(-1, d_model).double()
        pre = x @ t["W_enc"].double().T + t["b_enc"].double()
        f = pre.clamp(min=0) if act == "relu" else pre * (pre > t["activation_function.threshold"].double())
        cols = [f] + ([x] if skip else []) + [torch.ones(len(x), 1, dtype=torch.float64)]
        X = torch.cat(cols, 1)
        w = torch.linalg.solve(X.T @ X + 1e-3 * torch.eye(X.shape[1], dtype=torch.float64), X.T @ y)
        t["W_dec"], t["b_dec"] = w[:width].float(), w[-1].float()
        if skip:
            t["W_skip"] = w[width:width + d_model].T.float()   # used as x @ W_skip.T
        rel_err.append(float(((X @ w - y).norm() / y.norm()).item()))
        name = f"layer_{layer}.safetensors"
        save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(tc_dir, name))
        names.append(name)
    config = {"model_kind": "transcoder_set", "model_name": "../model", "feature_input_hook": FEATURE_INPUT_HOOK,
              "feature_output_hook": FEATURE_OUTPUT_HOOK, "transcoders": names}
    if act == "relu":
        config["activation"] = "relu"
    with open(os.path.join(tc_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    fixture = {"model_dir": "model", "transcoder_dir": "transcoders", "arch": arch, "n_layers": n_layers,
               "d_model": d_model, "heads": heads, "vocab": vocab, "width": width, "skip": skip, "act": act,
               "enc_bias": enc_bias, "seed": seed, "fit_relative_error": rel_err}
    with open(os.path.join(out_dir, "fixture.json"), "w") as f:
        json.dump(fixture, f, indent=1)
    return fixture


def _blocks(model):
    """(blocks, norm before the MLP, mlp, final norm) of an HF GPT-2 or Llama model."""
    if model.config.model_type == "gpt2":
        blocks = model.transformer.h
        return blocks, [b.ln_2 for b in blocks], [b.mlp for b in blocks], [b.ln_1 for b in blocks], model.transformer.ln_f
    blocks = model.model.layers
    return (blocks, [b.post_attention_layernorm for b in blocks], [b.mlp for b in blocks],
            [b.input_layernorm for b in blocks], model.model.norm)


def _normalized(norm, x):
    """The norm's output before its weight (TL's hook_normalized) and the frozen scale [.., T, 1]."""
    x = x.float()
    if isinstance(norm, torch.nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    else:
        scale = (x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()
    return x / scale, scale


@torch.no_grad()
def mlp_io(model, tokens):
    """Per layer: the MLP's input before the norm weight (ln2.hook_normalized) and its output."""
    blocks, norms2, mlps, _, _ = _blocks(model)
    ins, outs, hooks = [None] * len(blocks), [None] * len(blocks), []
    for l, (n, m) in enumerate(zip(norms2, mlps)):
        hooks.append(n.register_forward_pre_hook(lambda mod, a, l=l: ins.__setitem__(l, _normalized(mod, a[0])[0])))
        hooks.append(m.register_forward_hook(lambda mod, a, o, l=l: outs.__setitem__(l, o)))
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return ins, outs


@torch.no_grad()
def independent_adjacency(model_dir: str, transcoder_dir: str, out: dict) -> np.ndarray:
    """The adjacency of `out` (circuit-tracer's graph, from `circuit_tracer_graph`) recomputed without
    circuit-tracer or TransformerLens, from the notes' definition: on the HF model, attention patterns
    and norm scales frozen at the prompt's values, MLPs replaced by their transcoder's skip (W_skip) plus
    constants; each source (a_s * W_dec[s] or error at its layer's MLP output, W_E[token] at the
    embedding) pushed FORWARD through that linear map, read at each target (W_enc[f] . the feature
    input at its layer and position; demeaned W_U column . final-norm output at the last position).
    Same node order and shape as out['adjacency']."""
    from safetensors.torch import load_file
    import yaml
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval().float()
    with open(os.path.join(transcoder_dir, "config.yaml")) as f:
        files = yaml.safe_load(f)["transcoders"]
    tcs = [load_file(p if os.path.isabs(p) else os.path.join(transcoder_dir, p)) for p in files]
    blocks, norms2, mlps, norms1, norm_f = _blocks(model)
    gpt2 = model.config.model_type == "gpt2"
    tokens = torch.as_tensor(out["input_tokens"])[None]
    L, T, D = len(blocks), tokens.shape[1], model.config.hidden_size
    # the prompt's frozen quantities
    scales1, scales2, resid = [None] * L, [None] * L, {}
    hooks = []
    for l in range(L):
        hooks.append(norms1[l].register_forward_pre_hook(lambda m, a, l=l: scales1.__setitem__(l, _normalized(m, a[0])[1][0])))
        hooks.append(norms2[l].register_forward_pre_hook(lambda m, a, l=l: scales2.__setitem__(l, _normalized(m, a[0])[1][0])))
    hooks.append(norm_f.register_forward_pre_hook(lambda m, a: resid.__setitem__("f", _normalized(m, a[0])[1][0])))
    try:
        res = model(tokens, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    patterns = [a[0] for a in res.attentions]            # [H, T, T]
    ins, outs = mlp_io(model, tokens)

    def lin_norm(norm, x, scale, weight=True):            # the norm with its scale frozen, no bias
        if isinstance(norm, torch.nn.LayerNorm):
            x = x - x.mean(-1, keepdim=True)
        x = x / scale
        return x * norm.weight if weight else x

    def attn_ov(l, h):                                    # h [S, T, D] -> attention output, patterns frozen, no biases
        P = patterns[l]
        H = P.shape[0]
        if gpt2:
            attn = blocks[l].attn
            v = h @ attn.c_attn.weight[:, 2 * D:]          # Conv1D: x @ W
            v = v.view(*v.shape[:2], H, D // H)
            z = torch.einsum("hqk,skhd->sqhd", P, v).reshape(*h.shape[:2], D)
            return z @ attn.c_proj.weight
        attn = blocks[l].self_attn
        dh = attn.head_dim
        v = (h @ attn.v_proj.weight.T).view(*h.shape[:2], -1, dh)
        v = v.repeat_interleave(H // v.shape[2], dim=2)
        z = torch.einsum("hqk,skhd->sqhd", P, v).reshape(*h.shape[:2], H * dh)
        return z @ attn.o_proj.weight.T

    n_feat, n_logit = int(out["n_features"]), int(out["n_logits"])
    sel = out["active_features"][out["selected_features"]]
    acts = torch.as_tensor(out["activation_values"][out["selected_features"]])
    # sources: selected features, errors (layer-major), tokens
    S = n_feat + L * T + T
    inj_mlp = torch.zeros(L, S, T, D)
    inj_emb = torch.zeros(S, T, D)
    for i, (l, p, f) in enumerate(sel.tolist()):
        inj_mlp[l, i, p] = acts[i] * tcs[l]["W_dec"][f]
    for l in range(L):
        x = ins[l][0]
        pre = x @ tcs[l]["W_enc"].T + tcs[l]["b_enc"]
        thr = tcs[l].get("activation_function.threshold")
        a = pre.clamp(min=0) if thr is None else pre * (pre > thr)
        a[0] = 0                                           # circuit-tracer's zero_positions
        recon = a @ tcs[l]["W_dec"] + tcs[l]["b_dec"] + (x @ tcs[l]["W_skip"].T if "W_skip" in tcs[l] else 0)
        err = outs[l][0] - recon
        err[0] = 0
        for p in range(T):
            inj_mlp[l, n_feat + l * T + p, p] = err[p]
    W_E = model.get_input_embeddings().weight
    for p in range(T):
        inj_emb[n_feat + L * T + p, p] = W_E[tokens[0, p]]
    # forward the deltas through the linear model
    r = inj_emb
    feat_in = []
    for l in range(L):
        r = r + attn_ov(l, lin_norm(norms1[l], r, scales1[l]))
        u = lin_norm(norms2[l], r, scales2[l], weight=False)  # ln2.hook_normalized
        feat_in.append(u)
        mlp = u @ tcs[l]["W_skip"].T if "W_skip" in tcs[l] else 0
        r = r + mlp + inj_mlp[l]
    final = lin_norm(norm_f, r, resid["f"])[:, -1]      # [S, D]
    W_U = model.get_output_embeddings().weight          # [V, D]
    vecs = W_U[torch.as_tensor(out["logit_tokens"])] - W_U.mean(0, keepdim=True)
    N = n_feat + L * T + T + n_logit
    A = torch.zeros(N, N)
    for i, (l, p, f) in enumerate(sel.tolist()):
        A[i, :S] = feat_in[l][:, p] @ tcs[l]["W_enc"][f]
    A[N - n_logit:, :S] = (final @ vecs.T).T
    return A.numpy()


# ---- circuit-tracer --------------------------------------------------------------------------------


def load_transcoder_set(transcoder_dir: str, scan: str = "tiny-test"):
    """circuit-tracer's TranscoderSet from a local config.yaml (paths relative to the directory)."""
    import yaml
    from circuit_tracer.utils.hf_utils import load_transcoders
    with open(os.path.join(transcoder_dir, "config.yaml")) as f:
        config = yaml.safe_load(f)
    config["transcoders"] = [p if os.path.isabs(p) else os.path.join(transcoder_dir, p)
                             for p in config["transcoders"]]
    config["scan"] = scan
    return load_transcoders(config, device=torch.device("cpu"), dtype=torch.float32,
                            lazy_encoder=False, lazy_decoder=False)


def load_replacement_model(model_dir: str, transcoder_dir: str, scan: str = "tiny-test"):
    """circuit-tracer's TransformerLens ReplacementModel on the local HF checkpoint, offline."""
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    transcoders = load_transcoder_set(transcoder_dir, scan)
    # HookedTransformer.from_pretrained takes only names in TL's official list; the config and weight
    # loaders below it read a local directory (and hf_model) as they are: let the local path through.
    # TL also picks the architecture from the name ("llama"/"gemma" in it: wrong for a local dir), so a
    # path holding those words is reached through a symlink named hf_model.
    import tempfile
    import transformer_lens.loading_from_pretrained as loading
    path = os.path.abspath(model_dir)
    if any(w in path.lower() for w in ("llama", "gemma")):
        path = os.path.join(tempfile.mkdtemp(prefix="ct_"), "hf_model")
        os.symlink(os.path.abspath(model_dir), path)
    official = loading.get_official_model_name
    loading.get_official_model_name = lambda name: name if os.path.isdir(name) else official(name)
    try:
        model = TransformerLensReplacementModel.from_pretrained_and_transcoders(
            path, transcoders, hf_model=hf_model, tokenizer=tokenizer, device=torch.device("cpu"),
            dtype=torch.float32)
    finally:
        loading.get_official_model_name = official
    model.cfg.tokenizer_name = model_dir   # create_graph_files reloads the tokenizer from here
    # the TL port must be the HF model
    probe = torch.tensor([[BOS] + list(range(3, 10))])
    with torch.no_grad():
        diff = (model(probe) - hf_model(probe).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"TransformerLens logits differ from the HF model's by {diff}")
    return model


def _node_labels(graph) -> list:
    n_feat = len(graph.selected_features)
    labels = []
    for i in range(n_feat):
        layer, pos, feat = graph.active_features[graph.selected_features[i]].tolist()
        labels.append(("feature", layer, pos, feat))
    for layer in range(graph.cfg.n_layers):
        for pos in range(graph.n_pos):
            labels.append(("error", layer, pos, -1))
    for pos in range(graph.n_pos):
        labels.append(("token", -1, pos, int(graph.input_tokens[pos])))
    for t in graph.logit_targets:
        labels.append(("logit", -1, graph.n_pos - 1, int(t.vocab_idx)))
    return labels


def circuit_tracer_graph(model_dir: str, transcoder_dir: str, tokens, *, max_n_logits: int = 10,
                         desired_logit_prob: float = 0.95, batch_size: int = 256,
                         max_feature_nodes: int | None = None, node_threshold: float = 0.8,
                         edge_threshold: float = 0.98, reps: int = 3, threads: int | None = None,
                         json_dir: str | None = None, slug: str = "ct-tiny", model=None) -> dict:
    """circuit-tracer's attribution graph of `tokens` (ids; a <bos> is prepended by circuit-tracer
    unless tokens[0] is a special id). Returns:

      adjacency [N, N] float32 (rows = targets, cols = sources), node order
        [selected features, errors (layer-major: layer * n_pos + pos), tokens (pos), logits];
      node_kind [N] ('feature'|'error'|'token'|'logit'), node_layer, node_pos, node_index [N]
        (feature index / -1 / token id / vocab id); n_features, n_layers, n_pos, n_logits;
      active_features [A, 3] (layer, pos, feature) of ALL active features (circuit-tracer's order),
        activation_values [A], selected_features [n_features] (indices into them);
      error_nodes [n_layers * n_pos, 2] (layer, pos);
      input_tokens, logit_tokens, logit_probabilities, logit_strings;
      prune (node_threshold, edge_threshold): node_mask [N], edge_mask [N, N], cumulative_scores [N];
      replacement_score, completeness_score;
      timing: first_wall_s / first_cpu_s (warm-up call) and wall_s / cpu_s (lists over `reps` calls),
        torch_threads; versions.
    With json_dir, circuit-tracer's `create_graph_files` writes json_dir/{slug}.json (+ graph-metadata.json).
    """
    import circuit_tracer
    import transformer_lens
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    if threads:
        torch.set_num_threads(threads)
    if model is None:
        model = load_replacement_model(model_dir, transcoder_dir)
    prompt = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    opts = dict(max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob, batch_size=batch_size,
                max_feature_nodes=max_feature_nodes)

    def run():
        w, c = time.perf_counter(), time.process_time()
        g = attribute(prompt, model, **opts)
        return g, time.perf_counter() - w, time.process_time() - c

    graph, first_wall, first_cpu = run()
    walls, cpus = [], []
    for _ in range(reps):
        _, w, c = run()
        walls.append(w)
        cpus.append(c)

    labels = _node_labels(graph)
    pruned = prune_graph(graph, node_threshold, edge_threshold)
    replacement, completeness = compute_graph_scores(graph)
    n_layers, n_pos = graph.cfg.n_layers, graph.n_pos
    out = {
        "adjacency": graph.adjacency_matrix.float().numpy(),
        "node_kind": np.array([l[0] for l in labels]), "node_layer": np.array([l[1] for l in labels]),
        "node_pos": np.array([l[2] for l in labels]), "node_index": np.array([l[3] for l in labels]),
        "n_features": len(graph.selected_features), "n_layers": n_layers, "n_pos": n_pos,
        "n_logits": len(graph.logit_targets),
        "active_features": graph.active_features.numpy().astype(np.int64),
        "activation_values": graph.activation_values.float().numpy(),
        "selected_features": graph.selected_features.numpy().astype(np.int64),
        "error_nodes": np.array([(l, p) for l in range(n_layers) for p in range(n_pos)], np.int64),
        "input_tokens": graph.input_tokens.numpy().astype(np.int64),
        "logit_tokens": np.array([t.vocab_idx for t in graph.logit_targets], np.int64),
        "logit_strings": np.array([t.token_str for t in graph.logit_targets]),
        "logit_probabilities": graph.logit_probabilities.float().numpy(),
        "node_threshold": node_threshold, "edge_threshold": edge_threshold,
        "node_mask": pruned.node_mask.numpy(), "edge_mask": pruned.edge_mask.numpy(),
        "cumulative_scores": pruned.cumulative_scores.float().numpy(),
        "replacement_score": replacement, "completeness_score": completeness,
        "first_wall_s": first_wall, "first_cpu_s": first_cpu, "wall_s": np.array(walls), "cpu_s": np.array(cpus),
        "torch_threads": torch.get_num_threads(),
        "versions": json.dumps({"circuit_tracer": circuit_tracer.__version__ if hasattr(circuit_tracer, "__version__")
                                else _dist_version("circuit-tracer"),
                                "transformer_lens": _dist_version("transformer-lens"), "torch": torch.__version__,
                                "transformers": _dist_version("transformers")}),
        "options": json.dumps({**opts, "max_feature_nodes_used": len(graph.selected_features)}),
    }
    del transformer_lens
    if json_dir:
        from circuit_tracer.utils.create_graph_files import create_graph_files
        create_graph_files(graph, slug, json_dir, scan=graph.scan, node_threshold=node_threshold,
                           edge_threshold=edge_threshold)
        out["json_path"] = os.path.join(json_dir, f"{slug}.json")
    return out


def _dist_version(name: str) -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixture", help="save a tiny HF model + transcoders")
    f.add_argument("out_dir")
    f.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"))
    f.add_argument("--layers", type=int, default=2)
    f.add_argument("--d-model", type=int, default=64)
    f.add_argument("--vocab", type=int, default=101)
    f.add_argument("--width", type=int, default=128)
    f.add_argument("--no-skip", action="store_true")
    f.add_argument("--act", default="relu", choices=("relu", "jumprelu"))
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--heads", type=int, default=4)
    f.add_argument("--enc-bias", type=float, default=-1.0, help="mean encoder bias (pre-activations ~ N(it, 1))")
    g = sub.add_parser("graph", help="circuit-tracer's graph -> .npz (+ its JSON)")
    g.add_argument("model_dir")
    g.add_argument("transcoder_dir")
    g.add_argument("--tokens", default="1,5,9,13,17,21,25,29", help="comma-separated ids (start with 1 = <bos>)")
    g.add_argument("--out", required=True, help=".npz path")
    g.add_argument("--json-dir")
    g.add_argument("--slug", default="ct-tiny")
    g.add_argument("--max-n-logits", type=int, default=10)
    g.add_argument("--desired-logit-prob", type=float, default=0.95)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--max-feature-nodes", type=int)
    g.add_argument("--node-threshold", type=float, default=0.8)
    g.add_argument("--edge-threshold", type=float, default=0.98)
    g.add_argument("--reps", type=int, default=3)
    g.add_argument("--threads", type=int)
    g.add_argument("--trim", action="store_true", help="keep only TEST_FIELDS in the .npz")
    g.add_argument("--verify", action="store_true",
                   help="also recompute the adjacency independently (independent_adjacency) and report the gap")
    a = p.parse_args(argv)
    if a.cmd == "fixture":
        print(json.dumps(make_fixture(a.out_dir, a.arch, a.layers, a.d_model, a.vocab, a.width, not a.no_skip,
                                      a.act, a.seed, a.heads, a.enc_bias), indent=1))
        return
    out = circuit_tracer_graph(a.model_dir, a.transcoder_dir, [int(t) for t in a.tokens.split(",")],
                               max_n_logits=a.max_n_logits, desired_logit_prob=a.desired_logit_prob,
                               batch_size=a.batch_size, max_feature_nodes=a.max_feature_nodes,
                               node_threshold=a.node_threshold, edge_threshold=a.edge_threshold, reps=a.reps,
                               threads=a.threads, json_dir=a.json_dir, slug=a.slug)
    if a.verify:
        mine = independent_adjacency(a.model_dir, a.transcoder_dir, out)
        ref = out["adjacency"]
        out["independent_adjacency"] = mine
        out["verify_max_abs_diff"] = float(np.abs(mine - ref).max())
        out["verify_rel_diff"] = float(np.abs(mine - ref).max() / np.abs(ref).max())
        print(json.dumps({"verify_max_abs_diff": out["verify_max_abs_diff"], "max_abs_edge": float(np.abs(ref).max()),
                          "verify_rel_diff": out["verify_rel_diff"]}))
    np.savez_compressed(a.out, **{k: v for k, v in out.items() if not a.trim or k in TEST_FIELDS})
    print(json.dumps({"out": a.out, "nodes": int(out["adjacency"].shape[0]), "features": out["n_features"],
                      "active": int(len(out["active_features"])), "logits": out["logit_tokens"].tolist(),
                      "probs": np.round(out["logit_probabilities"], 4).tolist(),
                      "kept_nodes": int(out["node_mask"].sum()), "kept_edges": int(out["edge_mask"].sum()),
                      "first_wall_s": round(out["first_wall_s"], 4), "wall_s": np.round(out["wall_s"], 4).tolist(),
                      "cpu_s": np.round(out["cpu_s"], 4).tolist(), "threads": out["torch_threads"],
                      "json": out.get("json_path"), "versions": json.loads(out["versions"])}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
