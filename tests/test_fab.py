"""Tests of fdjax.attacks.fab against the reference FAB and on tiny models.

tests/data/autoattack/fab_reference.npz is written by
tests/reference/make_fab_reference.py from the authors' code on the digits
MLP of tests/digits_mlp.py.
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
from fdjax.attacks import fab
from tests import digits_mlp

REFERENCE = os.path.join(
  os.path.dirname(__file__), 'data', 'autoattack', 'fab_reference.npz'
)
EPS = {'linf': 0.1, 'l2': 0.5}
# Robust accuracy is checked on the first examples of the test digits (all
# 297 agree exactly too, but take longer than this file should).
NUM_ROBUST = 100


@functools.cache
def reference():
  return dict(np.load(REFERENCE))


@functools.cache
def digits():
  _, _, x, y = digits_mlp.data()
  return x, y, digits_mlp.logits_fn(digits_mlp.weights())


def dist(delta, norm):
  delta = np.asarray(delta, np.float64).reshape(len(delta), -1)
  if norm == 'linf':
    return np.abs(delta).max(1)
  return np.sqrt(np.square(delta).sum(1))


# ---------------------------------------------------------------------------
# Agreement with the reference.


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_projection_matches_reference(norm):
  ref = reference()
  t, w, b = ref['proj_t'], ref['proj_w'], ref['proj_b']
  project = {'linf': fab.projection_linf, 'l2': fab.projection_l2}[norm]
  d = np.asarray(jax.jit(project)(t, w, b))
  np.testing.assert_allclose(d, ref[f'proj_{norm}'], rtol=0, atol=1e-5)
  # The steps stay in the box and reach the hyperplane where it can be
  # reached (the inputs exercise every branch, unreachable ones included).
  assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)
  residual = np.abs(np.sum(w * (t + d), 1) - b)
  reached = residual < 1e-3
  assert 0 < (~reached).sum() < len(t) // 4


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_projection_is_minimal_in_general_box(norm):
  """Against brute force: no smaller step of the box reaches the plane."""
  rng = np.random.default_rng(3)
  lo, hi = -0.5, 2.0
  t = rng.uniform(lo, hi, (64, 5)).astype(np.float32)
  w = rng.normal(size=(64, 5)).astype(np.float32)
  b = (np.sum(w * t, 1) + rng.normal(0, 0.5, 64)).astype(np.float32)
  project = {'linf': fab.projection_linf, 'l2': fab.projection_l2}[norm]
  project = jax.jit(functools.partial(project, bounds=(lo, hi)))
  d = np.asarray(project(t, w, b), np.float64)
  assert np.all(t + d >= lo - 1e-6) and np.all(t + d <= hi + 1e-6)
  np.testing.assert_allclose(np.sum(w * (t + d), 1), b, atol=1e-4)
  size = dist(d, norm)
  # Random box points: those on the far side of the plane are no closer.
  z = rng.uniform(lo, hi, (64, 4000, 5))
  side = np.sign(np.sum(w * t, 1) - b)[:, None]
  across = side * (np.einsum('nd,nkd->nk', w, z) - b[:, None]) <= 0
  dz = z - t[:, None]
  zsize = np.abs(dz).max(-1) if norm == 'linf' else np.linalg.norm(dz, axis=-1)
  zsize = np.where(across, zsize, np.inf).min(1)
  assert np.all(size <= zsize + 1e-5)


def _run(norm, targeted, idx, num_steps):
  x, y, logits_fn = digits()
  x0, y0 = jnp.asarray(x[idx]), jnp.asarray(y[idx])
  targets = jnp.argsort(logits_fn(x0), axis=1)[:, -2] if targeted else None

  @jax.jit
  def run(steps):
    return fab._single_run(
      logits_fn,
      x0,
      y0,
      targets,
      x0,
      norm=norm,
      num_steps=steps,
      alpha_max=0.1,
      eta=1.05,
      beta=0.9,
      lo=jnp.zeros_like(x0),
      hi=jnp.ones_like(x0),
    )

  last = []
  for k in range(1, num_steps):
    last.append(np.asarray(run(k)[0]))
  _, best, best_norm = run(num_steps)
  found = np.isfinite(np.asarray(best_norm))
  best = np.where(found[:, None, None, None], best, x0)
  return np.stack(last + [best]), found


@pytest.mark.parametrize('norm', ['linf', 'l2'])
@pytest.mark.parametrize('targeted', [True, False])
def test_iterates_match_reference(norm, targeted):
  """The first run is deterministic: its iterates match the reference's."""
  ref = reference()
  prefix = '' if targeted else 'untargeted_'
  idx = ref[f'{prefix}iterates_idx_{norm}']
  expected = ref[f'{prefix}iterates_{norm}']
  got, found = _run(norm, targeted, idx, len(expected))
  # [k] is the point of iteration k + 1 (after k steps); [-1] the best
  # adversarial point after all steps.
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
  assert found.any()


