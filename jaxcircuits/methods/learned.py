"""Learned circuits: continuous masks over units (heads or edges) trained with optax.

Each unit u has a logit a_u; a relaxation (`RELAXATIONS`) turns the logits into keep weights
k in [0, 1] (1 = the unit is in the circuit). Units not kept are patched from the source run: the
objective's metric is read at patch weights w = 1 - k. With f(w) [B] that metric, full = f(0)
(nothing patched) and none = f(1) (everything patched), each run minimises

    loss(a) = mean_b (f(1 - k)_b - full_b)^2 / mean_b (none_b - full_b)^2  +  lambda * sum_u E[keep_u]

(faithfulness: the circuit should reproduce the full model's metric on every prompt, in units of
the gap between keeping everything and nothing; sparsity: lambda per expected kept unit), with
optax.adam on the whole prompt batch at every step. Relaxations:

  sigmoid        k = sigmoid(a), deterministic; E[keep] = sigmoid(a).
  hard_concrete  Louizos et al. (2018), the relaxation of subnetwork probing: u ~ U(0, 1),
                 s = sigmoid((log u - log(1 - u) + a) / BETA), k = clip(s (ZETA - GAMMA) + GAMMA, 0, 1);
                 E[keep] = P(k > 0) = sigmoid(a - BETA log(-GAMMA / ZETA)).

The binary circuit keeps the units whose deterministic gate (sigmoid(a); hard concrete:
clip(sigmoid(a) (ZETA - GAMMA) + GAMMA, 0, 1)) exceeds 0.5, i.e. a > 0 for both, and its metric
is evaluated exactly (the objective's metric at binary patch weights).

One compiled call trains N runs at once: the step is vmapped over per-run penalty weights and
seeds, and `checkpoint_every` steps run as one jitted `lax.scan`. With a `checkpoint_dir`, the
training state is saved with orbax after every such segment (checksummed, `storage`), and a run
started again on the same directory resumes from the last checkpoint and ends bit-identical to an
uninterrupted one.

An `Objective` is generic (any `metric(patch_weights [U], data) -> [B]`); `objective(params, cfg,
problem, level)` builds one over every unit of a level of `sites.LEVELS` (heads, edges) and
`head_objective` one over the units of a `subsets.Pool`, both through `patching.patched_metric`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxcircuits import checks, logs, storage
from jaxcircuits.engine.patching import Plan, layers_touched, make_plan, patched_metric
from jaxcircuits.engine.subsets import Pool
from jaxcircuits.interventions import sites
from jaxcircuits.interventions.problem import PatchingProblem
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.methods import circuits
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.stats.criteria import indistinguishable

Array = jax.Array

# ---- relaxations --------------------------------------------------------------------------------

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1      # hard concrete temperature and stretch (Louizos et al.)


def _hard_concrete_sample(logits: Array, key: Array) -> Array:
    u = jax.random.uniform(key, logits.shape, minval=1e-6, maxval=1.0 - 1e-6)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + logits) / BETA)
    return jnp.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Relaxation:
    """Logits [..., U] -> keep weights in [0, 1]: `sample(logits, key)` (training; differentiable
    in the logits), `expected(logits)` (E[keep != 0] per unit, the sparsity penalty's count) and
    `gate(logits)` (deterministic, binarised at > 0.5)."""

    sample: Callable[[Array, Array], Array]
    expected: Callable[[Array], Array]
    gate: Callable[[Array], Array]


RELAXATIONS = {
    "sigmoid": Relaxation(lambda a, key: jax.nn.sigmoid(a), jax.nn.sigmoid, jax.nn.sigmoid),
    "hard_concrete": Relaxation(
        _hard_concrete_sample,
        lambda a: jax.nn.sigmoid(a - BETA * np.log(-GAMMA / ZETA)),
        lambda a: jnp.clip(jax.nn.sigmoid(a) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)),
}


def binarize(relaxation: str, logits) -> np.ndarray:
    """bool [..., U]: the units whose deterministic gate exceeds 0.5 (the binary circuit)."""
    return np.asarray(RELAXATIONS[relaxation].gate(jnp.asarray(logits))) > 0.5


# ---- what is trained ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Spec:
    """Training settings (hashable: a static argument of the compiled segment). relaxation: a key
    of `RELAXATIONS`; steps: adam steps; learning_rate: adam's; init_logit / init_std: the logits
    start at init_logit + init_std * N(0, 1) (init_logit 3: keep ~0.95, near the full model);
    checkpoint_every: steps per compiled segment, and per checkpoint."""

    relaxation: str = "hard_concrete"
    steps: int = 300
    learning_rate: float = 0.05
    init_logit: float = 3.0
    init_std: float = 0.0
    checkpoint_every: int = 50

    def __post_init__(self):
        if self.relaxation not in RELAXATIONS:
            raise ValueError(f"unknown relaxation {self.relaxation!r}; known: {sorted(RELAXATIONS)}")
        for name in ("steps", "checkpoint_every"):
            object.__setattr__(self, name, checks.count(name, getattr(self, name)))
        checks.within("init_logit", self.init_logit)
        checks.within("init_std", self.init_std, 0)
        if checks.within("learning_rate", self.learning_rate) <= 0:
            raise ValueError(f"learning_rate={self.learning_rate}: expected a number > 0")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a mask is trained on. metric(patch_weights [U], data) -> [B]: jax-traceable and
    differentiable in the weights (1 = the unit takes the source's value, 0 = it keeps the target's),
    and hashable by value or identity (a static argument of the compiled step); data: the arrays it
    reads (params, problem), passed to the compiled step as an argument, not baked in as constants;
    labels: the U unit names."""

    metric: Callable[[Array, Any], Array]
    data: Any
    labels: Tuple[str, ...]

    @property
    def n_units(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class _PoolMetric:
    """metric(w [U], (params, problem)): `patched_metric` with w scattered onto the pool's site, on
    the plan of the pool's footprint (from its first layer, the positions pos_w selects)."""

    cfg: ModelConfig
    pool: Pool
    plan: Plan

    def __call__(self, w: Array, data) -> Array:
        params, problem = data
        mask = Mask(**{self.pool.site: self.pool.scatter(w, self.pool.site_shape(self.cfg))})
        return patched_metric(params, self.cfg, problem, mask, self.plan)


@dataclasses.dataclass(frozen=True)
class _LevelMetric:
    """metric(w [U], (params, problem)): `patched_metric` of a level's mask of patch weights w
    (`sites.LEVELS`), on `plan` for node levels (the plan of every unit of the level)."""

    cfg: ModelConfig
    level: str
    plan: Optional[Plan]

    def __call__(self, w: Array, data) -> Array:
        params, problem = data
        return patched_metric(params, self.cfg, problem, sites.level(self.level).mask(self.cfg, w), self.plan)


def head_objective(params, cfg: ModelConfig, problem: PatchingProblem, pool: Optional[Pool] = None) -> Objective:
    """Units: a pool's (e.g. the heads of some layers, `subsets.Pool`; default every head's `head_out`,
    flat l * H + h as in `sites.LEVELS`); units outside the pool are never patched. The problem is
    checked and cut to the pool's footprint here, once (`PatchingProblem.for_footprint`)."""
    pool = pool or Pool.heads_of_layers(range(cfg.n_layers), cfg.n_heads)
    footprint = Mask(**{pool.site: np.asarray(pool.scatter(np.ones(pool.n, bool), pool.site_shape(cfg)))})
    plan = make_plan(layers_touched(footprint), problem.pos_w)
    return Objective(_PoolMetric(cfg, pool, plan), (params, problem.for_footprint(cfg, footprint)), pool.labels())


def objective(params, cfg: ModelConfig, problem: PatchingProblem, level: str) -> Objective:
    """The objective over every unit of a level of `sites.LEVELS` ('head': every head's `head_out`,
    flat l * H + h; 'edge': every valid edge, labels 's->r'). The problem is checked and cut to what
    the level's units read here, once."""
    lv = sites.level(level)
    labels = lv.labels(cfg)
    full = sites.footprint(lv.mask(cfg, np.ones(len(labels), np.float32)))
    plan = None if full.edges is not None else make_plan(layers_touched(full), problem.pos_w)
    return Objective(_LevelMetric(cfg, level, plan), (params, problem.for_footprint(cfg, full)), labels)


# ---- training -------------------------------------------------------------------------------------

@struct.dataclass
class TrainState:
    """N runs: logits [N, U], the adam state (leaves [N, ...]), PRNG keys uint32 [N, 2]."""

    logits: Array
    opt_state: Any
    keys: Array


HISTORY = ("loss", "kept", "metric")     # per step and run: loss, E[#kept], mean metric of the relaxed circuit


def _optimizer(spec: Spec) -> optax.GradientTransformation:
    return optax.adam(spec.learning_rate)


def init_state(spec: Spec, n_units: int, seeds) -> TrainState:
    """The state of N runs (seeds int [N]): logits init_logit + init_std * N(0, 1) from each seed."""
    def one(seed):
        key, k0 = jax.random.split(jax.random.PRNGKey(seed))
        logits = spec.init_logit + spec.init_std * jax.random.normal(k0, (n_units,))
        return TrainState(logits, _optimizer(spec).init(logits), key)
    return jax.vmap(one)(jnp.asarray(seeds, jnp.uint32))


def loss(metric: Callable, data, baseline: Array, relaxation: str, logits: Array, key: Array, lam) -> tuple:
    """One run's (loss, (E[#kept], mean metric)) at logits [U] (see the module doc); baseline [2, B]:
    the metric with nothing and with everything patched (`baselines`)."""
    relax = RELAXATIONS[relaxation]
    m = metric(1.0 - relax.sample(logits, key), data)
    full, none = baseline
    kept = relax.expected(logits).sum()
    return jnp.mean((m - full) ** 2) / jnp.mean((none - full) ** 2) + lam * kept, (kept, m.mean())


@functools.partial(jax.jit, static_argnames=("metric", "n_units"))
def _baselines(metric: Callable, n_units: int, data) -> Array:
    return jax.vmap(lambda w: metric(w, data))(jnp.stack([jnp.zeros(n_units), jnp.ones(n_units)]))


def baselines(obj: Objective) -> np.ndarray:
    """float [2, B]: the metric with nothing patched (full) and everything patched (none); ValueError
    if not finite, or equal within float noise on every prompt (nothing for a circuit to keep)."""
    base = np.asarray(_baselines(obj.metric, obj.n_units, obj.data))
    if base.ndim != 2 or not np.isfinite(base).all():
        raise ValueError(f"the objective's metric must be finite [B]; with nothing / everything patched it "
                         f"gave shape {base.shape[1:]}, finite: {np.isfinite(base).all()}")
    if np.all(indistinguishable(base[0], base[1])):
        raise ValueError("the metric is the same within float noise with nothing and with everything patched "
                         f"(means {base[0].mean():g}, {base[1].mean():g}): nothing to learn")
    return base


@functools.partial(jax.jit, static_argnames=("metric", "spec", "n"))
def _segment(metric: Callable, spec: Spec, n: int, state: TrainState, lambdas: Array, data, baseline: Array):
    """n steps of every run (vmapped over runs, scanned over steps) -> (state, history [n, 3, N])."""
    opt = _optimizer(spec)

    def one(st: TrainState, lam):
        key, sub = jax.random.split(st.keys)
        f = functools.partial(loss, metric, data, baseline, spec.relaxation)
        (value, (kept, m)), g = jax.value_and_grad(f, argnums=0, has_aux=True)(st.logits, sub, lam)
        updates, opt_state = opt.update(g, st.opt_state, st.logits)
        return TrainState(optax.apply_updates(st.logits, updates), opt_state, key), jnp.stack([value, kept, m])

    def step(st, _):
        st, h = jax.vmap(one)(st, lambdas)
        return st, h.T
    return jax.lax.scan(step, state, None, length=n)


@dataclasses.dataclass(frozen=True)
class Training:
    """N runs after `step` steps: lambdas float [N], seeds int [N], the state (logits [N, U], ...),
    history {name in HISTORY: float [step, N]}, baseline [2, B] (full, none)."""

    spec: Spec
    lambdas: np.ndarray
    seeds: np.ndarray
    step: int
    state: TrainState
    history: Dict[str, np.ndarray]
    baseline: np.ndarray

    @property
    def done(self) -> bool:
        return self.step >= self.spec.steps


def _runs(lambdas, seeds) -> Tuple[np.ndarray, np.ndarray]:
    lambdas = np.asarray(lambdas, np.float32)
    if lambdas.ndim != 1 or not lambdas.size or not np.isfinite(lambdas).all() or (lambdas < 0).any():
        raise ValueError(f"lambdas must be a non-empty vector of finite values >= 0, got {lambdas!r}")
    seeds = np.asarray(seeds)
    if (not np.issubdtype(seeds.dtype, np.integer) or (seeds < 0).any()
            or seeds.shape not in ((), lambdas.shape)):
        raise ValueError(f"seeds must be one integer >= 0 or one per lambda, got {seeds!r}")
    return lambdas, np.broadcast_to(seeds, lambdas.shape).astype(np.int64)


def fit(obj: Objective, lambdas, seeds=0, spec: Spec = Spec(), checkpoint_dir: Optional[str] = None,
        stop_at: Optional[int] = None) -> Training:
    """Train one run per penalty weight lambdas [N] (seeds: one int, or one per run) in one
    compiled call per `spec.checkpoint_every` steps, with a progress bar (loss, E[#kept], metric).

    checkpoint_dir: save the state there after every segment (orbax; the last two kept, each
    checksummed) and resume from the newest intact one if present: same runs, spec and objective
    (`storage.fingerprint` of its params, problem and units), else a ValueError naming what
    differs; one writer per directory (`storage.DirLock`). stop_at: end after that step (a multiple
    of checkpoint_every), as if killed there; a later call resumes.
    """
    lambdas, seeds = _runs(lambdas, seeds)
    end = spec.steps if stop_at is None else int(stop_at)
    if not 0 < end <= spec.steps or (end < spec.steps and end % spec.checkpoint_every):
        raise ValueError(f"stop_at={stop_at}: expected a multiple of checkpoint_every={spec.checkpoint_every} "
                         f"in (0, steps={spec.steps}]")
    if obj.n_units < 1:
        raise ValueError("the objective has no units")
    baseline = baselines(obj)
    meta = {"lambdas": lambdas.tolist(), "seeds": seeds.tolist(), "n_units": obj.n_units,
            "spec": dataclasses.asdict(spec)}
    state = init_state(spec, obj.n_units, seeds)
    start, hist = 0, np.zeros((0, len(HISTORY), len(lambdas)), np.float32)
    with storage.maybe_lock(checkpoint_dir):
        if checkpoint_dir:
            meta["objective"] = _fingerprint(obj)                  # hashing params and problem: only to resume
            start, state, hist = storage.restore_checkpoint(checkpoint_dir, meta, state, hist)
        with logs.progress(end, f"learned masks ({len(lambdas)} runs)", "step", initial=start) as bar:
            step = start
            while step < end:
                n = min(spec.checkpoint_every - step % spec.checkpoint_every, end - step)
                state, h = _segment(obj.metric, spec, n, state, jnp.asarray(lambdas), obj.data, jnp.asarray(baseline))
                hist = np.concatenate([hist, np.asarray(h)])
                step += n
                bar.update(n)
                last = hist[-1]
                bar.set_postfix_str(f"loss {last[0].mean():.4g} kept {last[1].min():.3g}..{last[1].max():.3g} "
                                    f"metric {last[2].mean():.4g}")
                if checkpoint_dir:
                    storage.save_checkpoint(checkpoint_dir, step, state, hist, meta)
    history = {k: hist[:, i] for i, k in enumerate(HISTORY)}
    return Training(spec, lambdas, seeds, step, state, history, baseline)


# ---- checkpoints --------------------------------------------------------------------------------

def _fingerprint(obj: Objective) -> str:
    """What an objective trains on: its metric's type, its data's arrays (params, problem) and its labels."""
    return storage.fingerprint(type(obj.metric).__qualname__, obj.data, obj.labels)


# ---- binary circuits ------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("metric",))
def _metric_of_kept(metric: Callable, kept: Array, data) -> Array:
    return jax.vmap(lambda k: metric(1.0 - k, data))(kept)


@dataclasses.dataclass(frozen=True)
class LearnedCircuits:
    """One binary circuit per run: lambdas [N], seeds [N], kept bool [N, U] (`binarize`), size int
    [N], metric [N, B] of the binary circuit (exact: every unit not kept patched), faith [N]
    (`circuits.faithfulness` against full = baseline[0], none = baseline[1]), labels [U], and the
    `Training` they came from."""

    lambdas: np.ndarray
    seeds: np.ndarray
    kept: np.ndarray
    size: np.ndarray
    metric: np.ndarray
    faith: np.ndarray
    labels: Tuple[str, ...]
    training: Training


def circuit_metric(obj: Objective, kept) -> np.ndarray:
    """float [N, B]: the metric of each binary circuit kept bool [N, U] (every unit not kept patched),
    exact: the objective's metric at patch weights 1 - kept, in one vmapped call."""
    kept = np.asarray(kept, bool)
    if kept.ndim != 2 or kept.shape[1] != obj.n_units:
        raise ValueError(f"kept must be bool [N, {obj.n_units}] (the objective's units), got shape {kept.shape}")
    return np.asarray(_metric_of_kept(obj.metric, jnp.asarray(kept, jnp.float32), obj.data))


def circuits_of(obj: Objective, training: Training) -> LearnedCircuits:
    """The binary circuit of each run of `training` (`binarize`) and its exact metric (`circuit_metric`)."""
    kept = binarize(training.spec.relaxation, training.state.logits)
    metric = circuit_metric(obj, kept)
    full, none = training.baseline
    return LearnedCircuits(training.lambdas, training.seeds, kept, kept.sum(-1), metric,
                           circuits.faithfulness(metric, full, none), obj.labels, training)


def learn(obj: Objective, lambdas, seeds=0, spec: Spec = Spec(),
          checkpoint_dir: Optional[str] = None) -> LearnedCircuits:
    """`fit` every run to the end (resuming from checkpoint_dir if given), then `circuits_of`."""
    return circuits_of(obj, fit(obj, lambdas, seeds, spec, checkpoint_dir))
