"""Chunk size from memory: the compiler's memory analysis extrapolated from two chunk sizes
against XLA's buffer assignment at a large chunk, the size rule, the free-memory sources, and
run_masks / run_sweep choosing (and resuming with) the size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.engine import memory
from jaxcircuits.engine.patching import make_plan, masks_call, masks_metric, plan_layers, run_masks
from jaxcircuits.engine.runner import ChunkCall, chunking, stacked
from jaxcircuits.engine.subsets import Pool, of_size
from jaxcircuits.engine.sweep import run_sweep
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions.metrics import AnswerProb, LogitDiff
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.interventions.sites import Mask, footprint
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.params import init_params
from jaxcircuits.models.transformer import run_with_cache
from tests.conftest import random_tokens

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


def _call(params, cfg, problem, layer=1):
    """(the chunk call `run_masks` makes for head_out masks at `layer`, its items of 1 mask)."""
    masks = _masks(cfg, 1, layer)
    plan = make_plan({"head_out": [layer]}, problem.pos_w)
    layers = plan_layers(params, cfg, plan, problem.metric.n_positions)
    call = ChunkCall(masks_metric, dict(params=params, problem=problem.for_footprint(cfg, footprint(masks, batched=True)),
                                        layers=layers), dict(cfg=cfg, plan=plan), "masks")
    return call, stacked(masks)


# (HF config, batch, tokens, positions, metric): the softmax, the MLP, the metric dominate in turn.
CASES = [(LLAMA, 1, 128, "all", None),
         (GPT2, 2, 64, "last", None),
         (WIDE_VOCAB, 4, 8, "last", "answer_prob")]


@pytest.mark.parametrize("hf,batch,length,where,metric", CASES)
def test_extrapolated_bytes_match_xla_at_a_large_chunk(hf, batch, length, where, metric):
    """The estimate from two small compiled chunks (`memory.estimate`) predicts XLA:CPU's temp + output
    bytes for a chunk of ~4 MB of masks within 10%, whichever part of the run dominates."""
    cfg = ModelConfig.from_hf(hf)
    params = init_params(cfg, jax.random.PRNGKey(0))
    metric = AnswerProb(ids=jnp.full((batch, 2), 5)) if metric == "answer_prob" else None
    call, items = _call(params, cfg, _problem(cfg, params, batch, length, where, metric))
    mem = memory.estimate(lambda c: call.lower(items.take(0, c)))
    assert mem.per_item > 0
    n = max(int(2 ** np.round(np.log2(4e6 / mem.per_item))), 2 * memory.PROBES[-1])
    actual = memory.compiled_bytes(call.lower(items.take(0, n)))
    predicted = mem.fixed + n * mem.per_item
    assert 0.9 < actual / predicted < 1.1, (n, actual, predicted, mem)


def test_chunk_size_rule(caplog):
    mem = memory.ChunkMemory(per_item=100, fixed=50)
    assert mem.bytes(4) == 450
    assert memory.ChunkMemory(per_item=100, fixed=50, runtime=1.5).chunk_size(1, free=1000) == 2   # 450 // 150
    assert mem.chunk_size(1, free=1000) == 4                    # (0.5 * 1000 - 50) // 100 = 4
    assert mem.chunk_size(1, free=1300) == 4                    # 6 fits: the power of two below
    assert mem.chunk_size(1, free=1700) == 8
    assert mem.chunk_size(4, free=1000) == 16                   # 4 per device on 4 devices
    assert mem.chunk_size(4, free=10**9, max_chunk=8) == 8      # capped, still a multiple of 4
    assert mem.chunk_size(1, free=10**9) == memory.MAX_CHUNK
    assert mem.chunk_size(1, free=10**9, fraction=1.0, max_chunk=10**9) == 2 ** 23
    with caplog.at_level("WARNING"):
        assert mem.chunk_size(2, free=200) == 2                 # nothing fits: one per device, warned
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
    """chunk_size None and 0: when the largest chunk does not fit, the size `ChunkMemory.chunk_size`
    gives for the free memory (here 4 masks per device) from the call's estimate plus what the batch
    made for it, with the same values as an explicit chunk size."""
    _, cfg, params = tiny("llama_gqa")
    problem = _problem(cfg, params, 2, 6, "all")
    masks = _masks(cfg, 37)
    estimates = []

    def estimate(lower, key=None):
        estimates.append(key)
        return memory.ChunkMemory(per_item=1000, fixed=0)
    made = masks_call(params, cfg, problem, masks)[0].made          # the cut source and layer params
    monkeypatch.setattr(memory, "estimate", estimate)
    monkeypatch.setattr(memory, "free_bytes", lambda n: int((5 * 1000 + made) / memory.FRACTION))
    want = run_masks(params, cfg, problem, masks, chunk_size=7, shard=shard)
    per_chunk = 4 * (jax.device_count() if shard else 1)
    for size in (None, 0):
        starts = []
        got = run_masks(params, cfg, problem, masks, chunk_size=size, shard=shard,
                        on_chunk=lambda s, v: starts.append(s))
        assert starts == list(range(0, 37, per_chunk))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(estimates) == 2 and estimates[0] == estimates[1] and estimates[0] is not None


def test_the_largest_chunk_that_fits_runs_its_own_executable(tiny, monkeypatch):
    """With memory to spare, chunk_size None compiles the largest chunk once, measures it and runs
    that executable (no probe compilations, nothing compiled through the jit cache); with too little,
    the two probe compilations run once per call signature (model, plan, shapes), not per call."""
    _, cfg, params = tiny("llama_gqa")
    problem = _problem(cfg, params, 2, 6, "last")
    probes = []
    real = memory.compiled_bytes
    monkeypatch.setattr(memory, "compiled_bytes", lambda lowered: probes.append(1) or real(lowered))
    monkeypatch.setattr(memory, "_ESTIMATES", {})
    masks = _masks(cfg, 5)
    before = masks_metric._cache_size()
    got = run_masks(params, cfg, problem, masks, shard=False)
    assert probes == [] and masks_metric._cache_size() == before
    np.testing.assert_allclose(got, run_masks(params, cfg, problem, masks, chunk_size=2, shard=False), rtol=1e-5,
                               atol=1e-6)
    monkeypatch.setattr(memory, "free_bytes", lambda n: 5 * 10 ** 5)          # the whole batch does not fit, one mask does
    for seed in range(2):
        run_masks(params, cfg, problem, Mask(head_out=masks.head_out * (seed + 1) / 2), shard=False)
    assert len(probes) == len(memory.PROBES)


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