@functools.cache
def attack_fn(targeted):
  def attack(x, y, eps, norm):
    _, _, logits_fn = digits()
    kwargs = dict(epsilon=eps, norm=norm, num_restarts=1)
    if targeted:
      return fab.fab_targeted(logits_fn, None, x, y, **kwargs)
    return fab.fab(logits_fn, None, x, y, **kwargs)

  return jax.jit(attack, static_argnames='norm')


@pytest.mark.parametrize(
  'norm,targeted,num',
  [('linf', True, NUM_ROBUST), ('l2', True, NUM_ROBUST), ('linf', False, 40)],
)
def test_robust_accuracy_matches_reference(norm, targeted, num):
  ref = reference()
  prefix = '' if targeted else 'untargeted_'
  x, y, logits_fn = digits()
  x, y = x[:num], y[:num]
  eps = EPS[norm]
  assert float(ref[f'eps_{norm}']) == np.float32(eps)
  adv, is_adv = attack_fn(targeted)(x, y, eps, norm)
  adv, is_adv = np.asarray(adv), np.asarray(is_adv)
  ref_robust = ref[f'{prefix}robust_{norm}'][:num]
  robust = ~is_adv
  assert robust.mean() <= ref_robust.mean() + 0.01
  assert (robust != ref_robust).sum() <= 1
  # Every returned image is in the ball and the bounds, and misclassified
  # where is_adv; the others are the clean images.
  assert adv.shape == x.shape and adv.dtype == x.dtype
  assert np.all(dist(adv - x, norm) <= eps + 1e-6)
  assert adv.min() >= 0.0 and adv.max() <= 1.0
  pred = np.asarray(logits_fn(adv)).argmax(1)
  assert np.all(pred[is_adv] != y[is_adv])
  np.testing.assert_array_equal(adv[robust], x[robust])


def test_reference_numbers_are_meaningful():
  ref = reference()
  for norm in ('linf', 'l2'):
    acc = ref[f'robust_{norm}'].mean()
    assert 0.1 < acc < 0.6, (norm, acc)


# ---------------------------------------------------------------------------
# Invariants on a tiny model.


def tiny_logits_fn(x):
  rng = np.random.default_rng(0)
  w1 = jnp.asarray(rng.normal(0, 1, (12, 8)), jnp.float32)
  w2 = jnp.asarray(rng.normal(0, 1, (8, 5)), jnp.float32)
  return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


def tiny_batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(0, 1, (n, 2, 3, 2)), jnp.float32)
  y = jnp.argmax(tiny_logits_fn(x), axis=1)  # All clean-correct.
  return x, y


TINY = dict(num_steps=6, num_target_classes=3, num_restarts=2)


@functools.cache
def tiny_attack():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def attack(key, x, y, ids, eps):
    return fab.fab_targeted(
      tiny_logits_fn, key, x, y, epsilon=eps, example_ids=ids, **TINY
    )

  return attack


