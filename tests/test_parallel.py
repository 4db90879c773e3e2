"""Tests of fdjax.parallel on the 8 fake CPU devices (tests/conftest.py)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from fdjax import attacks
from fdjax import parallel

BACKENDS = ('shard_map', 'pmap')


@pytest.fixture(scope='module')
def mesh():
  assert jax.device_count() == 8, 'tests/conftest.py sets 8 CPU devices'
  return parallel.make_mesh()


def test_make_mesh(mesh):
  assert mesh.axis_names == ('data',) == (parallel.AXIS,)
  assert dict(mesh.shape) == {'data': 8}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  sub = parallel.make_mesh(jax.devices()[2:6])
  assert list(sub.devices.flat) == jax.devices()[2:6]
  with pytest.raises(ValueError, match='at least one device'):
    parallel.make_mesh([])


def test_check_divisible():
  parallel.check_divisible(16, 8)
  with pytest.raises(ValueError) as e:
    parallel.check_divisible(12, 8)
  assert str(e.value) == (
    'global batch size 12 does not divide by the 8 devices; use a multiple of 8'
  )
  with pytest.raises(ValueError, match='^eval batch 5 does not divide'):
    parallel.check_divisible(5, 2, what='eval batch')


def per_device(w, x, tree):
  """Uses axis_index, pmean, psum and a pytree; returns mixed outputs."""
  i = jax.lax.axis_index('data')
  scaled = x * (i + 1).astype(x.dtype) + w
  mean = jax.lax.pmean(jnp.sum(x, axis=0), 'data')
  count = jax.lax.psum(jnp.ones((), jnp.int32), 'data')
  return {'scaled': scaled, 'index': i[None]}, (mean, count, tree['b'] * 2)


def per_device_reference(w, x, tree, num_devices=8):
  xs = np.asarray(x, np.float64).reshape(num_devices, -1, *x.shape[1:])
  idx = np.arange(num_devices).reshape(-1, *(1,) * (xs.ndim - 1))
  scaled = (xs * (idx + 1) + np.asarray(w)).reshape(x.shape)
  mean = xs.sum(axis=1).mean(axis=0)
  return scaled, np.arange(num_devices), mean, num_devices, tree['b'] * 2


@pytest.mark.parametrize('backend', BACKENDS)
def test_collectives_and_pytrees(mesh, backend):
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=3), jnp.float32)
  x = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  tree = {'a': jnp.asarray(rng.normal(size=(8, 2))), 'b': jnp.ones(2)}
  f = parallel.data_parallel(
    per_device,
    mesh=mesh,
    in_specs=(P(), P('data'), {'a': P('data'), 'b': P()}),
    out_specs=({'scaled': P('data'), 'index': P('data')}, P()),
    backend=backend,
  )
  if backend == 'shard_map':
    f = jax.jit(f)
  out, (mean, count, b2) = f(w, x, tree)
  scaled, index, mean_ref, count_ref, b2_ref = per_device_reference(w, x, tree)
  np.testing.assert_allclose(out['scaled'], scaled, rtol=1e-6)
  np.testing.assert_array_equal(out['index'], index)
  np.testing.assert_allclose(mean, mean_ref, rtol=1e-5)
  assert int(count) == count_ref
  np.testing.assert_array_equal(b2, b2_ref)


@pytest.mark.parametrize('backend', BACKENDS)
def test_per_device_gradients_are_averaged_explicitly(mesh, backend):
  """grad of a replicated argument is per device, as in pmap; pmean = mean."""
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  loss = lambda w, x: jnp.mean(jnp.tanh(x @ w) ** 2)

  def step(w, x):
    local = jax.grad(loss)(w, x)
    return local[None], jax.lax.pmean(local, 'data')

  f = parallel.data_parallel(
    step,
    mesh=mesh,
    in_specs=(P(), P('data')),
    out_specs=(P('data'), P()),
    backend=backend,
  )
  local, mean = f(w, x)
  # float64 reference of the per-device and the global gradient.
  w64, x64 = np.asarray(w, np.float64), np.asarray(x, np.float64)
  t = np.tanh(x64 @ w64)
  per_example = (2 * t * (1 - t**2))[:, None] * x64
  np.testing.assert_allclose(
    local, per_example.reshape(8, 2, 3).mean(1), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(mean, per_example.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('backend', BACKENDS)
def test_divisibility_and_spec_errors(mesh, backend):
  f = parallel.data_parallel(
    lambda x, y: x + y,
    mesh=mesh,
    in_specs=(P('data'), P()),
    out_specs=P('data'),
    backend=backend,
  )
  with pytest.raises(ValueError, match='global batch size 12 does not divide'):
    f(jnp.zeros((12, 2)), jnp.zeros(2))
  with pytest.raises(ValueError, match='leading batch axis'):
    f(jnp.zeros(()), jnp.zeros(2))
  bad = parallel.data_parallel(
    lambda x: x,
    mesh=mesh,
    in_specs=(P(None, 'data'),),
    out_specs=P('data'),
    backend=backend,
  )
  with pytest.raises(ValueError, match=r"only P\('data'\)"):
    bad(jnp.zeros((8, 8)))
  not_prefix = parallel.data_parallel(
    lambda x: x,
    mesh=mesh,
    in_specs=(P('data'), P()),
    out_specs=P('data'),
    backend=backend,
  )
  with pytest.raises(ValueError, match='not a pytree prefix'):
    not_prefix(jnp.zeros((8, 2)))


def test_bad_backend_and_mesh(mesh):
  with pytest.raises(ValueError, match="'shard_map', 'pmap'"):
    parallel.data_parallel(
      lambda x: x, mesh=mesh, in_specs=P(), out_specs=P(), backend='vmap'
    )
  other = jax.sharding.Mesh(np.array(jax.devices()), ('batch',))
  with pytest.raises(ValueError, match="axis 'data'"):
    parallel.data_parallel(lambda x: x, mesh=other, in_specs=P(), out_specs=P())


def test_shard_batch_and_replicate(mesh):
  x = np.arange(32.0).reshape(16, 2)
  batch = parallel.shard_batch({'x': x, 'y': np.arange(16)}, mesh)
  assert batch['x'].sharding == NamedSharding(mesh, P('data'))
  assert len(batch['x'].addressable_shards) == 8
  assert batch['x'].addressable_shards[3].data.shape == (2, 2)
  np.testing.assert_array_equal(batch['x'], x)
  np.testing.assert_array_equal(batch['y'], np.arange(16))
  w = parallel.replicate({'w': np.ones(3)}, mesh)
  assert w['w'].sharding.is_fully_replicated
  np.testing.assert_array_equal(w['w'], np.ones(3))
  with pytest.raises(ValueError, match='global batch size 12'):
    parallel.shard_batch(np.zeros((12, 2)), mesh)


# ---------------------------------------------------------------------------
# PGD: one device == shard_map over 8 == pmap over 8.


class SmoothCNN(nn.Module):
  """A small smooth (tanh) CNN with BatchNorm in inference mode."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = jnp.tanh(x).mean(axis=(1, 2))
    return nn.Dense(5)(x)


