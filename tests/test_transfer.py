"""Transfer attackers (MI, DI, TI) against float64 numpy references.

The model is linear (``logits = x.flat @ W + b``, random W and b), so the
input gradient of the cross-entropy has a closed form in numpy; DI's
transform is rebuilt in numpy the way the authors wrote it (resize, pad,
resize back) from the same random draws, and TI's kernel from scipy's normal
pdf as the authors' ``gkern``.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from scipy import stats

from fdjax import attacks
from fdjax import parallel
from fdjax.attacks import transfer

SIZE, CHANNELS, CLASSES = 8, 3, 5
draws_fn = jax.jit(transfer.diversity_draws, static_argnums=(3, 4))


def linear(seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(0, 1, (SIZE * SIZE * CHANNELS, CLASSES))
  b = rng.normal(0, 1, CLASSES)
  return w, b


def logits_fn(w, b):
  wj, bj = jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)
  return lambda x: x.reshape(x.shape[0], -1) @ wj + bj


def batch(n=6, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.05, 0.95, (n, SIZE, SIZE, CHANNELS)).astype(np.float32)
  return x, rng.integers(0, CLASSES, n)


def ref_grad(x, y, w, b):
  """d/dx sum_i xent(x_i W + b, y_i), float64."""
  x = np.asarray(x, np.float64)
  z = x.reshape(len(x), -1) @ w + b
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  return (p @ w.T).reshape(x.shape)


def ref_l1(g):
  return g / np.abs(g).sum(axis=(1, 2, 3), keepdims=True)


def ref_step(x, x0, g, step, eps, sign=1.0):
  x = x + sign * step * np.sign(g)
  return np.clip(np.clip(x, x0 - eps, x0 + eps), 0.0, 1.0)


@pytest.mark.parametrize('targeted', [False, True])
def test_mi_fgsm_two_steps_match_float64(targeted):
  w, b = linear()
  x0, y = batch()
  eps, mu, steps = 0.1, 0.7, 2
  adv = transfer.transfer_attack(
    logits_fn(w, b),
    None,
    x0,
    y,
    epsilon=eps,
    num_steps=steps,
    momentum=mu,
    targeted=targeted,
  )
  sign = -1.0 if targeted else 1.0
  x, g = x0.astype(np.float64), np.zeros(x0.shape)
  for _ in range(steps):
    g = mu * g + ref_l1(ref_grad(x, y, w, b))
    x = ref_step(x, x0, g, eps / steps, eps, sign)
  # The second step's direction differs from the plain gradient's: momentum
  # is exercised.
  assert np.any(np.sign(g) != np.sign(ref_grad(x, y, w, b)))
  np.testing.assert_allclose(np.asarray(adv), x, atol=1e-6)


def ref_diverse(x, rnd, top, left, apply, canvas):
  """The authors' DI in numpy: resize to rnd, pad to canvas, resize back."""
  out = np.array(x, np.float64)
  size = x.shape[1]
  for i in range(len(x)):
    if not apply[i]:
      continue
    src = np.floor(np.arange(rnd[i]) * size / rnd[i]).astype(int)
    resized = x[i][src][:, src]
    padded = np.zeros((canvas, canvas, x.shape[-1]))
    padded[top[i] : top[i] + rnd[i], left[i] : left[i] + rnd[i]] = resized
    back = np.floor(np.arange(size) * canvas / size).astype(int)
    out[i] = padded[back][:, back]
  return out


def test_diverse_inputs_match_numpy_and_draws_are_in_range():
  x, _ = batch(n=16)
  canvas = transfer.canvas_size(SIZE, 1.5)
  assert canvas == 12
  ids = jnp.arange(16) + 100
  draws = transfer.diversity_draws(jax.random.key(3), 2, ids, SIZE, canvas, 0.5)
  rnd, top, left, apply = (np.asarray(d) for d in draws)
  assert np.all((rnd >= SIZE) & (rnd < canvas))
  assert np.all((top >= 0) & (top < canvas - rnd))
  assert np.all((left >= 0) & (left < canvas - rnd))
  assert 0 < apply.sum() < 16 and len(set(rnd)) > 1
  out = jax.jit(transfer.diverse_inputs, static_argnums=5)(
    jnp.asarray(x), *draws, canvas
  )
  np.testing.assert_array_equal(
    np.asarray(out), ref_diverse(x, rnd, top, left, apply, canvas)
  )
  # Per example: the draws of id 105 do not depend on the batch.
  alone = draws_fn(jax.random.key(3), 2, ids[5:6], SIZE, canvas, 0.5)
  assert [int(d[0]) for d in alone] == [int(d[5]) for d in draws]