def test_ball_bounds_no_retrace_and_batch_split():
  attack = tiny_attack()
  key = jax.random.key(4)
  x, y = tiny_batch(16)
  ids = jnp.arange(16)
  broken = []
  for eps in (0.05, 0.3):
    adv, is_adv = attack(key, x, y, ids, eps)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert is_adv.shape == (16,) and is_adv.dtype == bool
    assert np.all(dist(adv - x, 'linf') <= eps + 1e-6)
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    pred = np.asarray(tiny_logits_fn(adv)).argmax(1)
    np.testing.assert_array_equal(pred != np.asarray(y), np.asarray(is_adv))
    broken.append(int(is_adv.sum()))
  assert attack._cache_size() == 1  # A new epsilon does not recompile.
  assert 0 < broken[0] < broken[1]
  # Other examples in the first half change nothing in the second half
  # (data_parallel below checks the split over devices).
  x2, y2 = tiny_batch(16, seed=5)
  x2, y2 = x2.at[8:].set(x[8:]), y2.at[8:].set(y[8:])
  adv2, is_adv2 = attack(key, x2, y2, ids, 0.3)
  np.testing.assert_allclose(adv2[8:], adv[8:], atol=1e-6)
  np.testing.assert_array_equal(is_adv2[8:], is_adv[8:])


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_random_start_radius_and_keys(norm):
  x, _ = tiny_batch(4)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(
    jnp.arange(4)
  )
  radius = jnp.array([0.1, 0.2, 0.3, 0.4])
  random_start = jax.jit(fab._random_start, static_argnames='norm')
  start = np.asarray(random_start(keys, x, radius, norm=norm))
  np.testing.assert_allclose(dist(start - x, norm), radius, rtol=1e-5)
  again = np.asarray(random_start(keys[::-1], x, radius, norm=norm))
  assert not np.allclose(start, again, atol=1e-3)


def test_data_parallel_equals_one_device():
  mesh = parallel.make_mesh()
  num = 16
  assert num % len(mesh.devices.reshape(-1)) == 0
  x, y = tiny_batch(num)
  key = jax.random.key(4)
  ids = jnp.arange(num)

  def attack(key, x, y, ids):
    return fab.fab_targeted(
      tiny_logits_fn, key, x, y, epsilon=0.3, example_ids=ids, **TINY
    )

  sharded = jax.jit(
    parallel.data_parallel(
      attack,
      mesh=mesh,
      in_specs=(P(), P('data'), P('data'), P('data')),
      out_specs=P('data'),
    )
  )
  adv, is_adv = sharded(key, x, y, ids)
  adv1, is_adv1 = tiny_attack()(key, x, y, ids, 0.3)
  np.testing.assert_allclose(adv, adv1, atol=1e-6)
  np.testing.assert_array_equal(is_adv, is_adv1)


def test_misclassified_examples_count_as_adversarial():
  x, y = tiny_batch(16)
  y = y.at[1].set((y[1] + 1) % 5)
  key = jax.random.key(4)
  adv, is_adv = tiny_attack()(key, x, y, jnp.arange(16), 0.0)
  assert np.flatnonzero(is_adv).tolist() == [1]
  np.testing.assert_array_equal(adv, x)


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(norm='l1'), 'norm'),
    (dict(num_target_classes=5), 'num_target_classes'),
    (dict(num_restarts=0), 'num_restarts'),
    (dict(num_restarts=2), 'key'),
  ],
)
def test_rejects_bad_input(kwargs, match):
  x, y = tiny_batch(2)
  with pytest.raises(ValueError, match=match):
    fab.fab_targeted(tiny_logits_fn, None, x, y, epsilon=0.1, **kwargs)


def test_projection_rejects_bad_shapes():
  with pytest.raises(ValueError, match='rows'):
    fab.projection_linf(jnp.zeros((2, 3)), jnp.ones((2, 4)), jnp.zeros(2))
