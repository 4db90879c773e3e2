"""Tests of fdjax.attacks: optima of linear models, invariants, protocol."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import logsumexp
from scipy.special import softmax
from sklearn.datasets import load_digits

from fdjax import attacks


def linear_logits_fn(w, b):
  """Logits of a linear classifier on flattened images."""
  return lambda x: x.reshape(x.shape[0], -1) @ w + b


class TinyCNN(nn.Module):
  """Conv -> BatchNorm -> tanh -> mean pool -> Dense, for attack tests."""

  num_classes: int = 5

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name='conv')(x)
    x = nn.BatchNorm(use_running_average=not train, name='bn')(x)
    x = jnp.tanh(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name='head')(x)


@functools.cache
def tiny_cnn():
  """A TinyCNN with non-trivial moving statistics, and its logits_fn."""
  model = TinyCNN()
  x = jnp.zeros((1, 6, 6, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  # Moving statistics that differ from the init, as after training.
  rng = np.random.default_rng(1)
  stats = variables['batch_stats']['bn']
  variables = {
    'params': variables['params'],
    'batch_stats': {
      'bn': {
        'mean': jnp.asarray(rng.normal(0, 0.1, stats['mean'].shape)),
        'var': jnp.asarray(rng.uniform(0.5, 2, stats['var'].shape)),
      }
    },
  }
  # The attack pattern: moving statistics, nothing mutable.
  return lambda x: model.apply(variables, x, train=False)


def cnn_batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(0, 1, (n, 6, 6, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, n), jnp.int32)
  return x, y


# One jitted PGD for the whole file, so that tests with the same static
# choices and shapes share compiles.
run_pgd = jax.jit(
  attacks.pgd, static_argnames=('logits_fn', 'targeted', 'norm', 'loss')
)


def _linear_pgd(w, b, key, images, labels, **kwargs):
  """PGD on a linear classifier with traced weights."""
  return attacks.pgd(linear_logits_fn(w, b), key, images, labels, **kwargs)


_STATIC = ('targeted', 'norm', 'loss')
linear_pgd = jax.jit(_linear_pgd, static_argnames=_STATIC)
# A static clean start compiles without the random-number code, the slowest
# part of these tiny compiles.
linear_pgd_static_start = jax.jit(
  _linear_pgd, static_argnames=_STATIC + ('random_start',)
)


def two_class_problem(seed=0, n=6):
  rng = np.random.default_rng(seed)
  w = rng.normal(0, 0.3, (6, 2))
  b = rng.normal(0, 0.1, 2)
  x0 = rng.uniform(0.1, 0.9, (n, 2, 3))
  y = rng.integers(0, 2, n)
  return w, b, x0, y


# ---------------------------------------------------------------------------
# Losses against float64 references.


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_example_losses_match_float64_reference(dtype):
  rng = np.random.default_rng(0)
  z = rng.normal(0, 2, (7, 5))
  y = rng.integers(0, 5, 7)
  zq = np.asarray(jnp.asarray(z, dtype).astype(jnp.float32), np.float64)
  xent_ref = logsumexp(zq, axis=-1) - zq[np.arange(7), y]
  others = np.where(np.eye(5, dtype=bool)[y], -np.inf, zq)
  margin_ref = others.max(-1) - zq[np.arange(7), y]
  xent = attacks.example_losses(jnp.asarray(z, dtype), y, 'xent')
  margin = jax.jit(attacks.example_losses, static_argnums=2)(
    jnp.asarray(z, dtype), y, 'margin'
  )
  assert xent.dtype == margin.dtype == jnp.float32
  np.testing.assert_allclose(xent, xent_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(margin, margin_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  'loss, norm, targeted',
  [
    ('xent', 'linf', False),
    ('xent', 'l2', True),
    ('margin', 'linf', True),
    ('margin', 'l2', False),
  ],
)
def test_one_step_matches_float64_gradient(loss, norm, targeted):
  """A single step equals x0 +- a * direction(g) with g from numpy."""
  rng = np.random.default_rng(3)
  n, k = 5, 4
  w = rng.normal(0, 0.5, (6, k))
  b = rng.normal(0, 0.5, k)
  x0 = rng.uniform(0, 1, (n, 3, 2))
  y = rng.integers(0, k, n)
  a = 0.05
  adv = linear_pgd_static_start(
    jnp.asarray(w, jnp.float32),
    jnp.asarray(b, jnp.float32),
    None,
    jnp.asarray(x0, jnp.float32),
    jnp.asarray(y),
    epsilon=10.0,
    step_size=a,
    num_steps=1,
    targeted=targeted,
    norm=norm,
    random_start=False,
    bounds=(-100.0, 100.0),
    loss=loss,
  )
  z = x0.reshape(n, -1) @ w + b
  if loss == 'xent':
    dz = softmax(z, axis=-1) - np.eye(k)[y]
  else:
    other = np.where(np.eye(k, dtype=bool)[y], -np.inf, z).argmax(-1)
    dz = np.eye(k)[other] - np.eye(k)[y]
  g = (dz @ w.T).reshape(x0.shape)
  if norm == 'linf':
    d = np.sign(g)
  else:
    d = g / np.linalg.norm(g.reshape(n, -1), axis=1)[:, None, None]
  expected = x0 + (-1 if targeted else 1) * a * d
  np.testing.assert_allclose(adv, expected, atol=1e-6)


# ---------------------------------------------------------------------------
# PGD reaches the known optimum of a 2-class linear model.


@pytest.mark.parametrize('loss', ['xent', 'margin'])
@pytest.mark.parametrize('targeted', [False, True])
def test_linf_reaches_linear_optimum(loss, targeted):
  w, b, x0, y = two_class_problem()
  eps = 0.2
  # Untargeted: away from y. Targeted at t: towards t.
  if targeted:
    t = np.random.default_rng(5).integers(0, 2, len(y))
    s = np.sign(w[:, t] - w[:, 1 - t]).T.reshape(x0.shape)
  else:
    t = y
    s = np.sign(w[:, 1 - y] - w[:, y]).T.reshape(x0.shape)
  expected = np.clip(x0 + eps * s, 0.0, 1.0)
  assert np.any(x0 + eps * s > 1.0) or np.any(x0 + eps * s < 0.0)
  for start in (False, True):
    adv = linear_pgd(
      jnp.asarray(w, jnp.float32),
      jnp.asarray(b, jnp.float32),
      jax.random.key(0),
      jnp.asarray(x0, jnp.float32),
      jnp.asarray(t),
      targeted=targeted,
      loss=loss,
      epsilon=eps,
      # 10 steps of eps/4 cross the ball even from its far side.
      step_size=eps / 4,
      num_steps=10,
      random_start=jnp.asarray(start),
      bounds=(0.0, 1.0),
    )
    np.testing.assert_allclose(adv, expected, atol=1e-6)


@pytest.mark.parametrize('loss, targeted', [('xent', False), ('margin', True)])
def test_l2_reaches_linear_optimum(loss, targeted):
  w, b, x0, y = two_class_problem(seed=1)
  eps = 0.3
  if targeted:
    t = 1 - y  # Targeting the other class: the untargeted direction.
  else:
    t = y
  d = (w[:, 1 - y] - w[:, y]).T
  d = d / np.linalg.norm(d, axis=1, keepdims=True)
  expected = x0 + eps * d.reshape(x0.shape)
  # From the clean image the first step of size eps lands on the optimum;
  # from a random start the projection shrinks the off-direction part by
  # about 1/11 per step of 10 eps.
  args = (
    jnp.asarray(w, jnp.float32),
    jnp.asarray(b, jnp.float32),
    jax.random.key(0),
    jnp.asarray(x0, jnp.float32),
    jnp.asarray(t),
  )
  kwargs = dict(targeted=targeted, loss=loss, norm='l2', bounds=(-10.0, 10.0))
  for start, step in ((False, eps), (True, 10 * eps)):
    adv = linear_pgd(
      *args,
      epsilon=eps,
      step_size=step,
      num_steps=10,
      random_start=jnp.asarray(start),
      **kwargs,
    )
    np.testing.assert_allclose(adv, expected, atol=1e-5)
    if not targeted:
      # A traced random_start gives what the Python bool gives.
      static = linear_pgd_static_start(
        *args,
        epsilon=eps,
        step_size=step,
        num_steps=10,
        random_start=start,
        **kwargs,
      )
      np.testing.assert_array_equal(static, adv)


def test_fgsm_is_one_signed_step():
  w, b, x0, y = two_class_problem(seed=2)
  fn = linear_logits_fn(jnp.asarray(w, jnp.float32), jnp.asarray(b))
  fgsm = jax.jit(attacks.fgsm, static_argnames='logits_fn')
  s = np.sign(w[:, 1 - y] - w[:, y]).T.reshape(x0.shape)
  x = jnp.asarray(x0, jnp.float32)
  key = jax.random.key(3)
  adv = fgsm(fn, x, y, epsilon=0.05, key=key, random_start=jnp.asarray(False))
  np.testing.assert_allclose(adv, np.clip(x0 + 0.05 * s, 0, 1), atol=1e-6)
  r_fgsm = fgsm(fn, x, y, epsilon=0.05, key=key, random_start=jnp.asarray(True))
  r_pgd = linear_pgd(
    jnp.asarray(w, jnp.float32),
    jnp.asarray(b, jnp.float32),
    key,
    x,
    jnp.asarray(y),
    epsilon=0.05,
    step_size=0.05,
    num_steps=1,
    random_start=jnp.asarray(True),
    bounds=(0.0, 1.0),
  )
  np.testing.assert_allclose(r_fgsm, r_pgd, atol=1e-7)
  assert not np.allclose(r_fgsm, adv)
  assert np.abs(r_fgsm - x0).max() <= 0.05 + 1e-6


# ---------------------------------------------------------------------------
# Ball and bounds invariants on a small CNN.


def cnn_pgd(x, y, key, random_start, **kwargs):
  """PGD on the tiny CNN with one call signature, to share compiles."""
  kwargs.setdefault('bounds', (0, 1.0))
  kwargs.setdefault('example_ids', jnp.arange(len(x)))
  return run_pgd(
    tiny_cnn(), key, x, y, random_start=jnp.asarray(random_start), **kwargs
  )


@pytest.mark.parametrize(
  'norm, targeted, loss', [('linf', False, 'xent'), ('l2', True, 'margin')]
)
def test_ball_and_bounds_invariants(norm, targeted, loss):
  x, y = cnn_batch(8, seed=4)
  eps = 0.1 if norm == 'linf' else 0.8
  kwargs = dict(
    epsilon=eps,
    step_size=eps / 3,
    num_steps=4,
    norm=norm,
    targeted=targeted,
    loss=loss,
  )
  key = jax.random.key(7)
  results = {}
  for start in (False, True):
    adv = cnn_pgd(x, y, key, start, **kwargs)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    delta = np.asarray(adv - x, np.float64).reshape(len(x), -1)
    if norm == 'linf':
      assert np.abs(delta).max() <= eps + 1e-6
    else:
      assert np.linalg.norm(delta, axis=1).max() <= eps * (1 + 1e-5)
    assert np.abs(delta).max() > eps / 10  # It moved.
    results[start] = adv
  assert not np.allclose(results[False], results[True])


def test_bounds_active_at_pixel_edges():
  """Pixels at 0 and 1 stay inside the bounds; the random start does not."""
  x, y = cnn_batch(8, seed=5)
  x = jnp.round(x)  # Every pixel at a bound.
  key = jax.random.key(0)
  kwargs = dict(epsilon=0.1, step_size=0.02)
  adv = cnn_pgd(x, y, key, True, num_steps=2, **kwargs)
  assert float(adv.min()) >= 0 and float(adv.max()) <= 1
  assert np.abs(adv - x).max() <= 0.1 + 1e-6
  # With zero steps the random start is projected too.
  start = cnn_pgd(x, y, key, True, num_steps=0, **kwargs)
  assert float(start.min()) >= 0 and float(start.max()) <= 1
  assert np.abs(start - x).max() > 0.05
  clean = cnn_pgd(x, y, key, False, num_steps=0, **kwargs)
  np.testing.assert_array_equal(clean, x)


def test_bfloat16_images_keep_dtype():
  w, b, x0, y = two_class_problem(seed=3)
  x = jnp.asarray(x0, jnp.bfloat16)
  adv = linear_pgd(
    jnp.asarray(w, jnp.bfloat16),
    jnp.asarray(b, jnp.bfloat16),
    jax.random.key(0),
    x,
    y,
    epsilon=0.1,
    step_size=0.05,
    num_steps=2,
  )
  assert adv.dtype == jnp.bfloat16 and adv.shape == x.shape
  delta = np.asarray(adv, np.float32) - np.asarray(x, np.float32)
  assert np.abs(delta).max() <= 0.1 + 2**-8  # bf16 rounding near 1.
  assert np.abs(delta).max() > 0.09


def test_l2_random_start_is_inside_ball_and_spread():
  x = jnp.full((400, 2, 2, 1), 0.5)
  start = linear_pgd(
    jnp.ones((4, 2)),
    jnp.zeros(2),
    jax.random.key(0),
    x,
    jnp.zeros(400, jnp.int32),
    epsilon=0.4,
    step_size=0.1,
    num_steps=0,
    norm='l2',
  )
  r = np.linalg.norm(np.asarray(start - x).reshape(400, -1), axis=1)
  assert r.max() <= 0.4 * (1 + 1e-6)
  # Uniform in a 4-d ball: P(r < eps / 2) = 1/16.
  assert 0.02 < np.mean(r < 0.2) < 0.12
  assert np.mean(r > 0.36) > 0.25  # 1 - 0.9^4 = 0.34
  # No preferred direction: each coordinate's mean is ~N(0, 0.008^2).
  assert np.abs(np.asarray(start - x).mean(0)).max() < 0.04


# ---------------------------------------------------------------------------
# Compilation: traced epsilon / steps, no unrolling.


def test_steps_and_epsilon_do_not_retrace():
  traces = []
  w = jnp.asarray(np.random.default_rng(0).normal(0, 1, (6, 3)), jnp.float32)

  def logits_fn(x):
    traces.append(1)
    return x.reshape(x.shape[0], -1) @ w

  attack = jax.jit(functools.partial(attacks.pgd, logits_fn))
  x = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (4, 6)), jnp.float32)
  y = jnp.arange(4) % 3
  key = jax.random.key(0)
  first = None
  for steps in (10, 100, 1000, 2000):
    for eps in (4 / 255, 16 / 255):
      adv = attack(key, x, y, epsilon=eps, step_size=eps / 8, num_steps=steps)
      assert np.abs(adv - x).max() <= eps + 1e-6
      if first is None:
        first = len(traces)
  assert attack._cache_size() == 1
  assert len(traces) == first


def test_loop_is_not_unrolled():
  traces = []
  w = jnp.ones((6, 3))

  def logits_fn(x):
    traces.append(1)
    return x.reshape(x.shape[0], -1) @ w

  jaxpr = jax.make_jaxpr(
    lambda x: attacks.pgd(
      logits_fn,
      jax.random.key(0),
      x,
      jnp.zeros(2, jnp.int32),
      epsilon=0.1,
      step_size=0.01,
      num_steps=50,
    )
  )(jnp.zeros((2, 6)))
  assert len(traces) <= 2
  text = str(jaxpr)
  assert 'scan' in text or 'while' in text


def test_result_is_a_constant_for_gradients():
  """stop_gradient: a loss on the adversarial batch sees it as data."""
  w = jnp.asarray(np.random.default_rng(2).normal(0, 1, (6, 2)), jnp.float32)
  x = jnp.full((3, 6), 0.5)
  y = jnp.array([0, 1, 0])

  def loss(w, x, steps):
    adv = attacks.pgd(
      lambda z: z @ w,
      None,
      x,
      y,
      epsilon=0.1,
      step_size=0.05,
      num_steps=steps,
      random_start=False,
    )
    return jnp.sum((adv @ w) ** 2), adv

  (gw, gx), adv = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(w, x, 3)
  np.testing.assert_array_equal(gx, np.zeros_like(x))
  adv64, w64 = np.asarray(adv, np.float64), np.asarray(w, np.float64)
  np.testing.assert_allclose(gw, 2 * adv64.T @ (adv64 @ w64), rtol=1e-5)


# ---------------------------------------------------------------------------
# Batch independence and per-example randomness.


def test_example_alone_equals_example_in_batch():
  x, y = cnn_batch(8, seed=6)
  kwargs = dict(epsilon=0.1, step_size=0.03, num_steps=3)
  key = jax.random.key(11)
  full = cnn_pgd(x, y, key, True, **kwargs)
  alone = cnn_pgd(
    x[5:6], y[5:6], key, True, example_ids=jnp.array([5]), **kwargs
  )
  np.testing.assert_allclose(alone[0], full[5], atol=1e-6)
  part = cnn_pgd(
    x[4:8], y[4:8], key, True, example_ids=jnp.arange(4, 8), **kwargs
  )
  np.testing.assert_allclose(part, full[4:8], atol=1e-6)
  # Without the global ids (the default ids 0..3) the random starts differ.
  wrong = cnn_pgd(x[4:8], y[4:8], key, True, **kwargs)
  assert not np.allclose(wrong, full[4:8], atol=1e-3)


def test_random_targets():
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 10, 2000))
  key = jax.random.key(4)
  random_targets = jax.jit(attacks.random_targets, static_argnums=2)
  t = random_targets(key, labels, 10)
  assert t.dtype == labels.dtype
  assert np.all(t != labels) and t.min() >= 0 and t.max() < 10
  offsets = np.asarray((t - labels) % 10)
  counts = np.bincount(offsets, minlength=10)
  assert counts[0] == 0 and counts[1:].min() > 2000 / 9 * 0.7
  # Example i's target depends on its id only, not on its batch position.
  perm = np.random.default_rng(1).permutation(2000)
  shuffled = random_targets(key, labels[perm], 10, jnp.asarray(perm))
  np.testing.assert_array_equal(shuffled, np.asarray(t)[perm])
  t2 = random_targets(key, labels % 2, 2)
  np.testing.assert_array_equal(t2, 1 - labels % 2)


def test_paper_step_size_and_constants():
  assert attacks.PAPER_EPSILON == 16 / 255
  assert attacks.PAPER_STEP_SIZE == 1 / 255
  np.testing.assert_allclose(
    attacks.paper_step_size(16 / 255, 1 / 255, 10), 1.6 / 255, rtol=1e-6
  )
  f = jax.jit(attacks.paper_step_size)
  np.testing.assert_allclose(f(16.0, 1.0, 10), 1.6, rtol=1e-6)
  np.testing.assert_allclose(f(16.0, 1.0, 1000), 1.0)
  np.testing.assert_allclose(f(16.0, 1.0, 16), 1.0)


def test_clean_start_coin():
  key = jax.random.key(2)
  idx = jnp.arange(4000)
  coins = jax.jit(jax.vmap(attacks.clean_start_coin, in_axes=(None, None, 0)))
  coin = coins(key, 0.2, idx)
  assert coin.dtype == jnp.bool_ and coin.shape == (4000,)
  assert 0.77 < float(coin.mean()) < 0.83
  assert bool(coins(key, 0.0, idx).all())
  assert not bool(coins(key, 1.0, idx).any())
  np.testing.assert_array_equal(
    coin[:5], [attacks.clean_start_coin(key, 0.2, i) for i in range(5)]
  )


# ---------------------------------------------------------------------------
# A trained model.


@functools.cache
def trained_digits_mlp():
  digits = load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  x = (digits.images[order] / 16.0).astype(np.float32)[..., None]  # 8x8x1
  y = digits.target[order].astype(np.int32)
  x_train, y_train = jnp.asarray(x[:1500]), jnp.asarray(y[:1500])
  rng = np.random.default_rng(0)
  params = {
    'w1': jnp.asarray(rng.normal(0, 0.1, (64, 32)), jnp.float32),
    'b1': jnp.zeros(32),
    'w2': jnp.asarray(rng.normal(0, 0.1, (32, 10)), jnp.float32),
    'b2': jnp.zeros(10),
  }

  def apply(p, x):
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ p['w1'] + p['b1'])
    return h @ p['w2'] + p['b2']

  opt = optax.adam(0.02)

  def step(carry, _):
    p, s = carry
    g = jax.grad(
      lambda p: optax.softmax_cross_entropy_with_integer_labels(
        apply(p, x_train), y_train
      ).mean()
    )(p)
    u, s = opt.update(g, s)
    return (optax.apply_updates(p, u), s), None

  (params, _), _ = jax.jit(
    lambda p: jax.lax.scan(step, (p, opt.init(p)), length=300)
  )(params)
  fn = jax.jit(functools.partial(apply, params))
  return fn, x[1500:1700], y[1500:1700]


def test_targeted_attack_hits_targets_on_trained_model():
  fn, x, y = trained_digits_mlp()
  assert np.mean(np.argmax(fn(x), -1) == y) > 0.9
  attack = jax.jit(functools.partial(attacks.targeted_pgd, fn, num_classes=10))
  adv, targets = attack(jax.random.key(0), x, y, epsilon=0.3, num_steps=20)
  assert np.all(targets != y)
  assert np.abs(adv - x).max() <= 0.3 + 1e-6
  hit = np.mean(np.argmax(fn(adv), -1) == targets)
  assert hit > 0.9, hit
  # A small epsilon fails: the test can tell a strong attack from a weak.
  adv_small, _ = attack(jax.random.key(0), x, y, epsilon=0.02, num_steps=5)
  assert np.mean(np.argmax(fn(adv_small), -1) == targets) < 0.5


def test_untargeted_attack_raises_loss_on_trained_model():
  fn, x, y = trained_digits_mlp()
  # The CW margin here (xent is covered by the targeted test and others).
  adv = run_pgd(
    fn,
    jax.random.key(1),
    x,
    y,
    epsilon=0.1,
    step_size=0.02,
    num_steps=10,
    loss='margin',
  )
  clean_logits, adv_logits = np.asarray(fn(x)), np.asarray(fn(adv))
  clean = attacks.example_losses(clean_logits, y, 'xent')
  after = attacks.example_losses(adv_logits, y, 'xent')
  assert float(after.mean()) > float(clean.mean()) + 0.5
  clean_acc = np.mean(clean_logits.argmax(-1) == y)
  assert np.mean(adv_logits.argmax(-1) == y) < clean_acc - 0.2


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(norm='l1'), 'norm'),
    (dict(loss='hinge'), 'loss'),
    (dict(bounds=(1.0, 0.0)), 'lo < hi'),
    (dict(bounds=(0.0,)), 'pair'),
    (dict(images=jnp.zeros(3)), 'rank'),
    (dict(images=jnp.zeros((3, 2), jnp.uint8)), 'floating'),
    (dict(labels=jnp.zeros(2, jnp.int32)), 'labels'),
    (dict(example_ids=jnp.arange(4)), 'example_ids'),
    (dict(key=None), 'key'),
    (dict(random_start=jnp.ones(3, bool)), 'random_start'),
  ],
)
def test_pgd_rejects_bad_input(kwargs, match):
  args = dict(
    key=jax.random.key(0),
    images=jnp.zeros((3, 2)),
    labels=jnp.zeros(3, jnp.int32),
  )
  args.update(kwargs)
  fn = lambda x: x @ jnp.ones((2, 2))
  with pytest.raises(ValueError, match=match):
    attacks.pgd(fn, epsilon=0.1, step_size=0.1, num_steps=1, **args)


def test_other_functions_reject_bad_input():
  with pytest.raises(ValueError, match='num_classes'):
    attacks.random_targets(jax.random.key(0), jnp.zeros(3, int), 1)
  with pytest.raises(ValueError, match='key'):
    attacks.fgsm(
      lambda x: x,
      jnp.zeros((2, 2)),
      jnp.zeros(2, int),
      epsilon=0.1,
      random_start=True,
    )
  with pytest.raises(ValueError, match='logits'):
    attacks.pgd(
      lambda x: x[:, 0],
      None,
      jnp.zeros((2, 2)),
      jnp.zeros(2, int),
      epsilon=0.1,
      step_size=0.1,
      num_steps=1,
      random_start=False,
    )
