"""Tests of fdjax.attacks.apgd: against the reference APGD, and invariants.

The reference numbers come from tests/reference/make_apgd_reference.py (the
authors' APGDAttack / APGDAttack_targeted on the digits MLP of
tests/digits_mlp.py), stored in tests/data/autoattack/apgd_reference.npz.
"""

import functools
import os

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from fdjax import parallel
from fdjax.attacks import apgd
from tests import digits_mlp

REFERENCE = os.path.join(
  os.path.dirname(__file__), 'data', 'autoattack', 'apgd_reference.npz'
)
# (name in the npz, norm, loss) of the reference's single runs from a given
# start: traced here (losses at every iterate) or run through the public API.
TRACED_RUNS = (
  ('ce_linf', 'linf', 'ce'),
  ('dlr_linf', 'linf', 'dlr'),
  ('ce_l2', 'l2', 'ce'),
)
TARGETED_RUNS = (
  ('dlrt_linf', 'linf', 'dlr-targeted'),
  ('cet_linf', 'linf', 'ce-targeted'),
)


@functools.cache
def reference():
  with np.load(REFERENCE) as f:
    return dict(f)


@functools.cache
def digits():
  """Test digits and the MLP with the weights the reference ran."""
  # Not digits_mlp.weights(): its L-BFGS result depends on the number of
  # BLAS threads (by ~1e-2), which would compare different models.
  _, _, x, y = digits_mlp.data()
  weights = {k: reference()[f'mlp_{k}'] for k in ('w1', 'b1', 'w2', 'b2')}
  return jnp.asarray(x), jnp.asarray(y), digits_mlp.logits_fn(weights)


def dist(d, norm):
  d = np.asarray(d, np.float64).reshape(len(d), -1)
  return np.abs(d).max(1) if norm == 'linf' else np.sqrt((d**2).sum(1))


# ---------------------------------------------------------------------------
# Against the reference.


def test_dlr_losses_match_reference():
  ref = reference()
  z, y, t = ref['dlr_logits'], ref['dlr_labels'], ref['dlr_targets']
  np.testing.assert_allclose(apgd.dlr_loss(z, y), ref['dlr'], rtol=1e-6)
  np.testing.assert_allclose(
    apgd.targeted_dlr_loss(z, y, t), ref['dlr_targeted'], rtol=1e-6
  )
  assert apgd.dlr_loss(z, y).dtype == jnp.float32


def test_dlr_gradient_vanishes_where_loss_is_flat():
  # The label's logit the 3rd largest: the loss is 1 around this point and
  # the gradient exactly zero (as the reference's), also under jit.
  z = jnp.array([[3.1, 7.3, 0.2, 5.7, -1.0]])
  y = jnp.array([0])
  assert float(apgd.dlr_loss(z, y)[0]) == pytest.approx(1.0)
  grad = jax.jit(jax.grad(lambda z: apgd.dlr_loss(z, y).sum()))(z)
  np.testing.assert_array_equal(grad, np.zeros_like(z))
  # Elsewhere it is the float64 derivative.
  y = jnp.array([1])
  grad = jax.jit(jax.grad(lambda z: apgd.dlr_loss(z, y).sum()))(z)
  z64 = np.asarray(z, np.float64)[0]
  den = z64[1] - z64[0]
  expected = np.zeros(5)
  expected[1] = -1 / den + (z64[1] - z64[3]) / den**2
  expected[3] = 1 / den
  expected[0] = -(z64[1] - z64[3]) / den**2
  np.testing.assert_allclose(grad[0], expected, rtol=1e-5, atol=1e-7)


def test_checkpoints_match_reference():
  ref = reference()
  steps = ref['checkpoint_num_steps']
  for n in np.unique(steps):
    np.testing.assert_array_equal(
      apgd.checkpoints(int(n)), ref['checkpoint_iters'][steps == n]
    )
    windows = apgd._windows(int(n))
    np.testing.assert_array_equal(
      windows[apgd.checkpoints(int(n))], ref['checkpoint_windows'][steps == n]
    )
  assert apgd.checkpoints(100).tolist() == [21, 40, 56, 69, 79, 86, 92, 98]


@functools.partial(jax.jit, static_argnames=('norm', 'loss'))
def traced_run(x, y, targets, start, epsilon, norm, loss):
  _, _, logits_fn = digits()
  return apgd._run(
    logits_fn,
    apgd._LOSS_FNS[loss],
    x,
    y,
    targets,
    start,
    epsilon,
    norm,
    jnp.float32(0.0),
    jnp.float32(1.0),
    100,
    0.75,
    trace=True,
  )


