"""Learned masks: relaxations against hand values, the loss gradient against finite differences, a
planted problem with a known answer, vmapped runs against a loop, and orbax resume bit-identical."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcircuits as jc
from jaxcircuits.stats.criteria import Criterion
from jaxcircuits.methods import circuits, learned
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions import sites
from jaxcircuits.methods.learned import BETA, RELAXATIONS, Objective, Spec
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.engine.subsets import Pool
from tests.conftest import random_tokens

SPEC = Spec("hard_concrete", steps=12, learning_rate=0.1, init_logit=1.0, init_std=0.5, checkpoint_every=4)


def _problem(tiny, name="gpt2"):
    _, cfg, params = tiny(name)
    tgt, src = random_tokens(31, 2, 6), random_tokens(32, 2, 6)
    _, cache = jc.run_with_cache(params, cfg, src, sites=sites.EDGE_SOURCE)
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [9]]))
    return params, cfg, PatchingProblem.make(target_run(params, cfg, tgt), cache, P.select("all", np.ones(tgt.shape)),
                                             metric)


def _planted(w, data):
    """A metric [B] that only units 1 and 3 carry: data [B, U] is zero elsewhere."""
    return data @ (1.0 - w)


PLANTED = Objective(_planted, jnp.array([[0, 1.0, 0, 2.0, 0, 0], [0, 2.0, 0, 1.0, 0, 0]]),
                    tuple(f"u{i}" for i in range(6)))


def test_relaxations_against_hand_values():
    a = jnp.array([-20.0, -0.1, 0.0, np.log(3.0), 0.1, 20.0])
    sig, hc = RELAXATIONS["sigmoid"], RELAXATIONS["hard_concrete"]
    np.testing.assert_allclose(sig.sample(a, None), [0, 0.475021, 0.5, 0.75, 0.524979, 1], atol=1e-6)
    # gate: clip(sigmoid(a) * 1.2 - 0.1, 0, 1): 0.5 at a = 0, 0.75 * 1.2 - 0.1 = 0.8 at log 3
    np.testing.assert_allclose(hc.gate(a), [0, 0.470025, 0.5, 0.8, 0.529975, 1], atol=1e-6)
    # P(keep > 0) = sigmoid(a + BETA ln 11) (s > 1/12), P(keep = 1) = sigmoid(a - BETA ln 11) (s >= 11/12)
    np.testing.assert_allclose(hc.expected(a), jax.nn.sigmoid(a + 2 / 3 * np.log(11)), rtol=1e-6)
    assert BETA == 2 / 3
    samples = jax.vmap(lambda k: hc.sample(a, k))(jax.random.split(jax.random.PRNGKey(0), 40000))
    assert float(samples.min()) == 0 and float(samples.max()) == 1
    np.testing.assert_allclose((samples > 0).mean(0), jax.nn.sigmoid(a + 2 / 3 * np.log(11)), atol=0.01)
    np.testing.assert_allclose((samples == 1).mean(0), jax.nn.sigmoid(a - 2 / 3 * np.log(11)), atol=0.01)
    for name in RELAXATIONS:
        np.testing.assert_array_equal(learned.binarize(name, a), [False, False, False, True, True, True])


def test_bad_settings_raise_before_work():
    with pytest.raises(ValueError, match="unknown relaxation 'gumbel'"):
        Spec("gumbel")
    with pytest.raises(ValueError, match="steps=0"):
        Spec(steps=0)
    with pytest.raises(ValueError, match="lambdas"):
        learned.fit(PLANTED, [0.1, -1.0])
    with pytest.raises(ValueError, match="seeds"):
        learned.fit(PLANTED, [0.1, 0.2], seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="stop_at=3"):
        learned.fit(PLANTED, [0.1], spec=SPEC, stop_at=3)
    with pytest.raises(ValueError, match="nothing to learn"):
        learned.fit(Objective(_planted, jnp.zeros((2, 6)), PLANTED.labels), [0.1])
    with pytest.raises(ValueError, match="unknown level 'neuron'"):
        learned.objective(None, None, None, "neuron")


@pytest.mark.parametrize("relaxation", ["sigmoid", "hard_concrete"])
def test_loss_gradient_matches_finite_differences(tiny, relaxation):
    """d loss / d logits of every head (fixed hard-concrete noise) against central differences."""
    params, cfg, problem = _problem(tiny)
    obj = learned.head_objective(params, cfg, problem)
    base = jnp.asarray(learned.baselines(obj))
    key, eps = jax.random.PRNGKey(3), 1e-2
    logits = jnp.asarray(np.random.RandomState(0).normal(0.5, 0.5, obj.n_units), jnp.float32)
    shifts = jnp.asarray(np.concatenate([eps * np.eye(obj.n_units), -eps * np.eye(obj.n_units)]), jnp.float32)

    def f(a):
        return learned.loss(obj.metric, obj.data, base, relaxation, a, key, 0.01)[0]
    grad, vals = jax.jit(lambda: (jax.grad(f)(logits), jax.vmap(lambda d: f(logits + d))(shifts)))()
    assert np.abs(grad).max() > 1e-2
    fd = (vals[:obj.n_units] - vals[obj.n_units:]) / (2 * eps)
    # units whose keep weight crosses a clip point (0 or 1) within +-eps have a kink: not compared
    up, down = (np.asarray(RELAXATIONS[relaxation].sample(logits + d, key)) for d in (eps, -eps))
    inside = lambda k: (k > 0) & (k < 1)
    smooth = (inside(up) & inside(down)) | (up == down)
    assert smooth.sum() >= obj.n_units - 3
    np.testing.assert_allclose(grad[smooth], fd[smooth], rtol=3e-2, atol=2e-3 * np.abs(grad).max())


@pytest.mark.parametrize("relaxation", ["sigmoid", "hard_concrete"])
def test_planted_units_are_found(relaxation):
    """Only units 1 and 3 carry the metric: lambda = 0 keeps them (the others get no gradient and stay
    at init), a moderate lambda keeps exactly them, a huge one nothing."""
    spec = Spec(relaxation, steps=300, learning_rate=0.1, checkpoint_every=100)
    out = learned.learn(PLANTED, [0.0, 0.02, 50.0], seeds=[0, 1, 2], spec=spec)
    want = np.isin(np.arange(6), [1, 3])
    assert out.kept[0][want].all()
    np.testing.assert_array_equal(out.kept[1], want)
    np.testing.assert_array_equal(out.kept[2], np.zeros(6, bool))
    np.testing.assert_array_equal(out.size, [out.kept[0].sum(), 2, 0])
    full, none = out.training.baseline
    np.testing.assert_allclose(out.metric[1], full)                 # exact metric of the binary circuit
    np.testing.assert_allclose(out.metric[2], none)
    np.testing.assert_allclose(out.faith[1:], [1.0, 0.0])
    hist = out.training.history
    assert set(hist) == {"loss", "kept", "metric"} and hist["loss"].shape == (300, 3)
    assert hist["kept"][-1, 2] < 0.05 * hist["kept"][0, 2]


@pytest.fixture(scope="module")
def head_runs(tiny):
    """Three runs (lambdas 0, 0.01, 0.05; seeds 4, 5, 6) of SPEC at head level on tiny GPT-2."""
    params, cfg, problem = _problem(tiny)
    obj = learned.head_objective(params, cfg, problem)
    return obj, learned.fit(obj, [0.0, 0.01, 0.05], [4, 5, 6], SPEC)


def test_vmapped_runs_equal_the_single_run_loop(head_runs):
    obj, both = head_runs
    for i, (lam, seed) in enumerate(zip(both.lambdas, both.seeds)):
        one = learned.fit(obj, [lam], [seed], SPEC)
        np.testing.assert_allclose(one.state.logits[0], both.state.logits[i], rtol=1e-5, atol=1e-5)
        for k, v in one.history.items():
            np.testing.assert_allclose(v[:, 0], both.history[k][:, i], rtol=1e-5, atol=1e-6)
    assert np.abs(both.state.logits[0] - both.state.logits[2]).max() > 1e-2       # runs differ


@pytest.mark.parametrize("level", ["head", "edge"])
def test_exact_metric_of_binary_circuits_matches_circuits_evaluate(tiny, head_runs, level):
    """Each level's objective names the units of `sites.LEVELS` and trains (edges: on the edge
    site); the binary circuit's metric equals `circuits.evaluate` (run_masks)."""
    params, cfg, problem = _problem(tiny)
    obj = learned.objective(params, cfg, problem, level)
    assert obj.labels == sites.level(level).labels(cfg)
    training = head_runs[1] if level == "head" else learned.fit(
        obj, [0.0, 0.1], [1, 2], Spec("sigmoid", steps=2, init_std=3.0, checkpoint_every=2))
    out = learned.circuits_of(obj, training)
    assert out.kept.shape == (len(training.lambdas), obj.n_units)
    assert 0 < out.size.min() and out.size.max() < obj.n_units and len(set(map(bytes, out.kept))) > 1
    metric, full, none = circuits.evaluate(params, cfg, problem, level, out.kept)
    np.testing.assert_allclose(out.metric, metric, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(training.baseline, np.stack([full, none]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.faith, circuits.faithfulness(metric, full, none), rtol=1e-4, atol=1e-5)


def test_pool_objective_matches_the_ground_truth(tiny):
    """Over a pool (one layer's heads; other heads never patched) the exact circuit metric of every
    subset equals `circuits.ground_truth`'s."""
    params, cfg, problem = _problem(tiny)
    pool = Pool.heads(1, cfg.n_heads)
    obj = learned.head_objective(params, cfg, problem, pool)
    assert obj.labels == pool.labels() and obj.metric.plan.start_layer == 1
    gt = circuits.ground_truth(params, cfg, problem, pool, Criterion.parse(circuits.DEFAULT_CRITERION))
    np.testing.assert_allclose(learned.circuit_metric(obj, gt.subsets), gt.metric, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"kept must be bool \[N, 4\]"):
        learned.circuit_metric(obj, gt.subsets[:, :3])


def test_killed_run_resumes_bit_identical(head_runs, tmp_path, caplog):
    obj, straight = head_runs
    lambdas, seeds = straight.lambdas, straight.seeds
    part = learned.fit(obj, lambdas, seeds, SPEC, checkpoint_dir=str(tmp_path), stop_at=8)
    assert part.step == 8 and not part.done
    assert sorted(p.name for p in tmp_path.glob("step_*") if p.is_dir()) == ["step_4", "step_8"]
    with pytest.raises(ValueError, match="lambdas"):
        learned.fit(obj, [0.0, 0.01, 0.5], seeds, SPEC, checkpoint_dir=str(tmp_path))
    resumed = learned.fit(obj, lambdas, seeds, SPEC, checkpoint_dir=str(tmp_path))
    assert resumed.done and resumed.step == 12
    chex.assert_trees_all_equal(resumed.state, straight.state)
    chex.assert_trees_all_equal(resumed.history, straight.history)
    # a damaged newest checkpoint is skipped: resume from step 8, again bit-identical
    victim = next(p for p in (tmp_path / "step_12").rglob("*") if p.is_file() and p.stat().st_size)
    victim.write_bytes(b"\0" * victim.stat().st_size)
    again = learned.fit(obj, lambdas, seeds, SPEC, checkpoint_dir=str(tmp_path))
    assert "step_12 is damaged" in caplog.text
    chex.assert_trees_all_equal(again.state, straight.state)
