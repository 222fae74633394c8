"""Chunk size from memory: the footprint formula against XLA's buffer assignment, the size rule,
the free-memory sources, and run_masks / run_sweep choosing (and resuming with) the size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.engine import memory
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions.metrics import AnswerProb, LogitDiff, answer_log_prob
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.params import init_params
from jaxcircuits.models.transformer import run_with_cache
from jaxcircuits.engine.patching import PatchingProblem, chunking, make_plan, masks_metric, run_masks, target_run
from jaxcircuits.interventions.sites import Mask, footprint
from jaxcircuits.engine.subsets import Pool, of_size
from jaxcircuits.engine.sweep import run_sweep
from tests.conftest import random_tokens

# Small models with head dim 32 (with the fixtures' 8 to 16, XLA:CPU fuses the scores away).
LLAMA = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=500, max_position_embeddings=256, tie_word_embeddings=True)
GPT2 = dict(model_type="gpt2", n_embd=128, n_layer=3, n_head=4, n_positions=256, vocab_size=500)
# A wide vocabulary, where the metric's full-vocabulary logits outweigh a layer.
WIDE_VOCAB = dict(LLAMA, hidden_size=32, intermediate_size=64, head_dim=8, vocab_size=20000)


def _problem(cfg, params, batch, length, where, metric=None):
    tgt, src = random_tokens(0, batch, length), random_tokens(1, batch, length)
    _, cache = run_with_cache(params, cfg, src, sites=("head_out",))
    metric = metric or LogitDiff(good=jnp.full((batch, 1), 5), bad=jnp.full((batch, 1), 7))
    return PatchingProblem.make(target_run(params, cfg, tgt), cache, P.select(where, np.ones(tgt.shape)), metric)


def _masks(cfg, n, layer=1):
    m = np.zeros((n, cfg.n_layers, cfg.n_heads), np.float32)
    m[:, layer, ::2] = 1.0
    return Mask(head_out=m)


def _xla_temp(params, cfg, problem, n, layer=1):
    """(plan, temp bytes) of XLA's buffer assignment for a chunk of n masks."""
    masks = _masks(cfg, n, layer)
    touched = footprint(masks, batched=True)
    plan = make_plan({"head_out": [layer]}, problem.pos_w)
    compiled = masks_metric.lower(params, cfg, problem.for_footprint(cfg, touched), masks, plan).compile()
    return plan, compiled.memory_analysis().temp_size_in_bytes


# (HF config, batch, tokens, positions, metric, the phase that should dominate)
CASES = [(LLAMA, 1, 128, "all", None, "softmax"),
         (GPT2, 2, 64, "last", None, "mlp"),
         (LLAMA, 2, 16, "all", None, "mlp"),
         (GPT2, 2, 16, "all", None, "mlp"),
         (WIDE_VOCAB, 4, 8, "last", "answer_prob", "metric")]


@pytest.mark.parametrize("hf,batch,length,where,metric,dominant", CASES)
def test_chunk_bytes_match_xla_buffer_assignment(hf, batch, length, where, metric, dominant):
    """XLA:CPU's temp bytes for a chunk of ~4 MB of subsets are fixed + chunk x per_subset within
    -50%..+15% (the prediction errs on the safe side), whichever phase dominates."""
    cfg = ModelConfig.from_hf(hf)
    params = init_params(cfg, jax.random.PRNGKey(0))
    metric = AnswerProb(ids=jnp.full((batch, 2), 5)) if metric == "answer_prob" else None
    problem = _problem(cfg, params, batch, length, where, metric)
    plan = make_plan({"head_out": [1]}, problem.pos_w)
    fp = memory.footprint(params, cfg, plan, (batch, length), problem.metric)
    layer = {k: batch * fp.phases[k] for k in ("projections", "softmax", "mlp")}
    assert max({**layer, "metric": fp.phases["metric"]}.items(), key=lambda kv: kv[1])[0] == dominant
    n = int(2 ** np.round(np.log2(4e6 / fp.per_subset)))
    _, temp = _xla_temp(params, cfg, problem, n)
    predicted = fp.fixed + n * fp.per_subset
    assert 0.5 < temp / predicted < 1.15, (n, temp, predicted, fp.phases)


def test_layer_bytes_by_hand():
    """The three points of a layer for one config, computed by hand (gated and not)."""
    cfg = ModelConfig.from_hf(WIDE_VOCAB)             # D=32, H=4, K=2, Dh=8, F=64, gated
    got = memory.layer_bytes(cfg, suffix_len=3, seq_len=10, a=2)
    assert got == {"projections": 2 * 3 * (64 + 32 + 2 * 16),
                   "softmax": 4 * 3 * 4 * 3 * 10 + 2 * 2 * 3 * 32,
                   "mlp": 2 * 3 * (64 + 3 * 64)}
    gpt2 = ModelConfig.from_hf(dict(model_type="gpt2", n_embd=16, n_layer=1, n_head=2, n_positions=8, vocab_size=11))
    assert memory.layer_bytes(gpt2, 1, 4, 4)["mlp"] == 4 * (32 + 2 * 64)


