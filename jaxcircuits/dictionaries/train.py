"""Training a sparse dictionary with optax on a stream of activations (`stream`).

Each kind's loss is a row of `LOSSES`; with x the input [B, d_in], y the target [B, d_out] (x for
an SAE), f = encode(x) [B, F], y_hat = decode(f) and mse = mean_b ||y - y_hat||^2:

  relu      mse + sparsity * mean_b sum_i f_i ||w_dec_i||  (Anthropic's April 2024 update: an L1
            penalty weighted by the decoder row norms, which stay free)
  topk      mse + aux_coef * mean_b ||e - e_hat||^2 (Gao et al. 2024, AuxK): e = y - y_hat (no
            gradient), e_hat = the decoder rows of the k_aux largest relu pre-activations among the
            dead features (no bias); 0 while no feature is dead
  jumprelu  mse + sparsity * mean_b sum_i H(pre_i - theta_i) (Rajamanoharan et al. 2024, "Jumping
            Ahead"): an L0 penalty; the thresholds learn through straight-through estimators of
            the step's and JumpReLU's derivatives in theta, a rectangle kernel of width `bandwidth`
            (jax.custom_vjp): d/dtheta H(pre - theta) ~ -K((pre - theta) / eps) / eps and
            d/dtheta JumpReLU(pre) ~ -theta K((pre - theta) / eps) / eps; thresholds kept >= 0
  gated     mse + sparsity * mean_b ||relu(pi_gate)||_1 + mean_b ||y - y_hat_frozen(relu(pi_gate))||^2
            (Rajamanoharan et al. 2024, gated SAEs): the last term decodes the gate's relu through
            the decoder with its gradient stopped

The decoder rows of topk, jumprelu and gated are kept at unit norm: their gradient's component
along each row is removed, and rows are renormalised after each step. The optimiser is optax adam
after global-norm clipping (`clip`), its learning rate warmed up linearly over `warmup` steps and
decayed linearly to 0 over the last `decay` fraction of the steps. b_dec starts at the mean target
of the first buffer. Dead features: a feature that has not fired (f > 0) for `dead_tokens` training
tokens (counted in whole batches).

Every step is data-parallel over a 1-D mesh of `devices` local devices (the batch axis sharded,
params and optimiser state replicated; gradients are all-reduced by XLA). With a `checkpoint_dir`,
the state (params, adam's, the steps since each feature fired) and the buffer (`stream.BufferState`)
are saved every `checkpoint_every` steps (`storage.save_checkpoint`), and a run started again on
the same directory resumes from the newest intact checkpoint, bit-identical to an uninterrupted
run (same options, same source: `storage.fingerprint`, same device count).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcircuits import checks, logs, storage
from jaxcircuits.dictionaries import core
from jaxcircuits.dictionaries.stream import Buffer, BufferState

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Options:
    """Training settings (hashable: static in the compiled step).

    kind: a key of `LOSSES`; width: features F; k: active features ('topk' only); sparsity: the
    penalty weight of 'relu' (L1), 'jumprelu' (L0) and 'gated' (L1 of the gate); lr, warmup (steps),
    decay (the final fraction of steps decaying to 0), clip (global gradient norm); steps, batch
    (activations per step), buffer (activations in the shuffled buffer, >= 2 batches), seed (init,
    buffer and source order); checkpoint_every (steps per saved checkpoint and per history read);
    dead_tokens (tokens without firing that make a feature dead); k_aux (default out_dim // 2, at
    most F), aux_coef: 'topk''s AuxK; bandwidth: 'jumprelu''s STE kernel width; devices: the first n
    local devices (None: all).
    """

    kind: str
    width: int
    k: Optional[int] = None
    sparsity: float = 0.0
    lr: float = 3e-4
    steps: int = 1000
    batch: int = 4096
    buffer: int = 65536
    seed: int = 0
    checkpoint_every: int = 100
    warmup: int = 0
    decay: float = 0.2
    clip: float = 1.0
    dead_tokens: int = 1_000_000
    k_aux: Optional[int] = None
    aux_coef: float = 1 / 32
    bandwidth: float = 1e-3
    devices: Optional[int] = None

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise ValueError(f"kind={self.kind!r}: expected one of {sorted(LOSSES)}")
        if (self.kind == "topk") != (self.k is not None):
            raise ValueError(f"k (active features) is set for kind 'topk' only; got kind={self.kind!r}, k={self.k}")
        for name in ("width", "steps", "batch", "buffer", "checkpoint_every", "dead_tokens"):
            checks.count(name, getattr(self, name))
        for name in ("k", "k_aux", "devices"):
            if getattr(self, name) is not None:
                checks.count(name, getattr(self, name))
        for name in ("seed", "warmup"):
            checks.count(name, getattr(self, name), minimum=0)
        for name in ("sparsity", "aux_coef"):
            checks.within(name, getattr(self, name), 0)
        for name in ("lr", "clip", "bandwidth"):
            if checks.within(name, getattr(self, name)) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected a number > 0")
        checks.within("decay", self.decay, 0, 1)
        if self.k is not None and self.k > self.width:
            raise ValueError(f"k={self.k} active features exceed width={self.width}")
        if 2 * self.batch > self.buffer:
            raise ValueError(f"buffer={self.buffer} must hold at least two batches of batch={self.batch}")
        if self.warmup + round(self.decay * self.steps) > self.steps:
            raise ValueError(f"warmup={self.warmup} and decay={self.decay} of steps={self.steps} overlap")

    def config(self, d_in: int, d_out: int = 0) -> core.DictConfig:
        """The `core.DictConfig` trained: an SAE of d_in (d_out 0) or a transcoder d_in -> d_out."""
        return core.DictConfig(self.kind, d_in, self.width, d_out or None, self.k)


# ---- losses -------------------------------------------------------------------------------------

def _mse(y: Array, y_hat: Array) -> Array:
    return jnp.mean(jnp.sum((y - y_hat) ** 2, axis=-1))


def _rect(u: Array) -> Array:
    return (jnp.abs(u) < 0.5).astype(u.dtype)


def _sum_to(g: Array, like: Array) -> Array:
    return g.reshape(-1, like.shape[-1]).sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre: Array, threshold: Array, bandwidth: float) -> Array:
    """`core`'s JumpReLU, relu(pre) where pre > threshold, else 0 (pre [..., F], threshold [F]); the
    threshold's gradient is the straight-through estimate -threshold K((pre - threshold) / bandwidth) / bandwidth."""
    return jnp.where(pre > threshold, jax.nn.relu(pre), 0)