@pytest.mark.parametrize('name,norm,loss', TRACED_RUNS)
def test_iterates_match_reference(name, norm, loss):
  """One run from the reference's start point: losses and returned points."""
  ref = reference()
  x, y, _ = digits()
  n = ref['trajectory_targets'].shape[0]
  out = traced_run(
    x[:n],
    y[:n],
    jnp.asarray(ref['trajectory_targets']),
    jnp.asarray(ref[f'trajectory_start_{norm}']),
    ref[f'eps_{norm}'],
    norm,
    loss,
  )
  losses, ref_losses = np.asarray(out['losses']), ref[f'{name}_losses']
  close = np.isclose(losses, ref_losses, rtol=1e-4, atol=1e-5).all(0)
  # The DLR losses give bit-for-bit gradient signs. The cross-entropy, where
  # it saturates (loss ~1e-6, below a float32 ulp of 1), has ulp-level
  # differences from torch's that can send a few runs on other paths.
  assert close.sum() >= (n if 'dlr' in loss else n - 3), np.flatnonzero(~close)
  # Returned points, where the run followed the same path and its best loss
  # is not a saturated one. A best loss tied (to float32 precision) between
  # different points of a plateau can still pick another one: at most 2.
  same = close & (np.abs(ref[f'{name}_loss_best']) > 1e-4)
  assert same.sum() >= n // 2
  atol = 2e-5 if norm == 'linf' else 1e-4  # L2 iterates drift by ulps.
  for key, ref_key in (('x_best', 'x_best'), ('x_adv', 'x_best_adv')):
    diff = dist(np.asarray(out[key]) - ref[f'{name}_{ref_key}'], 'linf')
    assert np.sum(diff[same] > atol) <= 2, (key, np.flatnonzero(diff > atol))
  np.testing.assert_allclose(
    out['loss_best'][close],
    ref[f'{name}_loss_best'][close],
    rtol=1e-4,
    atol=1e-5,
  )
  np.testing.assert_array_equal(out['is_adv'], ref[f'{name}_is_adv'])
  # The returned adversarial points are misclassified and inside the ball.
  _, _, logits_fn = digits()
  adv = np.asarray(out['x_adv'])[np.asarray(out['is_adv'])]
  pred = np.asarray(logits_fn(adv)).argmax(1)
  assert np.all(pred != np.asarray(y[:n])[np.asarray(out['is_adv'])])
  eps = float(ref[f'eps_{norm}'])
  assert np.all(dist(out['x_adv'] - x[:n], norm) <= eps * (1 + 1e-5))


@pytest.mark.parametrize('name,norm,loss', TARGETED_RUNS)
def test_targeted_from_start_matches_reference(name, norm, loss):
  """APGD-T towards the 2nd-ranked class from the reference's start."""
  ref = reference()
  x, y, logits_fn = digits()
  n = ref['trajectory_targets'].shape[0]
  x, y = x[:n], y[:n]
  adv, is_adv = jax.jit(
    lambda x, y, start: apgd.apgd_targeted(
      logits_fn,
      None,
      x,
      y,
      epsilon=ref[f'eps_{norm}'],
      norm=norm,
      loss=loss,
      num_target_classes=1,
      x_init=start,
    )
  )(x, y, jnp.asarray(ref[f'trajectory_start_{norm}']))
  clean_ok = np.asarray(logits_fn(x)).argmax(1) == np.asarray(y)
  np.testing.assert_array_equal(
    is_adv, ~clean_ok | ref[f'{name}_is_adv']
  )  # The clean misclassified ones are not attacked.
  sel = clean_ok & ref[f'{name}_is_adv']
  diff = dist(np.asarray(adv)[sel] - ref[f'{name}_x_best_adv'][sel], 'linf')
  # Gradient signs agree bit for bit for DLR on most CPUs, but a component
  # at a float tie can round to the other sign on another CPU type and that
  # example's trajectory then diverges (seen on one example); saturated CE: see
  # above.
  assert np.sum(diff > 2e-5) <= (1 if 'dlr' in loss else 3), diff


