"""Tests of fdjax.models: sizes, denoising blocks, padding, normalisation.

Numerics are checked against float64 numpy written here (convolution with
TF's 'SAME' padding rule, max-pooling, BatchNorm, the non-local means), on
random weights and inputs. Full-size networks are only traced abstractly
(`jax.eval_shape`), never run.
"""

import functools

import flax
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from fdjax import convert
from fdjax import denoise
from fdjax import models

EPS = 1e-5  # BatchNorm epsilon of the original.

# --------------------------------------------------------------------------
# float64 numpy references.
# --------------------------------------------------------------------------


def tf_same_pads(size, kernel, stride):
  """TF's 'SAME' padding (before, after): the extra pixel goes after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def np_conv(x, w, stride=1, pads=None):
  """NHWC x HWIO convolution in float64; `pads` default to TF 'SAME'."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  kh, kw = w.shape[:2]
  if pads is None:
    pads = (
      tf_same_pads(x.shape[1], kh, stride),
      tf_same_pads(x.shape[2], kw, stride),
    )
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  oh = (xp.shape[1] - kh) // stride + 1
  ow = (xp.shape[2] - kw) // stride + 1
  out = np.zeros(x.shape[:1] + (oh, ow, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i : i + stride * oh : stride, j : j + stride * ow : stride]
      out += patch @ w[i, j]
  return out


def np_max_pool_same(x, k=3, s=2):
  """k x k / s max-pooling, TF 'SAME' (padding never wins the max)."""
  pads = (tf_same_pads(x.shape[1], k, s), tf_same_pads(x.shape[2], k, s))
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=-np.inf)
  oh, ow = -(-x.shape[1] // s), -(-x.shape[2] // s)
  out = np.full(x.shape[:1] + (oh, ow, x.shape[3]), -np.inf)
  for i in range(k):
    for j in range(k):
      out = np.maximum(out, xp[:, i : i + s * oh : s, j : j + s * ow : s])
  return out


def np_bn(y, bn_params, bn_stats):
  """Inference-mode BatchNorm in float64."""
  f = lambda a: np.asarray(a, np.float64)
  return (y - f(bn_stats['mean'])) / np.sqrt(f(bn_stats['var']) + EPS) * f(
    bn_params['scale']
  ) + f(bn_params['bias'])


def np_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def np_non_local(x, affinity, theta=None, phi=None):
  """Non-local means of [N, H, W, C] in float64 over all H*W positions."""
  n, h, w, c = x.shape
  v = x.reshape(n, h * w, c)
  t = (x if theta is None else theta).reshape(n, h * w, -1)
  p = (x if phi is None else phi).reshape(n, h * w, -1)
  a = t @ p.transpose(0, 2, 1)
  if affinity == 'gaussian':
    a = np_softmax(a / np.sqrt(t.shape[-1]))
  else:
    a = a / (h * w)
  return (a @ v).reshape(n, h, w, c)


def np_denoising_block(x, variables, affinity, embed, use_conv, residual):
  """The non-local denoising block in float64 from its variables."""
  p, s = variables['params'], variables['batch_stats']
  x = np.asarray(x, np.float64)
  theta = phi = None
  if embed:
    theta = np_conv(x, p['embedding_theta']['kernel'])
    phi = np_conv(x, p['embedding_phi']['kernel'])
  y = np_non_local(x, affinity, theta, phi)
  if use_conv:
    y = np_conv(y, p['conv']['kernel'])
  y = np_bn(y, p['conv_bn'], s['conv_bn'])
  return x + y if residual else y


def randomize(variables, seed=0):
  """Random values for every variable (BN scales/variances positive)."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  out = {}
  for path, v in flat.items():
    if path[-1] in ('scale', 'var'):
      x = rng.uniform(0.5, 1.5, v.shape)
    elif path[-1] == 'kernel':
      fan_in = np.prod(v.shape[:-1])
      x = rng.normal(0.0, 1.0 / np.sqrt(fan_in), v.shape)
    else:
      x = rng.normal(0.0, 0.2, v.shape)
    out[path] = jnp.asarray(x, v.dtype)
  return flax.traverse_util.unflatten_dict(out)


def random_variables(module, x, seed):
  """`randomize` on the abstract variables of `module` (no init run)."""
  return randomize(jax.eval_shape(module.init, jax.random.key(0), x), seed)


def images(shape=(2, 16, 16, 3), seed=0):
  return jnp.asarray(
    np.random.default_rng(seed).uniform(0.0, 1.0, shape), jnp.float32
  )


def max_rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.abs(got - want).max() / np.abs(want).max()


# --------------------------------------------------------------------------
# Sizes of the released architectures (abstract evaluation only).
# --------------------------------------------------------------------------


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
  'arch,depth,trainable,total',
  [
    ('ResNet', 152, 60_192_808, 60_344_232),
    ('ResNetDenoise', 152, 71_341_608, 71_500_712),
    ('ResNeXtDenoiseAll', 101, 126_801_704, 127_069_608),
  ],
)
def test_parameter_counts_match_the_original(arch, depth, trainable, total):
  # Trainable counts: the original's graph (docs/weights.md and the
  # variable lists in tests/data); totals add the BN moving statistics.
  model = models.create_model(**convert.model_settings(arch, depth))
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )
  assert _count(shapes['params']) == trainable
  assert _count(shapes) == total
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes)), (
    'parameters must be float32'
  )


def test_resnext_uses_grouped_3x3_convolutions():
  model = models.create_model(arch='resnext', depth=50)
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )
  block = shapes['params']['group0_block0']
  # 32 groups x 8 channels = 256 wide; each group sees 256 / 32 inputs.
  assert block['conv2']['kernel'].shape == (3, 3, 8, 256)
  assert block['conv3']['kernel'].shape == (1, 1, 256, 256)
  assert shapes['params']['group3_block0']['conv2']['kernel'].shape == (
    3,
    3,
    64,
    2048,
  )


# --------------------------------------------------------------------------
# DenoisingBlock.
# --------------------------------------------------------------------------


def _feature_map(shape=(2, 4, 5, 8), seed=1):
  return jnp.asarray(
    np.random.default_rng(seed).normal(size=shape), jnp.float32
  )


def test_denoising_block_is_identity_at_init():
  x = _feature_map()
  for op in sorted(denoise.DENOISE_OPS):
    for embed in (True, False):
      block = models.DenoisingBlock(op=op, embed=embed)
      variables = block.init(jax.random.key(0), x)
      has_embedding = 'embedding_theta' in variables['params']
      assert has_embedding == (embed and denoise.uses_embedding(op))
      assert set(variables['params']) >= {'conv', 'conv_bn'}
      np.testing.assert_array_equal(block.apply(variables, x), x)
      # Not trivially so: once the BN scale is non-zero the block acts.
      variables['params']['conv_bn']['scale'] = jnp.ones_like(
        variables['params']['conv_bn']['scale']
      )
      y = block.apply(variables, x)
      assert np.abs(np.asarray(y - x)).max() > 1e-3, (op, embed)


@pytest.mark.parametrize(
  'affinity,embed', [('gaussian', True), ('dot_product', False)]
)
@pytest.mark.parametrize(
  'use_conv,residual', [(True, True), (False, True), (True, False)]
)
def test_denoising_block_matches_float64_reference(
  affinity, embed, use_conv, residual
):
  x = _feature_map()
  block = models.DenoisingBlock(
    op='non_local',
    affinity=affinity,
    embed=embed,
    use_conv=use_conv,
    residual=residual,
  )
  variables = random_variables(block, x, seed=2)
  # The ablations drop exactly the documented pieces.
  assert ('conv' in variables['params']) == use_conv
  got = jax.jit(block.apply)(variables, x)
  want = np_denoising_block(x, variables, affinity, embed, use_conv, residual)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_denoising_block_without_residual_is_zero_at_init():
  x = _feature_map()
  block = models.DenoisingBlock(residual=False)
  variables = jax.jit(block.init)(jax.random.key(0), x)
  np.testing.assert_array_equal(block.apply(variables, x), jnp.zeros_like(x))


def test_denoising_block_gradients():
  x = _feature_map(shape=(1, 3, 3, 4))
  block = models.DenoisingBlock(op='non_local', affinity='gaussian')
  variables = random_variables(block, x, seed=3)
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    fn = jax.jit(lambda x: block.apply(v64, x))
    check_grads(fn, (jnp.asarray(x, jnp.float64),), order=1, modes=('rev',))


def test_embedding_needs_even_channels():
  x = _feature_map(shape=(1, 3, 3, 5))
  with pytest.raises(ValueError, match='even channel count'):
    models.DenoisingBlock(embed=True).init(jax.random.key(0), x)


# --------------------------------------------------------------------------
# The tiny network: train/eval, features, dtypes.
# --------------------------------------------------------------------------


def test_tiny_model_trains_and_evaluates_under_jit():
  model = models._ResNetTiny(num_classes=10, denoise_placement='stage')
  x = images()
  variables = random_variables(model, x, seed=10)

  @jax.jit
  def train_apply(variables, x):
    return model.apply(variables, x, train=True, mutable=['batch_stats'])

  logits, updates = train_apply(variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  old = flax.traverse_util.flatten_dict(variables['batch_stats'])
  new = flax.traverse_util.flatten_dict(updates['batch_stats'])
  assert old.keys() == new.keys()
  for path in old:
    assert not np.allclose(old[path], new[path]), path

  # The stem's BN statistics move 10% (momentum 0.9) towards the batch
  # statistics of the stem convolution (3x3/1 'SAME' for the cifar stem).
  conv0 = np_conv(
    np.asarray(x)[..., ::-1] * 2 - 1, variables['params']['conv0']['kernel']
  )
  for stat, batch in (
    ('mean', conv0.mean((0, 1, 2))),
    ('var', conv0.var((0, 1, 2))),
  ):
    np.testing.assert_allclose(
      new[('conv0_bn', stat)],
      0.9 * old[('conv0_bn', stat)] + 0.1 * batch,
      rtol=1e-4,
      atol=1e-6,
    )

  # Evaluation uses the moving statistics: an example's logits do not
  # depend on the rest of the batch ...
  eval_apply = jax.jit(model.apply)
  other = x.at[1].set(1.0 - x[1])
  np.testing.assert_allclose(
    eval_apply(variables, x)[0], eval_apply(variables, other)[0], rtol=1e-5
  )
  # ... unlike training mode, where the batch statistics couple examples.
  assert not np.allclose(logits[0], train_apply(variables, other)[0][0])

  # Gradients flow to the input.
  grad = jax.jit(jax.grad(lambda x: model.apply(variables, x)[:, 0].sum()))(x)
  assert grad.shape == x.shape
  assert np.isfinite(grad).all() and np.abs(grad).max() > 0


@pytest.mark.parametrize(
  'placement,stage_sizes,names',
  [
    ('stage', (1, 2), ['group0_denoise', 'group1_denoise']),
    (
      'all',
      (2, 1),
      ['group0_block0_non_local', 'group0_block1_non_local',
       'group1_block0_non_local'],
    ),
    ('none', (1, 1), []),
  ],
)  # fmt: skip
def test_return_features(placement, stage_sizes, names):
  model = models._ResNetTiny(
    num_classes=3, stage_sizes=stage_sizes, denoise_placement=placement
  )
  x = images()
  variables = random_variables(model, x, seed=4)
  assert sorted(variables['params']) == sorted(
    ['conv0', 'conv0_bn', 'linear']
    + [
      f'group{g}_block{b}' for g, n in enumerate(stage_sizes) for b in range(n)
    ]
    + names
  )
  apply = jax.jit(functools.partial(model.apply, return_features=True))
  logits, features = apply(variables, x)
  assert sorted(features) == sorted(names)
  np.testing.assert_allclose(
    logits, jax.jit(model.apply)(variables, x), rtol=1e-6, atol=1e-6
  )
  for name in names:
    before, after = features[name]['before'], features[name]['after']
    assert before.shape == after.shape and before.ndim == 4
    assert not np.allclose(before, after)
  if names:
    # The last 'after' map is the trunk output the classifier sees.
    trunk = np.asarray(features[names[-1]]['after'], np.float64)
    linear = variables['params']['linear']
    want = trunk.mean(axis=(1, 2)) @ np.asarray(
      linear['kernel'], np.float64
    ) + np.asarray(linear['bias'])
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    # Blocks whose BN outputs zero pass their input through unchanged.
    for name in names:
      bn = variables['params'][name]['conv_bn']
      bn['scale'] = jnp.zeros_like(bn['scale'])
      bn['bias'] = jnp.zeros_like(bn['bias'])
    _, features = apply(variables, x)
    for name in names:
      f = features[name]
      np.testing.assert_array_equal(f['before'], f['after'])


# --------------------------------------------------------------------------
# Stem: padding and input normalisation against float64 numpy.
# --------------------------------------------------------------------------


def test_tf_same_padding_rule():
  assert tf_same_pads(224, 7, 2) == (2, 3)
  assert tf_same_pads(112, 3, 2) == (0, 1)
  assert tf_same_pads(13, 7, 2) == (3, 3)
  assert tf_same_pads(7, 3, 2) == (1, 1)


def _stem_intermediates(normalization, x):
  # Even height (16 -> conv 8 -> pool 4: pads (2, 3) then (0, 1)) and odd
  # width (13 -> 7 -> 4: pads (3, 3) then (1, 1)).
  model = models._ResNetTiny(
    num_classes=3, stem='imagenet', normalization=normalization
  )
  variables = random_variables(model, x, seed=5)
  _, state = jax.jit(
    functools.partial(
      model.apply, capture_intermediates=True, mutable=['intermediates']
    )
  )(variables, x)
  inter = state['intermediates']
  conv0 = inter['conv0']['__call__'][0]
  conv1 = inter['group0_block0']['conv1']['__call__'][0]
  return variables, conv0, conv1


@pytest.mark.parametrize('normalization', ['tensorpack', 'mean_std'])
def test_stem_matches_float64_reference(normalization):
  x = images((2, 16, 13, 3), seed=6)
  variables, conv0, conv1 = _stem_intermediates(normalization, x)
  p, s = variables['params'], variables['batch_stats']
  x64 = np.asarray(x, np.float64)
  if normalization == 'tensorpack':
    net_in = x64[..., ::-1] * 2.0 - 1.0  # RGB [0, 1] -> BGR [-1, 1]
    wrong_in = x64 * 2.0 - 1.0  # forgetting the channel reversal
  else:
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    net_in = (x64 - mean) / std
    wrong_in = x64[..., ::-1] * 2.0 - 1.0
  w0 = p['conv0']['kernel']
  want0 = np_conv(net_in, w0, stride=2)
  assert want0.shape == (2, 8, 7, 4)
  np.testing.assert_allclose(conv0, want0, rtol=1e-4, atol=1e-5)
  assert np.abs(np_conv(wrong_in, w0, stride=2) - conv0).max() > 1e-2
  # PyTorch-style symmetric padding (3, 3) gives a different map.
  sym = np_conv(net_in, w0, stride=2, pads=((3, 3), (3, 3)))[:, :8, :7]
  assert np.abs(sym - conv0).max() > 1e-2

  # Stem BN + ReLU + 3x3/2 'SAME' max-pool, then the first 1x1 conv.
  pooled = np_max_pool_same(
    np.maximum(np_bn(want0, p['conv0_bn'], s['conv0_bn']), 0.0)
  )
  assert pooled.shape == (2, 4, 4, 4)
  want1 = np_conv(pooled, p['group0_block0']['conv1']['kernel'])
  np.testing.assert_allclose(conv1, want1, rtol=1e-4, atol=1e-5)


def test_uint8_images_equal_float_images_over_255():
  model = models._ResNetTiny(num_classes=4, denoise_placement='stage')
  u8 = jnp.asarray(
    np.random.default_rng(7).integers(0, 256, (2, 12, 12, 3)), jnp.uint8
  )
  variables = random_variables(model, u8, seed=8)
  apply = jax.jit(model.apply)
  got = apply(variables, u8)
  want = apply(variables, u8.astype(jnp.float32) / 255.0)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # The scale matters (the test could fail).
  assert not np.allclose(got, apply(variables, u8.astype(jnp.float32)))


def test_bfloat16_compute_keeps_float32_params():
  kwargs = dict(num_classes=5, denoise_placement='stage')
  model16 = models._ResNetTiny(dtype=jnp.bfloat16, **kwargs)
  model32 = models._ResNetTiny(**kwargs)
  x = images()
  variables = jax.eval_shape(model16.init, jax.random.key(0), x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  variables = randomize(variables, seed=9)
  logits16 = jax.jit(model16.apply)(variables, x)
  logits32 = jax.jit(model32.apply)(variables, x)
  assert logits16.dtype == jnp.float32
  assert np.isfinite(logits16).all()
  assert max_rel_err(logits16, logits32) < 0.1
  assert not np.array_equal(logits16, logits32)  # really lower precision
  # create_model accepts dtype names, as configs give them.
  assert models.create_model(dtype='bfloat16').dtype == jnp.bfloat16


# --------------------------------------------------------------------------
# Bad options.
# --------------------------------------------------------------------------


def test_create_model_rejects_bad_options():
  with pytest.raises(ValueError, match="arch='vgg'.*'resnet', 'resnext'"):
    models.create_model(arch='vgg')
  for depth in (18, 34):
    with pytest.raises(ValueError, match=f'depth={depth}.*50, 101, 152'):
      models.create_model(depth=depth)
  with pytest.raises(ValueError, match=r"\['denoise_plcement'\].*valid"):
    models.create_model(denoise_plcement='stage')
  model = models.create_model(depth=0, stage_sizes=[1, 1], num_filters=4)
  assert model.stage_sizes == (1, 1)


@pytest.mark.parametrize(
  'kwargs,pattern',
  [
    (
      dict(denoise_placement='everywhere'),
      "denoise_placement='everywhere'.*'none', 'stage', 'all'",
    ),
    (
      dict(denoise_placement='stage', denoise_op='gauss'),
      "'gauss'.*bilateral, mean, median, non_local, null",
    ),
    (dict(stem='vit'), "stem='vit'.*'imagenet', 'cifar'"),
    (
      dict(normalization='bgr'),
      "normalization='bgr'.*'tensorpack', 'mean_std'",
    ),
  ],
)
def test_model_rejects_bad_settings(kwargs, pattern):
  model = models._ResNetTiny(**kwargs)
  with pytest.raises(ValueError, match=pattern):
    model.init(jax.random.key(0), images())


def test_model_rejects_bad_images():
  model = models._ResNetTiny()
  with pytest.raises(ValueError, match=r'\[N, H, W, 3\].*\(2, 3, 16, 16\)'):
    model.init(jax.random.key(0), jnp.zeros((2, 3, 16, 16)))