def test_di_fgsm_one_step_matches_float64_given_the_draws():
  w, b = linear(1)
  x0, y = batch(n=8, seed=2)
  eps, scale, key = 0.08, 1.5, jax.random.key(5)
  ids = jnp.arange(8)
  canvas = transfer.canvas_size(SIZE, scale)
  adv = jax.jit(
    functools.partial(
      transfer.transfer_attack, logits_fn(w, b), diversity_scale=scale
    )
  )(key, x0, y, epsilon=eps, num_steps=1, diversity_prob=0.7, example_ids=ids)
  # The attack's step 0 draws, and the gradient through the numpy
  # transform: d/dx of the loss at T(x), T a gather with zeros.
  rnd, top, left, apply = (
    np.asarray(d) for d in draws_fn(key, 0, ids, SIZE, canvas, 0.7)
  )
  assert 0 < apply.sum() < 8
  tx = ref_diverse(x0, rnd, top, left, apply, canvas)
  gt = ref_grad(tx, y, w, b)
  gx = np.zeros_like(gt)
  for i in range(len(x0)):
    if not apply[i]:
      gx[i] = gt[i]
      continue
    src = np.floor(np.arange(rnd[i]) * SIZE / rnd[i]).astype(int)
    back = np.floor(np.arange(SIZE) * canvas / SIZE).astype(int)
    for r, u in enumerate(back):
      for c, v in enumerate(back):
        if top[i] <= u < top[i] + rnd[i] and left[i] <= v < left[i] + rnd[i]:
          gx[i, src[u - top[i]], src[v - left[i]]] += gt[i, r, c]
  assert np.mean(gx == 0) > 0.05  # Pixels the transform dropped.
  expected = ref_step(x0.astype(np.float64), x0, gx, eps, eps)
  np.testing.assert_allclose(np.asarray(adv), expected, atol=1e-6)


def ref_kernel(size, sigma):
  """The authors' gkern(size, nsig) with nsig = (size - 1) / (2 sigma)."""
  nsig = (size - 1) / (2.0 * sigma)
  k1 = stats.norm.pdf(np.linspace(-nsig, nsig, size))
  k = np.outer(k1, k1)
  return k / k.sum()


def ref_smooth(g, kernel):
  k = kernel.shape[0]
  r = k // 2
  pad = np.pad(g, ((0, 0), (r, r), (r, r), (0, 0)))
  out = np.zeros_like(g, np.float64)
  for a in range(k):
    for c in range(k):
      out += kernel[a, c] * pad[:, a : a + g.shape[1], c : c + g.shape[2]]
  return out


@pytest.mark.parametrize('size,sigma', [(3, 1.0), (5, None)])
def test_ti_kernel_and_smoothing_match_float64(size, sigma):
  kernel = transfer.gaussian_kernel(size, sigma)
  ref = ref_kernel(size, (size - 1) / 6.0 if sigma is None else sigma)
  np.testing.assert_allclose(kernel, ref, rtol=1e-6)
  g = np.random.default_rng(4).normal(0, 1, (2, SIZE, SIZE, CHANNELS))
  out = transfer.smooth_gradient(jnp.asarray(g, jnp.float32), kernel)
  np.testing.assert_allclose(np.asarray(out), ref_smooth(g, ref), atol=1e-5)


def test_ti_mi_fgsm_one_step_matches_float64():
  w, b = linear(2)
  x0, y = batch(seed=3)
  eps = 0.06
  adv = transfer.transfer_attack(
    logits_fn(w, b),
    None,
    x0,
    y,
    epsilon=eps,
    num_steps=1,
    momentum=1.0,
    ti_kernel_size=3,
    ti_sigma=1.0,
    targeted=True,
  )
  g = ref_smooth(ref_grad(x0, y, w, b), ref_kernel(3, 1.0))
  assert np.any(np.sign(g) != np.sign(ref_grad(x0, y, w, b)))
  expected = ref_step(x0.astype(np.float64), x0, g, eps, eps, -1.0)
  np.testing.assert_allclose(np.asarray(adv), expected, atol=1e-6)