@pytest.mark.parametrize(
  'attack,norm,num_keys',
  [
    ('apgd_ce', 'linf', 20),
    ('apgd_dlr', 'linf', 20),
    ('apgd_t', 'linf', 2),
    ('apgd_ce', 'l2', 20),
  ],
)
def test_robust_accuracy_matches_reference(attack, norm, num_keys):
  """AutoAttack's settings on 297 digits; means over seeds (random starts)."""
  ref = reference()
  x, y, logits_fn = digits()
  eps = float(ref[f'eps_{norm}'])
  if attack == 'apgd_t':
    fn = functools.partial(apgd.apgd_targeted, num_target_classes=9)
  else:
    fn = functools.partial(apgd.apgd, loss=attack.split('_')[1])
  run = jax.jit(lambda key: fn(logits_fn, key, x, y, epsilon=eps, norm=norm))
  robust = []
  for seed in range(num_keys):
    adv, is_adv = run(jax.random.key(seed))
    adv, is_adv = np.asarray(adv), np.asarray(is_adv)
    robust.append(1.0 - is_adv.mean())
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert np.all(dist(adv - x, norm) <= eps * (1 + 1e-5))
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    pred = np.asarray(logits_fn(adv)).argmax(1)
    np.testing.assert_array_equal(pred != np.asarray(y), is_adv)
    np.testing.assert_array_equal(adv[~is_adv], np.asarray(x)[~is_adv])
  ref_robust = ref[f'robust_{attack}_{norm}'].mean()
  assert np.mean(robust) <= ref_robust + 0.01, (np.mean(robust), ref_robust)


# ---------------------------------------------------------------------------
# Invariants on a tiny linear model.

TINY = dict(num_steps=10)


def tiny_logits_fn(v):
  """A fixed small 5-class MLP on [batch, 3, 4, 1] images."""
  rng = np.random.default_rng(0)
  w1 = jnp.asarray(rng.normal(0, 3, (12, 8)), jnp.float32)
  b1 = jnp.asarray(rng.normal(0, 1, 8), jnp.float32)
  w2 = jnp.asarray(rng.normal(0, 1, (8, 5)), jnp.float32)
  return jnp.tanh(v.reshape(v.shape[0], -1) @ w1 + b1) @ w2


def tiny_problem(n=8, seed=0):
  """(logits_fn, images, labels); the first example is misclassified."""
  rng = np.random.default_rng(seed + 1)
  x = jnp.asarray(rng.uniform(0, 1, (n, 3, 4, 1)), jnp.float32)
  y = jnp.argmax(tiny_logits_fn(x), axis=1)
  return tiny_logits_fn, x, y.at[0].set((y[0] + 1) % 5)


@jax.jit
@chex.assert_max_traces(n=1)  # Every call: 8 examples, any key and epsilon.
def tiny_apgd(key, x, y, ids, epsilon):
  return apgd.apgd(
    tiny_logits_fn, key, x, y, epsilon=epsilon, example_ids=ids, **TINY
  )


@functools.cache
def tiny_attack(targeted, norm, num_restarts=1, loss=None):
  if (targeted, norm, num_restarts) == (False, 'linf', 1) and loss in (
    None,
    'ce',
  ):
    return tiny_apgd
  fn = apgd.apgd_targeted if targeted else apgd.apgd
  kwargs = dict(TINY, norm=norm, num_restarts=num_restarts)
  if loss is not None:
    kwargs['loss'] = loss
  if targeted:
    kwargs['num_target_classes'] = 3

  @jax.jit
  def attack(key, x, y, ids, epsilon):
    return fn(
      tiny_logits_fn, key, x, y, epsilon=epsilon, example_ids=ids, **kwargs
    )

  return attack


@pytest.mark.parametrize(
  'targeted,norm,loss',
  [
    (False, 'linf', 'ce'),
    (False, 'l2', 'dlr'),
    (True, 'l2', 'ce-targeted'),
  ],
)
def test_invariants(targeted, norm, loss):
  logits_fn, x, y = tiny_problem(8)
  attack = tiny_attack(targeted, norm, loss=loss)
  key, ids = jax.random.key(3), jnp.arange(8)
  broken, compiled = [], None
  for eps in (0.02, 0.3) if norm == 'linf' else (0.05, 1.0):
    adv, is_adv = attack(key, x, y, ids, eps)
    compiled = compiled or attack._cache_size()
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert is_adv.shape == (8,) and is_adv.dtype == bool
    assert np.all(dist(adv - x, norm) <= eps * (1 + 1e-5))
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    pred = np.asarray(logits_fn(adv)).argmax(1)
    np.testing.assert_array_equal(pred != np.asarray(y), is_adv)
    # The misclassified example is not attacked: returned clean.
    assert bool(is_adv[0])
    np.testing.assert_array_equal(adv[0], x[0])
    broken.append(int(is_adv.sum()))
  assert 1 <= broken[0] < broken[1]
  assert attack._cache_size() == compiled  # A new epsilon: no recompile.
  # Other examples in the first half change nothing in the second half
  # (data_parallel below checks a split over devices).
  _, x2, y2 = tiny_problem(8, seed=7)
  x2, y2 = x2.at[4:].set(x[4:]), y2.at[4:].set(y[4:])
  adv2, is_adv2 = attack(key, x2, y2, ids, eps)
  np.testing.assert_array_equal(adv2[4:], adv[4:])
  np.testing.assert_array_equal(is_adv2[4:], is_adv[4:])