def test_metric_bytes_are_its_largest_array_that_reads_h():
    """Full-vocabulary metrics: their float32 logits [B, n', V]; LogitDiff: nothing of size V (the
    unembedding's own transpose, which does not depend on h, is not counted)."""
    cfg = ModelConfig.from_hf(WIDE_VOCAB)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    B, V, D = 3, cfg.vocab_size, cfg.d_model
    assert memory.metric_bytes(params, AnswerProb(ids=jnp.zeros((B, 2), jnp.int32)), B, D, jnp.float32) == 4 * B * V
    assert memory.metric_bytes(params, answer_log_prob([[1, 2, 3]] * B), B, D, jnp.float32) == 4 * B * 3 * V
    ld = LogitDiff(good=jnp.zeros((B, 1), jnp.int32), bad=jnp.ones((B, 1), jnp.int32))
    assert memory.metric_bytes(params, ld, B, D, jnp.float32) < 4 * V


def test_chunk_size_rule(caplog):
    fp = memory.Footprint(per_subset=100, fixed=50)
    assert fp.bytes(4) == 450
    assert memory.Footprint(per_subset=100, fixed=50, runtime=1.5).chunk_size(1, free=1000) == 2   # 450 // 150
    assert fp.chunk_size(1, free=1000) == 4                     # (0.5 * 1000 - 50) // 100 = 4
    assert fp.chunk_size(1, free=1300) == 4                     # 6 fits: the power of two below
    assert fp.chunk_size(1, free=1700) == 8
    assert fp.chunk_size(4, free=1000) == 16                    # 4 per device on 4 devices
    assert fp.chunk_size(4, free=10**9, max_chunk=8) == 8       # capped, still a multiple of 4
    assert fp.chunk_size(1, free=10**9) == memory.MAX_CHUNK
    assert fp.chunk_size(1, free=10**9, fraction=1.0, max_chunk=10**9) == 2 ** 23
    with caplog.at_level("WARNING"):
        assert fp.chunk_size(2, free=200) == 2                  # nothing fits: one per device, warned
    assert "predicted to need" in caplog.text


class _Device:
    platform = "gpu"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_free_bytes_from_device_stats_or_host(monkeypatch):
    avail = memory._meminfo_available()
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert 0 < avail <= total
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 8000)
    assert memory.free_bytes(1) == 8000 and memory.free_bytes(4) == 2000      # CPU: the host, shared
    devices = [_Device({"bytes_limit": 1000, "bytes_in_use": 100}), _Device({"bytes_limit": 1000, "bytes_in_use": 300})]
    monkeypatch.setattr(jax, "local_devices", lambda: devices)
    assert memory.free_bytes(2) == 700 and memory.free_bytes(1) == 900        # the least free device


def test_chunking_rejects_a_negative_size(tiny):
    with pytest.raises(ValueError, match="chunk_size=-1"):
        chunking(10, -1, shard=False)
    _, cfg, params = tiny("llama_gqa")
    with pytest.raises(ValueError, match="chunk_size=-3"):
        run_masks(params, cfg, _problem(cfg, params, 2, 6, "last"), _masks(cfg, 3), chunk_size=-3)


@pytest.mark.parametrize("shard", [False, True])
def test_run_masks_chooses_the_chunk_from_memory(tiny, monkeypatch, shard):
    """chunk_size None and 0: the size `Footprint.chunk_size` gives for the free memory (here 4
    subsets per device), with the same values as an explicit chunk size."""
    _, cfg, params = tiny("llama_gqa")
    problem = _problem(cfg, params, 2, 6, "all")
    masks = _masks(cfg, 37)
    fp = memory.footprint(params, cfg, make_plan({"head_out": [1]}, problem.pos_w), (2, 6), problem.metric)
    monkeypatch.setattr(memory, "free_bytes", lambda n: int(fp.bytes(5) / memory.FRACTION))
    want = run_masks(params, cfg, problem, masks, chunk_size=7, shard=shard)
    per_chunk = 4 * (jax.device_count() if shard else 1)
    for size in (None, 0):
        starts = []
        got = run_masks(params, cfg, problem, masks, chunk_size=size, shard=shard,
                        on_chunk=lambda s, v: starts.append(s))
        assert starts == list(range(0, 37, per_chunk))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_run_sweep_resumes_with_the_chunk_size_in_its_spec(tiny, tmp_path, monkeypatch):
    """A sweep started with an explicit chunk size resumes with chunk_size=None whatever memory
    says now; a new one records the size from memory in its spec."""
    _, cfg, params = tiny("llama_gqa")
    problem = _problem(cfg, params, 2, 6, "last")
    pool, family = Pool.heads(1, cfg.n_heads), of_size(cfg.n_heads, 2)
    first = run_sweep(params, cfg, problem, pool, family, str(tmp_path / "a"), chunk_size=3, shard=False)
    monkeypatch.setattr(memory, "free_bytes", lambda n: 10**12)            # memory alone would say MAX_CHUNK
    again = run_sweep(params, cfg, problem, pool, family, str(tmp_path / "a"), shard=False)
    np.testing.assert_array_equal(again.metric, first.metric)
    new = run_sweep(params, cfg, problem, pool, family, str(tmp_path / "b"), shard=False)
    np.testing.assert_allclose(new.metric, first.metric, rtol=1e-5, atol=1e-6)
    import json
    assert json.load(open(tmp_path / "b" / "spec.json"))["chunk_size"] == family.size()   # min(MAX_CHUNK, N)
    assert json.load(open(tmp_path / "a" / "spec.json"))["chunk_size"] == 3