MODEL = SmoothCNN()
PGD_KWARGS = dict(epsilon=0.1, step_size=0.03, num_steps=3)


def per_device_attack(
  variables, key, coin_key, clean_prob, images, labels, ids
):
  """Per-device attack: replicated variables and keys, sharded batch."""
  start = attacks.clean_start_coin(
    coin_key, clean_prob, jax.lax.axis_index('data')
  )
  return attacks.pgd(
    lambda x: MODEL.apply(variables, x, train=False),
    key,
    images,
    labels,
    random_start=start,
    example_ids=ids,
    **PGD_KWARGS,
  )


@jax.jit
def single_device_attack(variables, key, images, labels, random_start):
  return attacks.pgd(
    lambda x: MODEL.apply(variables, x, train=False),
    key,
    images,
    labels,
    random_start=random_start,
    **PGD_KWARGS,
  )


@functools.cache
def problem():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.uniform(0, 1, (16, 6, 6, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, 16), jnp.int32)
  variables = jax.jit(MODEL.init)(jax.random.key(1), x[:1])
  return variables, x, y


@functools.cache
def parallel_attacks():
  """The attack on 8 devices with both backends (built once: one compile)."""
  mesh = parallel.make_mesh()
  specs = dict(
    in_specs=(P(), P(), P(), P(), P('data'), P('data'), P('data')),
    out_specs=P('data'),
  )
  return {
    'shard_map': jax.jit(
      parallel.data_parallel(per_device_attack, mesh=mesh, **specs)
    ),
    'pmap': parallel.data_parallel(
      per_device_attack, mesh=mesh, backend='pmap', **specs
    ),
  }


def test_pgd_data_parallel_matches_single_device():
  variables, x, y = problem()
  key, coin_key = jax.random.key(3), jax.random.key(4)
  single = single_device_attack(variables, key, x, y, True)
  assert np.abs(single - x).max() > 0.05
  for backend, attack in parallel_attacks().items():
    # clean_prob 0: every device starts from a random point, as `single`.
    adv = attack(variables, key, coin_key, 0.0, x, y, jnp.arange(16))
    if backend == 'shard_map':
      assert adv.sharding.spec == P('data')
    # PGD takes signs of gradients, so results are either equal up to float
    # rounding or differ by whole steps; a smooth model, 3 steps and random
    # inputs keep gradients away from 0. On CPU the results are bitwise
    # equal; 1e-6 leaves room for batch-size dependent convolution rounding
    # elsewhere, far below a step (0.03).
    np.testing.assert_allclose(adv, single, atol=1e-6, err_msg=backend)


def test_pgd_clean_start_coin_per_device():
  """One coin per device batch: a device's shard starts clean or random."""
  variables, x, y = problem()
  key, coin_key = jax.random.key(3), jax.random.key(5)
  from_random = np.asarray(single_device_attack(variables, key, x, y, True))
  from_clean = np.asarray(single_device_attack(variables, key, x, y, False))
  coins = [bool(attacks.clean_start_coin(coin_key, 0.5, d)) for d in range(8)]
  assert any(coins) and not all(coins)  # This key gives both kinds.
  expected = np.concatenate(
    [
      (from_random if c else from_clean)[2 * d : 2 * d + 2]
      for d, c in enumerate(coins)
    ]
  )
  for backend, attack in parallel_attacks().items():
    adv = attack(variables, key, coin_key, 0.5, x, y, jnp.arange(16))
    np.testing.assert_allclose(adv, expected, atol=1e-6, err_msg=backend)