def _jumprelu_fwd(pre, threshold, bandwidth):
    return jumprelu(pre, threshold, bandwidth), (pre, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    pre, th = res
    d_th = -(th / bandwidth) * _rect((pre - th) / bandwidth) * g
    return g * ((pre > th) & (pre > 0)), _sum_to(d_th, th)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(pre: Array, threshold: Array, bandwidth: float) -> Array:
    """H(pre - threshold) as floats; no gradient to pre, the straight-through estimate
    -K((pre - threshold) / bandwidth) / bandwidth to the threshold."""
    return (pre > threshold).astype(pre.dtype)


def _step_fwd(pre, threshold, bandwidth):
    return heaviside(pre, threshold, bandwidth), (pre, threshold)


def _step_bwd(bandwidth, res, g):
    pre, th = res
    return jnp.zeros_like(pre), _sum_to(-_rect((pre - th) / bandwidth) / bandwidth * g, th)


heaviside.defvjp(_step_fwd, _step_bwd)


def _relu_loss(dc, o, p, x, y, dead):
    f = core.encode(dc, p, x)
    mse = _mse(y, core.decode(dc, p, f, x))
    l1 = jnp.mean(jnp.sum(f * jnp.linalg.norm(p["w_dec"], axis=-1), axis=-1))
    return mse + o.sparsity * l1, (f, (mse, l1))


def _topk_loss(dc, o, p, x, y, dead):
    pre = core.pre_acts(dc, p, x)
    f = core.KINDS["topk"].fn(dc, p, pre, x)
    y_hat = core.decode(dc, p, f, x)
    mse = _mse(y, y_hat)
    k_aux = min(dc.width, o.k_aux or max(1, dc.out_dim // 2))
    cand = jnp.where(dead, jax.nn.relu(pre), 0)
    vals, idx = jax.lax.top_k(cand, k_aux)
    e_hat = jnp.einsum("bk,bkd->bd", vals, p["w_dec"][idx])
    aux = jnp.where(dead.any(), _mse(jax.lax.stop_gradient(y - y_hat), e_hat), 0.0)
    return mse + o.aux_coef * aux, (f, (mse, aux))


def _jumprelu_loss(dc, o, p, x, y, dead):
    pre = core.pre_acts(dc, p, x)
    f = jumprelu(pre, p["threshold"], o.bandwidth)
    mse = _mse(y, core.decode(dc, p, f, x))
    l0 = jnp.mean(jnp.sum(heaviside(pre, p["threshold"], o.bandwidth), axis=-1))
    return mse + o.sparsity * l0, (f, (mse, l0))


def _gated_loss(dc, o, p, x, y, dead):
    pre = core.pre_acts(dc, p, x)
    f = core.KINDS["gated"].fn(dc, p, pre, x)
    mse = _mse(y, core.decode(dc, p, f, x))
    gate = jax.nn.relu(pre)
    l1 = jnp.mean(jnp.sum(gate, axis=-1))
    frozen = {**p, "w_dec": jax.lax.stop_gradient(p["w_dec"]), "b_dec": jax.lax.stop_gradient(p["b_dec"])}
    return mse + o.sparsity * l1 + _mse(y, core.decode(dc, frozen, gate, x)), (f, (mse, l1))


class Loss(NamedTuple):
    """A row of `LOSSES`: fn(dictionary config, options, params, x [B, d_in], y [B, d_out], dead bool
    [F]) -> (loss, (f [B, F], (mse, penalty))); penalty: what the second term is; unit_decoder:
    decoder rows held at unit norm."""

    fn: Callable
    penalty: str
    unit_decoder: bool


LOSSES: Dict[str, Loss] = {
    "relu": Loss(_relu_loss, "L1 weighted by decoder norms", False),
    "topk": Loss(_topk_loss, "AuxK", True),
    "jumprelu": Loss(_jumprelu_loss, "L0 (straight-through)", True),
    "gated": Loss(_gated_loss, "L1 of the gate", True),
}
HISTORY = ("loss", "mse", "penalty", "l0", "dead")     # per step: the loss, its terms, mean L0, dead fraction


# ---- the step -----------------------------------------------------------------------------------

@struct.dataclass
class TrainState:
    """params (`core` names), adam's state, since_fired int32 [F]: steps since each feature fired."""

    params: Dict[str, Array]
    opt_state: Any
    since_fired: Array


def _schedule(o: Options):
    n_decay = round(o.decay * o.steps)
    parts = [optax.linear_schedule(0.0, o.lr, o.warmup)] if o.warmup else []
    parts += [optax.constant_schedule(o.lr), optax.linear_schedule(o.lr, 0.0, max(n_decay, 1))]
    bounds = ([o.warmup] if o.warmup else []) + [o.steps - n_decay]
    return optax.join_schedules(parts, bounds)


def optimizer(o: Options) -> optax.GradientTransformation:
    """Global-norm clipping, then adam on the warmup / constant / linear-decay schedule."""
    return optax.chain(optax.clip_by_global_norm(o.clip), optax.adam(_schedule(o)))


def _unit_rows(w: Array) -> Array:
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


def _train_step(dc: core.DictConfig, o: Options, dead_steps: int, state: TrainState, batch: Array):
    """One adam step on batch [B, d_in + d_out] -> (state, HISTORY values [5])."""
    x = batch[:, :dc.d_in]
    y = batch[:, dc.d_in:] if dc.d_out else x
    row = LOSSES[dc.kind]
    dead = state.since_fired >= dead_steps
    (loss, (f, (mse, penalty))), g = jax.value_and_grad(row.fn, argnums=2, has_aux=True)(dc, o, state.params, x, y, dead)
    if row.unit_decoder:
        w = state.params["w_dec"]
        g = {**g, "w_dec": g["w_dec"] - jnp.sum(g["w_dec"] * w, axis=-1, keepdims=True) * w}
    updates, opt_state = optimizer(o).update(g, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if row.unit_decoder:
        params["w_dec"] = _unit_rows(params["w_dec"])
    if "threshold" in params:
        params["threshold"] = jnp.maximum(params["threshold"], 0.0)
    fired = (f > 0).any(axis=0)
    since = jnp.where(fired, 0, state.since_fired + 1)
    stats = jnp.stack([loss, mse, penalty, (f > 0).sum(-1).mean(), dead.mean()])
    return TrainState(params, opt_state, since), stats


@functools.lru_cache(maxsize=16)
def _compiled(dc: core.DictConfig, o: Options, dead_steps: int, mesh: Mesh):
    return jax.jit(functools.partial(_train_step, dc, o, dead_steps), out_shardings=NamedSharding(mesh, PartitionSpec()))


# ---- the loop -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Training:
    """A run after `step` steps: the dictionary's config, the options, the state (numpy leaves),
    the buffer's state, history {name in HISTORY: float [step]}."""

    config: core.DictConfig
    options: Options
    step: int
    state: TrainState
    buffer: BufferState
    history: Dict[str, np.ndarray]

    @property
    def params(self) -> Dict[str, np.ndarray]:
        return self.state.params

    @property
    def done(self) -> bool:
        return self.step >= self.options.steps

    def dead(self) -> np.ndarray:
        """bool [F]: the features that have not fired for `dead_tokens` tokens."""
        return np.asarray(self.state.since_fired) >= _dead_steps(self.options)

    def dictionary(self, host: str, layer: int) -> core.Dictionary:
        """The trained dictionary placed at `host` of `layer`."""
        return core.Dictionary(self.config, {k: jnp.asarray(v) for k, v in self.params.items()}, host, layer)


def _dead_steps(o: Options) -> int:
    return math.ceil(o.dead_tokens / o.batch)


def _devices(o: Options):
    devices = jax.devices()
    if o.devices is not None and o.devices > len(devices):
        raise ValueError(f"devices={o.devices}: only {len(devices)} devices are available")
    devices = devices[:o.devices or len(devices)]
    if o.batch % len(devices):
        raise ValueError(f"batch={o.batch} must be a multiple of the {len(devices)} devices it is split over")
    return Mesh(np.asarray(devices), ("batch",))


def _check_source(source) -> None:
    for attr in ("d_in", "d_out", "chunk", "fingerprint"):
        if not hasattr(source, attr):
            raise ValueError(f"source must be a `stream` source (d_in, d_out, chunk(i), fingerprint()), "
                             f"{type(source).__name__} has no {attr!r}")
    checks.count("source.d_in", source.d_in)
    checks.count("source.d_out", source.d_out, minimum=0)


def train(source, options: Options, checkpoint_dir: Optional[str] = None) -> Training:
    """Train a dictionary of `options` on `source` (a `stream` source: `ModelActivations`,
    `ArraySource`) through a `stream.Buffer`, with a progress bar (loss, L0, dead fraction).

    checkpoint_dir: save the state there every `checkpoint_every` steps (the newest two kept) and
    resume from the newest intact one if present (same options and source, else a ValueError naming
    what differs; one writer per directory, `storage.DirLock`).
    """
    o = options
    _check_source(source)
    dc = o.config(source.d_in, source.d_out)
    mesh = _devices(o)
    buffer = Buffer(source, o.buffer, o.batch, o.seed)
    params = core.init(dc, jax.random.PRNGKey(o.seed))
    state = TrainState(params, optimizer(o).init(params), jnp.zeros(dc.width, jnp.int32))
    buf = BufferState(np.zeros((o.buffer, source.d_in + source.d_out), np.float32), np.zeros(3, np.int64))
    start, hist = 0, np.zeros((0, len(HISTORY)), np.float32)
    meta = {"options": dataclasses.asdict(o), "d_in": source.d_in, "d_out": source.d_out, "devices": mesh.devices.size}
    with storage.maybe_lock(checkpoint_dir):
        if checkpoint_dir:
            meta["source"] = source.fingerprint()
            start, (state, buf), hist = storage.restore_checkpoint(checkpoint_dir, meta, (state, buf), hist)
        if start == 0:
            buf = buffer.init()
            y = buf.rows[:, dc.d_in:] if source.d_out else buf.rows
            state = state.replace(params={**state.params, "b_dec": jnp.asarray(y.mean(0))})
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        run = _compiled(dc, o, _dead_steps(o), mesh)
        batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
        with logs.progress(o.steps, f"{o.kind} dictionary (width {o.width})", "step", initial=start) as bar:
            step_ = start
            while step_ < o.steps:
                n = min(o.checkpoint_every - step_ % o.checkpoint_every, o.steps - step_)
                rows = []
                for _ in range(n):
                    batch, buf = buffer.next(buf)
                    state, h = run(state, jax.device_put(batch, batch_sharding))
                    rows.append(h)
                hist = np.concatenate([hist, np.asarray(jnp.stack(rows))])
                step_ += n
                bar.update(n)
                last = hist[-1]
                bar.set_postfix_str(f"loss {last[0]:.4g} L0 {last[3]:.3g} dead {last[4]:.2f}")
                if checkpoint_dir:
                    storage.save_checkpoint(checkpoint_dir, step_, (state, buf), hist, meta)
    state = jax.tree.map(np.asarray, state)
    return Training(dc, o, step_, state, buf, {k: hist[:, i] for i, k in enumerate(HISTORY)})
