"""Tests of fdjax.models' convolutions computed as matrix products."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax import layers
from fdjax import models

DIMS = ('NHWC', 'HWIO', 'NHWC')


def _reference_conv(x, w, stride, groups):
  """Float64 'SAME' convolution, TF's padding rule, written out directly."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  n, h, wd, c = x.shape
  kh, kw, cin, out = w.shape
  oh, ow = -(-h // stride), -(-wd // stride)
  pad_h = max((oh - 1) * stride + kh - h, 0)
  pad_w = max((ow - 1) * stride + kw - wd, 0)
  xp = np.zeros((n, h + pad_h, wd + pad_w, c))
  xp[:, pad_h // 2 : pad_h // 2 + h, pad_w // 2 : pad_w // 2 + wd] = x
  og = out // groups
  y = np.zeros((n, oh, ow, out))
  for g in range(groups):
    for i in range(kh):
      for j in range(kw):
        win = xp[
          :,
          i : i + (oh - 1) * stride + 1 : stride,
          j : j + (ow - 1) * stride + 1 : stride,
          g * cin : (g + 1) * cin,
        ]
        y[..., g * og : (g + 1) * og] += win @ w[i, j, :, g * og : (g + 1) * og]
  return y


CASES = [
  # (height, width, in, out, kernel, stride, groups)
  (5, 7, 6, 4, 1, 2, 1),
  (7, 5, 6, 8, 3, 1, 1),
  (6, 6, 4, 4, 3, 2, 1),
  (2, 2, 8, 8, 3, 1, 1),  # Map smaller than the window (XLA swaps these).
  (1, 3, 4, 4, 3, 2, 1),
  (9, 9, 3, 4, 7, 2, 1),  # The stem.
  (4, 5, 64, 32, 3, 2, 32),
  (3, 3, 64, 64, 1, 1, 32),
]


def _value_and_grads(conv, r):
  """(conv(x, k), d<conv, r>/dx, d<conv, r>/dk) in one jitted function."""

  def fn(x, kernel):
    y, vjp = jax.vjp(conv, x, kernel)
    return (y, *vjp(r))

  return jax.jit(fn)


@pytest.mark.parametrize('h,w,cin,cout,k,stride,groups', CASES)
def test_conv_as_matmul_matches_reference_and_lax(
  h, w, cin, cout, k, stride, groups
):
  # NumPy inputs: no per-shape compiles of random ops.
  rng = np.random.default_rng(h * 100 + k * 10 + stride)
  x = rng.standard_normal((2, h, w, cin), np.float32)
  kernel = rng.standard_normal((k, k, cin // groups, cout), np.float32) / k
  out_shape = (2, -(-h // stride), -(-w // stride), cout)
  r = rng.standard_normal(out_shape, np.float32)

  def ours(x, kernel):
    return layers.conv_as_matmul(x, kernel, stride, groups)

  def lax_conv(x, kernel):
    return jax.lax.conv_general_dilated(
      x,
      kernel,
      (stride, stride),
      'SAME',
      dimension_numbers=DIMS,
      feature_group_count=groups,
    )

  y, gx, gk = _value_and_grads(ours, r)(x, kernel)
  np.testing.assert_allclose(
    y, _reference_conv(x, kernel, stride, groups), rtol=1e-5, atol=1e-5
  )
  y_lax, gx_lax, gk_lax = _value_and_grads(lax_conv, r)(x, kernel)
  np.testing.assert_allclose(y, y_lax, rtol=1e-5, atol=1e-5)
  for g, g_lax in ((gx, gx_lax), (gk, gk_lax)):
    assert np.max(np.abs(g_lax)) > 0
    np.testing.assert_allclose(g, g_lax, rtol=1e-5, atol=1e-5)


def test_conv_as_matmul_input_gradient_against_float64():
  """The input gradient is the adjoint: <conv(x), r> = <x, grad>."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 3, 5, 4), np.float32)
  kernel = rng.standard_normal((3, 3, 4, 5), np.float32)
  r = rng.standard_normal((1, 2, 3, 5), np.float32)
  grad = jax.jit(
    jax.grad(lambda x: jnp.sum(layers.conv_as_matmul(x, kernel, 2) * r))
  )(x)
  # d/dx_p of sum(conv(x) * r) by float64 finite structure: conv is linear,
  # so it is conv(e_p) . r for each unit input e_p.
  expected = np.zeros(x.shape)
  for idx in np.ndindex(*x.shape):
    e = np.zeros(x.shape)
    e[idx] = 1.0
    expected[idx] = np.sum(_reference_conv(e, kernel, 2, 1) * r)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('k,stride,groups', [(1, 2, 1), (3, 1, 4), (3, 2, 1)])
def test_matmul_conv_is_a_drop_in_for_nn_conv(k, stride, groups):
  kwargs = dict(
    features=8,
    kernel_size=(k, k),
    strides=stride,
    padding='SAME',
    use_bias=False,
    feature_group_count=groups,
    kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
  )
  x = np.random.default_rng(0).standard_normal((2, 5, 6, 8), np.float32)
  ref = nn.Conv(**kwargs)
  ours = layers.MatmulConv(**kwargs)
  v_ref = ref.init(jax.random.key(1), x)
  v_ours = ours.init(jax.random.key(1), x)
  # Same parameter tree, shapes, dtype and initial values.
  assert jax.tree.structure(v_ref) == jax.tree.structure(v_ours)
  np.testing.assert_array_equal(
    v_ref['params']['kernel'], v_ours['params']['kernel']
  )
  assert v_ours['params']['kernel'].dtype == jnp.float32
  y_ref = jax.jit(ref.apply)(v_ref, x)
  y_ours = jax.jit(ours.apply)(v_ref, x)
  np.testing.assert_allclose(y_ours, y_ref, rtol=1e-5, atol=1e-5)


def test_matmul_conv_rejects_what_it_does_not_implement():
  x = jnp.ones((1, 4, 4, 2))
  with pytest.raises(ValueError, match='SAME'):
    layers.MatmulConv(4, (3, 3), padding='VALID').init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='use_bias'):
    layers.MatmulConv(4, (3, 3), use_bias=True).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='feature_group_count'):
    layers.conv_as_matmul(x, jnp.ones((3, 3, 3, 4)))


def test_resolve_conv_impl():
  assert layers.resolve_conv_impl('matmul') == 'matmul'
  assert layers.resolve_conv_impl('xla') == 'xla'
  expected = 'matmul' if jax.default_backend() == 'cpu' else 'xla'
  assert layers.resolve_conv_impl('auto') == expected
  with pytest.raises(ValueError, match='conv_impl'):
    layers.resolve_conv_impl('cudnn')


def test_resnet_same_parameters_and_results_with_either_impl():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2, 12, 12, 3)).astype(np.float32)
  kwargs = dict(
    stage_sizes=(1, 1),
    num_filters=4,
    num_classes=5,
    stem='imagenet',
    denoise_placement='stage',
    groups=2,
    width_per_group=2,
  )
  xla = models.ResNet(conv_impl='xla', **kwargs)
  matmul = models.ResNet(conv_impl='matmul', **kwargs)
  v_xla = jax.jit(xla.init)(jax.random.key(1), x)
  shapes = lambda v: jax.tree.map(lambda p: (p.shape, p.dtype), v)
  assert shapes(jax.eval_shape(matmul.init, jax.random.key(1), x)) == shapes(
    v_xla
  )
  # Unit BN scales (the last of each branch starts at zero) so that every
  # convolution contributes.
  v = jax.tree_util.tree_map_with_path(
    lambda path, p: jnp.ones_like(p) if path[-1].key == 'scale' else p, v_xla
  )
  r = rng.standard_normal((2, 5), np.float32)

  def logits_and_grad(model):
    def fn(x):
      logits, vjp = jax.vjp(lambda x: model.apply(v, x), x)
      return logits, vjp(r)[0]

    return jax.jit(fn)

  ref = logits_and_grad(xla)(x)
  got = logits_and_grad(matmul)(x)
  for a, b in zip(got, ref):
    assert np.max(np.abs(b)) > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