def test_restarts_only_change_unbroken_examples():
  logits_fn, x, y = tiny_problem(8, seed=1)
  key, ids, eps = jax.random.key(5), jnp.arange(8), 0.06
  adv1, is_adv1 = tiny_attack(False, 'linf')(key, x, y, ids, eps)
  adv3, is_adv3 = tiny_attack(False, 'linf', 3)(key, x, y, ids, eps)
  assert np.all(is_adv3 >= is_adv1)
  np.testing.assert_array_equal(adv3[is_adv1], adv1[is_adv1])
  assert is_adv3.sum() > is_adv1.sum()  # The restarts found more.
  # The restarts draw other starts: a run with another key differs.
  adv_other, _ = tiny_attack(False, 'linf')(
    jax.random.fold_in(key, 1), x, y, ids, eps
  )
  assert not np.allclose(adv_other, adv1, atol=1e-4)


def test_switch_runs_each_choice_as_its_own_attack():
  # One program for several configurations (AutoAttack's APGD-CE and
  # APGD-T): each choice gives what its own attack gives, compiled once.
  x, y, logits_fn = digits()
  x, y, ids = x[:48], y[:48], jnp.arange(100, 148)
  key, eps = jax.random.key(4), 0.08
  choices = (
    ('ce', 2, None),
    ('dlr', 1, None),
    ('dlr-targeted', 1, 3),
    ('ce-targeted', 2, 2),
  )

  @jax.jit
  @chex.assert_max_traces(n=1)
  def switch(choice):
    return apgd.apgd_switch(
      logits_fn,
      key,
      x,
      y,
      choice,
      choices=choices,
      epsilon=eps,
      num_steps=12,
      example_ids=ids,
    )

  for i, (loss, restarts, targets) in enumerate(choices):
    kwargs = dict(epsilon=eps, num_steps=12, example_ids=ids, loss=loss)
    kwargs['num_restarts'] = restarts
    if targets is None:
      want = apgd.apgd(logits_fn, key, x, y, **kwargs)
    else:
      want = apgd.apgd_targeted(
        logits_fn, key, x, y, num_target_classes=targets, **kwargs
      )
    adv, is_adv = switch(np.int32(i))
    np.testing.assert_array_equal(is_adv, want[1], err_msg=loss)
    np.testing.assert_allclose(adv, want[0], atol=1e-6, err_msg=loss)
    assert 0 < int(is_adv.sum()) < 48
  with pytest.raises(ValueError, match='num_target_classes'):
    apgd.apgd_switch(
      logits_fn, key, x, y, 0, choices=(('dlr-targeted', 1, 10),), epsilon=eps
    )
  with pytest.raises(ValueError, match='unknown APGD-T loss'):
    apgd.apgd_switch(
      logits_fn, key, x, y, 0, choices=(('ce', 1, 3),), epsilon=eps
    )


def test_data_parallel_equals_one_device():
  mesh = parallel.make_mesh()
  logits_fn, x, y = tiny_problem(8, seed=4)
  key, ids = jax.random.key(4), jnp.arange(8)

  def attack(key, x, y, ids):
    return apgd.apgd(logits_fn, key, x, y, epsilon=0.3, example_ids=ids, **TINY)

  sharded = jax.jit(
    parallel.data_parallel(
      attack,
      mesh=mesh,
      in_specs=(P(), P('data'), P('data'), P('data')),
      out_specs=P('data'),
    )
  )
  adv, is_adv = sharded(key, x, y, ids)
  adv1, is_adv1 = tiny_attack(False, 'linf')(key, x, y, ids, 0.3)
  np.testing.assert_allclose(adv, adv1, atol=1e-6)
  np.testing.assert_array_equal(is_adv, is_adv1)


