"""Tests of fdjax.plots: the accuracy curve and the feature-map figures."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from fdjax import models
from fdjax import plots


def read_png(path):
  with Image.open(path) as im:
    assert im.format == 'PNG'
    return np.asarray(im.convert('RGB'), np.float64)


def random_variables(model, seed=0):
  """Random variables of the right shapes, without compiling `init`.

  Kernels N(0, 1/fan_in); BN scales and variances U(0.5, 1.5), so that the
  residual branches and the denoising blocks are active (their init is 0).
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3))
  )

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if 'kernel' in name:
      std = 1.0 / np.sqrt(np.prod(s.shape[:-1]))
      return rng.normal(0, std, s.shape).astype(np.float32)
    if 'scale' in name or 'var' in name:
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def tiny_denoise():
  """A tiny ResNet with 2 denoising blocks."""
  model = models._ResNetTiny(num_classes=10, denoise_placement='stage')
  return model, random_variables(model)


def images():
  rng = np.random.default_rng(1)
  clean = rng.uniform(0, 1, (8, 8, 3)).astype(np.float32)
  adv = np.clip(clean + rng.uniform(-0.1, 0.1, clean.shape), 0, 1)
  return clean, adv.astype(np.float32)


def test_accuracy_vs_steps_draws_the_data(tmp_path):
  a = plots.plot_accuracy_vs_steps(
    {
      'R152': {10: 0.525, 100: 0.417, 1000: 0.39, 2000: 0.392},
      'R152-Denoise': {10: 0.557, 100: 0.455, 1000: 0.428, 2000: 0.426},
    },
    str(tmp_path / 'sub' / 'a.png'),
  )
  b = plots.plot_accuracy_vs_steps(
    {
      'R152': {10: 0.9, 100: 0.1, 1000: 0.05, 2000: 0.05},
      'R152-Denoise': {10: 0.557, 100: 0.455, 1000: 0.428, 2000: 0.426},
    },
    str(tmp_path / 'b.png'),
  )
  pa, pb = read_png(a), read_png(b)
  assert pa.shape == (440, 605, 3)  # 5.5 x 4 inches at 110 dpi.
  assert pa.std() > 5  # Not blank.
  assert np.abs(pa - pb).sum() > 0  # The curves are drawn from the data.


@pytest.mark.parametrize(
  'bad, match',
  [
    ({}, 'empty'),
    ({'m': {}}, 'no \\(steps, accuracy\\) points'),
    ({'m': {0: 0.5}}, 'integers >= 1'),
    ({'m': {10: 55.7}}, 'not a fraction'),
  ],
)
def test_accuracy_vs_steps_rejects_bad_input(tmp_path, bad, match):
  with pytest.raises(ValueError, match=match):
    plots.plot_accuracy_vs_steps(bad, str(tmp_path / 'x.png'))


def test_feature_maps_match_float64_reduction_of_model_features():
  model, variables = tiny_denoise()
  clean, adv = images()
  maps = plots.feature_maps(model, variables, clean, adv)
  apply = jax.jit(
    functools.partial(model.apply, train=False, return_features=True)
  )
  _, feats = apply(variables, np.stack([clean, adv]))
  assert list(maps) == ['group0_denoise', 'group1_denoise']
  for name, m in maps.items():
    for when in ('before', 'after'):
      f = np.asarray(feats[name][when], np.float64)
      np.testing.assert_allclose(
        m[f'clean_{when}'][0], f[0].mean(-1), rtol=1e-6, atol=1e-7
      )
      np.testing.assert_allclose(
        m[f'adv_{when}'][0], f[1].mean(-1), rtol=1e-6, atol=1e-7
      )
    # The blocks act (non-zero BN scale), and the attack moves features.
    assert np.abs(m['clean_after'] - m['clean_before']).max() > 1e-3
    assert np.abs(m['adv_before'] - m['clean_before']).max() > 1e-4
  picked = plots.feature_maps(
    model, variables, clean, adv, channels=(3, 0), blocks=['group1_denoise']
  )
  f = np.asarray(feats['group1_denoise']['after'], np.float64)
  assert list(picked) == ['group1_denoise']
  np.testing.assert_allclose(
    picked['group1_denoise']['adv_after'],
    np.moveaxis(f[1][..., [3, 0]], -1, 0),
    rtol=1e-6,
  )
  # uint8 images are read as [0, 255].
  clean8, adv8 = (np.round(x * 255).astype(np.uint8) for x in (clean, adv))
  as_uint8 = plots.feature_maps(model, variables, clean8, adv8)
  as_float = plots.feature_maps(model, variables, clean8 / 255, adv8 / 255)
  np.testing.assert_allclose(
    as_uint8['group0_denoise']['clean_after'],
    as_float['group0_denoise']['clean_after'],
    rtol=1e-6,
  )


def test_feature_maps_errors():
  model, variables = tiny_denoise()
  clean, adv = images()
  with pytest.raises(ValueError, match='out of range'):
    plots.feature_maps(model, variables, clean, adv, channels=(99,))
  with pytest.raises(ValueError, match='unknown block'):
    plots.feature_maps(model, variables, clean, adv, blocks=['group9'])
  with pytest.raises(ValueError, match='differ in shape'):
    plots.feature_maps(model, variables, clean, adv[:4])
  plain = models._ResNetTiny(num_classes=10)
  plain_vars = random_variables(plain)
  with pytest.raises(ValueError, match='no denoising blocks'):
    plots.feature_maps(plain, plain_vars, clean, adv)
  assert not plots.has_denoising_blocks(plain, plain_vars, 8)
  assert plots.has_denoising_blocks(model, variables, 8)

  class NoFeatures(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(3)(x.reshape(len(x), -1))

  nf = NoFeatures()
  nf_vars = {'params': {'Dense_0': {'kernel': np.ones((192, 3)), 'bias': 0}}}
  with pytest.raises(ValueError, match='cannot return its feature maps'):
    plots.feature_maps(nf, nf_vars, clean, adv)
  assert not plots.has_denoising_blocks(nf, nf_vars, 8)


def test_many_blocks_are_subsampled_evenly():
  x = np.ones((2, 3, 3, 4))
  feats = {f'b{i}': {'before': x * i, 'after': x * i + 1} for i in range(33)}
  maps = plots._select(feats, None, None, None)
  assert len(maps) == plots.MAX_BLOCKS
  assert list(maps)[0] == 'b0' and list(maps)[-1] == 'b32'
  np.testing.assert_allclose(maps['b32']['adv_after'], np.full((1, 3, 3), 33))


def test_plot_feature_maps_writes_a_figure(tmp_path):
  model, variables = tiny_denoise()
  clean, adv = images()
  path = plots.plot_feature_maps(
    model,
    variables,
    clean,
    adv,
    str(tmp_path / 'f' / 'maps.png'),
    channels=(0, 1),
    title='tiny',
  )
  pixels = read_png(path)
  # 4 rows; 1 image column + 2 blocks x 2 channels.
  assert pixels.shape[1] > pixels.shape[0] > 400
  assert pixels.std() > 5
  other = plots.plot_feature_maps(
    model,
    variables,
    clean,
    clean,
    str(tmp_path / 'same.png'),
    channels=(0, 1),
    title='tiny',
  )
  assert np.abs(read_png(other) - pixels).sum() > 0