def test_jit_traced_settings_compile_once_and_stay_in_ball():
  w, b = linear(3)
  traces = []
  base = logits_fn(w, b)

  def counted(x):
    traces.append(1)
    return base(x)

  attack = jax.jit(
    functools.partial(
      transfer.transfer_attack,
      counted,
      diversity_scale=1.25,
      ti_kernel_size=3,
    )
  )
  x0, y = batch(n=8, seed=4)
  x0[0, :2] = 0.0  # Pixels at the bounds.
  x0[1, :2] = 1.0
  key = jax.random.key(0)
  for eps, steps, mu, p in ((0.05, 3, 1.0, 0.5), (0.1, 7, 0.5, 0.9)):
    adv = np.asarray(
      attack(
        key,
        x0,
        y,
        epsilon=eps,
        num_steps=steps,
        momentum=mu,
        diversity_prob=p,
      )
    )
    assert np.abs(adv - x0).max() <= eps + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert np.abs(adv - x0).max() > eps / 2  # It moved.
    n_traces = len(traces)
  assert attack._cache_size() == 1
  assert len(traces) == n_traces <= 4


def test_data_parallel_equals_one_device_and_ensemble_averages():
  (w1, b1), (w2, b2) = linear(4), linear(5)
  x0, y = batch(n=16, seed=5)
  ids = jnp.arange(16) + 7
  apply = transfer.ensemble_apply(
    [
      lambda v, x: x.reshape(x.shape[0], -1) @ v[0] + v[1],
      lambda v, x: x.reshape(x.shape[0], -1) @ v[0] + v[1],
    ],
    weights=(1.0, 3.0),
  )
  params = [
    (jnp.asarray(w1, jnp.float32), jnp.asarray(b1, jnp.float32)),
    (jnp.asarray(w2, jnp.float32), jnp.asarray(b2, jnp.float32)),
  ]
  ref = 0.25 * (x0.reshape(16, -1) @ w1 + b1) + 0.75 * (
    x0.reshape(16, -1) @ w2 + b2
  )
  np.testing.assert_allclose(np.asarray(apply(params, x0)), ref, atol=1e-5)
  attack = attacks.TransferAttack(
    epsilon=0.1,
    num_steps=3,
    momentum=1.0,
    diversity_prob=0.5,
    diversity_scale=1.25,
    ti_kernel_size=3,
    targeted=True,
    num_classes=CLASSES,
  )
  assert attack.name == 'MI-DI-TI-FGSM'

  def per_device(params, key, x, y, ids):
    return attack(functools.partial(apply, params), key, x, y, example_ids=ids)

  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  dp = jax.jit(
    parallel.data_parallel(
      per_device,
      mesh=mesh,
      in_specs=(P(), P(), P('data'), P('data'), P('data')),
      out_specs=(P('data'), P('data')),
    )
  )
  key = jax.random.key(9)
  adv8, t8 = dp(params, key, x0, y, ids)
  adv1, t1 = jax.jit(per_device)(params, key, x0, y, ids)
  np.testing.assert_array_equal(np.asarray(t8), np.asarray(t1))
  assert np.all(np.asarray(t1) != y)
  np.testing.assert_allclose(np.asarray(adv8), np.asarray(adv1), atol=1e-6)


def test_bad_settings_fail_clearly():
  w, b = linear()
  x, y = batch(n=2)
  f = logits_fn(w, b)
  kw = dict(epsilon=0.1, num_steps=2)
  with pytest.raises(ValueError, match='ti_kernel_size=4 is not valid'):
    transfer.transfer_attack(f, None, x, y, ti_kernel_size=4, **kw)
  with pytest.raises(ValueError, match='leaves no room'):
    transfer.transfer_attack(
      f, jax.random.key(0), x, y, diversity_prob=0.5, diversity_scale=1.05, **kw
    )
  with pytest.raises(ValueError, match='needs a key'):
    transfer.transfer_attack(f, None, x, y, diversity_prob=0.5, **kw)
  with pytest.raises(ValueError, match='weights'):
    transfer.ensemble_apply([lambda v, x: x], weights=(1.0, 2.0))