def test_loop_is_not_unrolled_and_result_is_constant():
  traces = []
  logits_fn, x, y = tiny_problem(4)

  def counting(v):
    traces.append(1)
    return logits_fn(v)

  jaxpr = jax.make_jaxpr(
    lambda x: apgd.apgd(
      counting, jax.random.key(0), x, y, epsilon=0.1, num_steps=50
    )
  )(x)
  assert len(traces) <= 3
  assert 'while' in str(jaxpr)
  # Under jit the attack is dead code for the gradient: a fast compile.
  grad = jax.jit(
    jax.grad(
      lambda x: jnp.sum(
        apgd.apgd(logits_fn, jax.random.key(0), x, y, epsilon=0.1, **TINY)[0]
      )
    )
  )(x)
  np.testing.assert_array_equal(grad, np.zeros_like(x))


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(norm='l1'), 'norm'),
    (dict(loss='xent'), 'loss'),
    (dict(num_steps=0), 'num_steps'),
    (dict(num_restarts=0), 'num_restarts'),
    (dict(bounds=(1.0, 0.0)), 'bounds'),
    (dict(key=None), 'key'),
    (dict(x_init=jnp.zeros((2, 12))), 'x_init'),
  ],
)
def test_apgd_rejects_bad_input(kwargs, match):
  logits_fn, x, y = tiny_problem(4)
  args = dict(key=jax.random.key(0), epsilon=0.1)
  args.update(kwargs)
  key = args.pop('key')
  with pytest.raises(ValueError, match=match):
    apgd.apgd(logits_fn, key, x, y, **args)


def test_apgd_targeted_rejects_bad_input():
  logits_fn, x, y = tiny_problem(4)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='num_target_classes'):
    apgd.apgd_targeted(logits_fn, key, x, y, epsilon=0.1, num_target_classes=5)
  with pytest.raises(ValueError, match='loss'):
    apgd.apgd_targeted(logits_fn, key, x, y, epsilon=0.1, loss='dlr')
  with pytest.raises(ValueError, match='num_classes'):
    apgd.dlr_loss(jnp.zeros((2, 2)), jnp.zeros(2, jnp.int32))


# ---------------------------------------------------------------------------
# Expectation over transformation (AutoAttack's 'rand').


def _noisy_linear(w, sigma):
  """A randomised linear model: logits of x + sigma * N(0, 1)."""

  def logits_fn(x, key):
    noise = sigma * jax.random.normal(key, x.shape, x.dtype)
    return (x + noise).reshape(len(x), -1) @ w

  return logits_fn


def test_eot_gradient_is_the_mean_over_draws_float64():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(12, 5)).astype(np.float32)
  x = rng.uniform(0.2, 0.8, size=(6, 3, 4)).astype(np.float32)
  y = rng.integers(0, 5, size=6)
  eps, sigma, eot = 0.05, 0.3, 5
  model_key = jax.random.key(3)
  out = jax.jit(
    lambda x: apgd._run(
      _noisy_linear(jnp.asarray(w), sigma),
      apgd._LOSS_FNS['ce'],
      x,
      jnp.asarray(y),
      jnp.asarray(y),
      x,
      eps,
      'linf',
      jnp.float32(0.0),
      jnp.float32(1.0),
      3,
      0.75,
      trace=True,
      eot_iter=eot,
      model_key=model_key,
    )
  )(jnp.asarray(x))
  # The first step moves by 2 eps along the sign of the gradient averaged
  # over the draws of evaluation 0, computed here in float64.
  grad = np.zeros(x.shape)
  for j in range(eot):
    k = jax.random.fold_in(jax.random.fold_in(model_key, 0), j)
    noise = np.asarray(sigma * jax.random.normal(k, x.shape, jnp.float32))
    z = (x + noise).reshape(6, -1).astype(np.float64) @ w.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(6), y] -= 1.0
    grad += (p @ w.T.astype(np.float64)).reshape(x.shape) / eot
  expected = np.clip(
    np.clip(x + 2 * eps * np.sign(grad), x - eps, x + eps), 0, 1
  )
  np.testing.assert_allclose(out['iterates'][1], expected, atol=1e-6)


def test_eot_on_a_deterministic_model_changes_nothing():
  x, y, logits_fn = digits()
  x, y = x[:16], y[:16]
  kw = dict(epsilon=0.1, num_steps=10)
  a = apgd.apgd(logits_fn, jax.random.key(0), x, y, **kw)
  b = apgd.apgd(
    lambda z, key: logits_fn(z),
    jax.random.key(0),
    x,
    y,
    eot_iter=2,
    model_key=jax.random.key(1),
    **kw,
  )
  np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_allclose(a[0], b[0], atol=1e-7)
  with pytest.raises(ValueError, match='eot_iter'):
    apgd.apgd(logits_fn, jax.random.key(0), x, y, eot_iter=0, **kw)
