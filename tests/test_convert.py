"""Tests of fdjax.convert: the original release's npz files -> fdjax.

Data in tests/data:

* `tensorpack_vars_*.txt`: every variable (name, shape) of the released
  R152, R152-Denoise and X101-DenoiseAll graphs of the original
  implementation (facebookresearch/ImageNet-Adversarial-Training @1ad68f0),
  read from its graph in inference mode.
* `tensorpack_reference.npz`: logits of the ORIGINAL implementation on two
  random 64x64 BGR uint8 images (`images_bgr_uint8`) for its ResNet,
  ResNetDenoise and ResNeXtDenoiseAll models at depth 50, with the
  synthetic weights of `tensorpack_weights.synthetic_weights(seed=0)`
  (`logits_<arch>`), and the names and shapes of those graphs' variables
  (`variables_<arch>`). Produced outside this repository with TensorFlow
  2.15.1 (CPU) and tensorpack 0.11: the original's `nets.<arch>Model`
  built in `tf.compat.v1` graph mode exactly as its inference path does
  (`image_preprocess`: x * 2/255 - 1, NCHW transpose, `get_logits` under
  `TowerContext('', is_training=False)`), the weights loaded with
  tensorpack's `DictRestore`. TF's CPU kernels have no NCHW Conv2D/MaxPool,
  so those two ops ran in NHWC between transposes (a layout change only).
  The same script checked that the graphs' variables at depth 152/101 are
  exactly the `tensorpack_vars_*.txt` lists.
"""

import functools
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax import attacks
from fdjax import checkpoints
from fdjax import convert
from fdjax import models

DATA = pathlib.Path(__file__).parent / 'data'
ARCHS = ('ResNet', 'ResNetDenoise', 'ResNeXtDenoiseAll')
REFERENCE_LISTS = {
  'ResNet': ('tensorpack_vars_r152.txt', 152),
  'ResNetDenoise': ('tensorpack_vars_r152_denoise.txt', 152),
  'ResNeXtDenoiseAll': ('tensorpack_vars_x101_denoiseall.txt', 101),
}
EPS = 1e-5


def _import_weights_module():
  # A plain module beside this file (tests/ is not a package).
  path = pathlib.Path(__file__).parent / 'tensorpack_weights.py'
  spec = importlib.util.spec_from_file_location('_tensorpack_weights', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tensorpack_weights = _import_weights_module()


def read_reference_list(arch):
  """(name -> shape, header numbers) of a released graph's variables."""
  filename, depth = REFERENCE_LISTS[arch]
  text = (DATA / filename).read_text()
  header = re.search(
    r'(\d+) variables; trainable params = (\d+); all params incl. BN EMA = '
    r'(\d+)',
    text,
  )
  count, trainable, total = (int(g) for g in header.groups())
  shapes = {}
  for line in text.splitlines():
    if line.startswith('#') or not line.strip():
      continue
    name, shape, _ = line.split('\t')
    shapes[name] = tuple(int(s) for s in re.findall(r'\d+', shape))
  assert len(shapes) == count
  return depth, shapes, dict(trainable=trainable, total=total)


def to_depth50(shapes):
  """Drops the blocks a depth-50 network does not have (3, 4, 6, 3)."""
  keep = {}
  for name, shape in shapes.items():
    m = re.match(r'group(\d)/block(\d+)/', name)
    if m and int(m[2]) >= models.STAGE_SIZES[50][int(m[1])]:
      continue
    keep[name] = shape
  return keep


@functools.cache
def model_variables(arch, depth):
  """tensorpack name -> (flax path, shape) of fdjax's model, abstractly."""
  model = models.create_model(**convert.model_settings(arch, depth))
  abstract = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))
  out = {}
  for path, leaf in flat.items():
    name = convert.tensorpack_name(path)
    assert name not in out, f'{name} from {path} and {out[name][0]}'
    out[name] = (path, leaf.shape)
  return out


@functools.cache
def reference_outputs():
  with np.load(DATA / 'tensorpack_reference.npz') as data:
    return {k: data[k] for k in data.files}


def write_npz(path, arrays, colon_every=2):
  """Saves arrays; every `colon_every`-th name gets the ':0' suffix."""
  keyed = {}
  for i, name in enumerate(sorted(arrays)):
    keyed[name + ':0' if i % colon_every == 0 else name] = arrays[name]
  np.savez(path, **keyed)
  return path


def max_rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


# --------------------------------------------------------------------------
# Names and shapes of the released files (no arrays materialised).
# --------------------------------------------------------------------------


@pytest.mark.parametrize('arch', ARCHS)
def test_released_names_map_one_to_one(arch):
  depth, shapes, header = read_reference_list(arch)
  ours = model_variables(arch, depth)
  assert sorted(ours) == sorted(shapes)
  for name, shape in shapes.items():
    assert ours[name][1] == shape, name
  trainable = sum(
    int(np.prod(shape)) for path, shape in ours.values() if path[0] == 'params'
  )
  assert trainable == header['trainable']
  total = sum(int(np.prod(shape)) for _, shape in ours.values())
  assert total == header['total']


@pytest.mark.parametrize('arch', ARCHS)
def test_depth50_lists_match_the_original_graph(arch):
  _, shapes, _ = read_reference_list(arch)
  derived = to_depth50(shapes)
  # The variables of the original's depth-50 graph, as it built them.
  lines = str(reference_outputs()[f'variables_{arch}']).splitlines()
  original = {
    name: tuple(int(s) for s in re.findall(r'\d+', shape))
    for name, shape in (line.split('\t') for line in lines)
  }
  assert derived == original
  ours = model_variables(arch, 50)
  assert {name: shape for name, (_, shape) in ours.items()} == derived


# --------------------------------------------------------------------------
# End to end against the original implementation's logits.
# --------------------------------------------------------------------------


@pytest.fixture(scope='module')
def synthetic_npz(tmp_path_factory):
  """arch -> (npz path, weights) of the depth-50 synthetic weights."""
  made = {}

  def make(arch):
    if arch not in made:
      _, shapes, _ = read_reference_list(arch)
      weights = tensorpack_weights.synthetic_weights(to_depth50(shapes))
      path = tmp_path_factory.mktemp('npz') / f'{arch}-50.npz'
      made[arch] = (write_npz(path, weights), weights)
    return made[arch]

  return make


@pytest.mark.parametrize('arch', ARCHS)
def test_converted_logits_equal_the_original(arch, synthetic_npz):
  path, weights = synthetic_npz(arch)
  model, variables = convert.load_tensorpack(str(path), arch=arch, depth=50)
  assert model.num_classes == 1000
  # Every array lands under its own name, unchanged.
  flat = flax.traverse_util.flatten_dict(variables)
  assert len(flat) == len(weights)
  for fpath, value in flat.items():
    assert value.dtype == jnp.float32
    np.testing.assert_array_equal(
      value, weights[convert.tensorpack_name(fpath)]
    )

  ref = reference_outputs()
  bgr = ref['images_bgr_uint8']
  want = ref[f'logits_{arch}']
  apply = jax.jit(model.apply)
  # fdjax takes RGB in [0, 1]; the original took BGR uint8.
  got = apply(variables, jnp.asarray(bgr[..., ::-1] / 255.0, jnp.float32))
  err = max_rel_err(got, want)
  print(f'{arch}-50: max |fdjax - original| / max |original| = {err:.2e}')
  assert err < 1e-4
  # Forgetting the BGR -> RGB reversal is caught: the test can fail.
  wrong = apply(variables, jnp.asarray(bgr / 255.0, jnp.float32))
  assert max_rel_err(wrong, want) > 1e-3


def test_cli_writes_a_checkpoint_that_restores(synthetic_npz, tmp_path):
  path, weights = synthetic_npz('ResNet')
  out = tmp_path / 'converted'
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS='--xla_force_host_platform_device_count=1',
  )
  command = [sys.executable, '-m', 'fdjax.convert', f'--npz={path}']
  command += ['--arch=ResNet', '--depth=50', f'--out={out}']
  result = subprocess.run(
    command,
    env=env,
    cwd=pathlib.Path(__file__).parents[1],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert '25,557,032 parameters' in result.stdout

  variables, meta, step = checkpoints.load_variables(str(out))
  assert step == 0
  assert meta['model'] == convert.model_settings('ResNet', 50)
  assert meta['source'] == str(path)
  flat = flax.traverse_util.flatten_dict(variables)
  assert sorted(convert.tensorpack_name(p) for p in flat) == sorted(weights)
  for fpath, value in flat.items():
    np.testing.assert_array_equal(
      value, weights[convert.tensorpack_name(fpath)]
    )


# --------------------------------------------------------------------------
# Variables land where they belong: logits computed by hand.
# --------------------------------------------------------------------------


def _bn_of_zero(arrays, scope):
  """Inference BatchNorm of an all-zero input: a per-channel constant."""
  a = lambda leaf: np.asarray(arrays[f'{scope}/bn/{leaf}'], np.float64)
  return -a('mean/EMA') / np.sqrt(a('variance/EMA') + EPS) * a('gamma') + a(
    'beta'
  )


@pytest.mark.parametrize('placement', ['stage', 'all'])
def test_hand_computed_logits(placement):
  # Every convolution kernel is zero, so each residual block outputs
  # relu(BN3(0) + shortcut) and each denoising block adds BN(0): the trunk
  # output is a constant built from the BN variables of the last stage.
  kwargs = dict(denoise_placement=placement)
  if placement == 'all':
    kwargs.update(denoise_affinity='dot_product', denoise_embed=False)
  model = models._ResNetTiny(
    num_classes=3, stem='imagenet', stage_sizes=(1, 2), **kwargs
  )
  abstract = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3))
  )
  rng = np.random.default_rng(11)
  arrays = {}
  for path, leaf in flax.traverse_util.flatten_dict(abstract).items():
    name = convert.tensorpack_name(path)
    if name.endswith('/W') and name != 'linear/W':
      arrays[name] = np.zeros(leaf.shape, np.float32)
    elif name.endswith(('gamma', 'variance/EMA')):
      arrays[name] = rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    else:
      arrays[name] = rng.normal(0.0, 1.0, leaf.shape).astype(np.float32)
  variables = convert.convert_variables(arrays, model)

  relu = lambda x: np.maximum(x, 0.0)
  k = functools.partial(_bn_of_zero, arrays)
  trunk = relu(k('group1/block0/conv3') + k('group1/block0/convshortcut'))
  if placement == 'all':
    trunk = trunk + k('group1/block0/non_local/conv')
  trunk = relu(k('group1/block1/conv3') + trunk)
  if placement == 'all':
    trunk = trunk + k('group1/block1/non_local/conv')
  else:
    trunk = trunk + k('group1_denoise/conv')
  want = trunk @ arrays['linear/W'] + arrays['linear/b']

  x = jnp.asarray(np.random.default_rng(12).uniform(size=(2, 16, 16, 3)))
  got = jax.jit(model.apply)(variables, x.astype(jnp.float32))
  np.testing.assert_allclose(got, np.stack([want, want]), rtol=1e-5)


# --------------------------------------------------------------------------
# Bad files.
# --------------------------------------------------------------------------


def _tiny_arrays():
  model = models._ResNetTiny(num_classes=3, denoise_placement='stage')
  abstract = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3))
  )
  shapes = {
    convert.tensorpack_name(path): leaf.shape
    for path, leaf in flax.traverse_util.flatten_dict(abstract).items()
  }
  return model, tensorpack_weights.synthetic_weights(shapes)


def test_convert_variables_names_every_offender():
  model, arrays = _tiny_arrays()
  convert.convert_variables(arrays, model)  # the unchanged set loads
  del arrays['group1_denoise/embedding_phi/W']
  del arrays['conv0/bn/mean/EMA']
  arrays['group0/block0/conv9/W'] = np.zeros((1, 1, 4, 4), np.float32)
  arrays['linear/b'] = np.zeros((4,), np.float32)
  with pytest.raises(ValueError) as e:
    convert.convert_variables(arrays, model)
  message = str(e.value)
  assert (
    '2 missing: conv0/bn/mean/EMA, group1_denoise/embedding_phi/W' in message
  )
  assert '1 unexpected: group0/block0/conv9/W' in message
  assert '1 mis-shaped: linear/b: file (4,), model (3,)' in message


@pytest.mark.parametrize(
  'change,pattern',
  [
    (lambda a: a.pop('linear/W'), r'1 missing: linear/W'),
    (
      lambda a: a.update({'linear/W_ema': a['linear/W']}),
      r'1 unexpected: linear/W_ema',
    ),
    (
      lambda a: a.update({'conv0/W': a['conv0/W'][:, :, :, :2]}),
      r'1 mis-shaped: conv0/W: file \(3, 3, 3, 2\), model \(3, 3, 3, 4\)',
    ),
  ],
)
def test_each_kind_of_mismatch(change, pattern):
  model, arrays = _tiny_arrays()
  change(arrays)
  with pytest.raises(ValueError, match=pattern) as e:
    convert.convert_variables(arrays, model)
  # Only the offending kind is reported.
  assert len(re.findall('missing|unexpected|mis-shaped', str(e.value))) == 1


def test_duplicate_keys_with_and_without_colon(tmp_path):
  path = tmp_path / 'dup.npz'
  np.savez(path, **{'conv0/W': np.zeros(1), 'conv0/W:0': np.zeros(1)})
  with pytest.raises(ValueError, match=r"variable 'conv0/W' appears twice"):
    convert.load_tensorpack(str(path), arch='ResNet', depth=50)


def test_unknown_arch_and_depth(tmp_path):
  path = tmp_path / 'w.npz'
  np.savez(path, **{'linear/b': np.zeros(10)})
  message = "arch='ResNet18' is not valid; choose one of: ResNet, " + (
    'ResNetDenoise, ResNeXtDenoiseAll'
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    convert.load_tensorpack(str(path), arch='ResNet18', depth=50)
  with pytest.raises(ValueError, match=re.escape(message)):
    convert.model_settings('ResNet18', 50)
  with pytest.raises(ValueError, match=r'depth=34.*50, 101, 152'):
    convert.load_tensorpack(str(path), arch='ResNet', depth=34)


def test_wrong_arch_or_depth_for_a_file(synthetic_npz):
  path, _ = synthetic_npz('ResNet')
  with pytest.raises(ValueError) as e:
    convert.load_tensorpack(str(path), arch='ResNetDenoise', depth=50)
  message = str(e.value)
  assert f'{path} (arch=ResNetDenoise, depth=50)' in message
  assert '28 missing:' in message and 'group3_denoise/conv/W' in message
  assert 'unexpected' not in message
  with pytest.raises(ValueError, match=r'missing: .*group2/block22/conv3/W'):
    convert.load_tensorpack(str(path), arch='ResNet', depth=101)


def test_paper_protocol_end_to_end_on_a_converted_model(synthetic_npz):
  """The original's targeted PGD on a converted R50-Denoise, step by step."""
  path, _ = synthetic_npz('ResNetDenoise')
  model, variables = convert.load_tensorpack(
    str(path), arch='ResNetDenoise', depth=50
  )
  images = jax.random.uniform(jax.random.key(3), (4, 32, 32, 3))
  labels = jnp.array([0, 1, 2, 999])
  ids = jnp.arange(4) + 100
  logits_fn = lambda x: model.apply(variables, x, train=False)
  eps, num_steps = attacks.PAPER_EPSILON, 2
  adv, targets = jax.jit(
    lambda k, x, y: attacks.targeted_pgd(
      logits_fn,
      k,
      x,
      y,
      num_classes=1000,
      num_steps=num_steps,
      example_ids=ids,
    )
  )(jax.random.key(7), images, labels)

  # The same protocol written out: random targets, uniform start in the
  # ball (not clipped), step max(1/255, eps/steps) = 8/255 down the sign of
  # the target cross-entropy's gradient, clip to the ball and [0, 1].
  key_targets, key_start = jax.random.split(jax.random.key(7))
  np.testing.assert_array_equal(
    targets, attacks.random_targets(key_targets, labels, 1000, ids)
  )
  assert np.all(np.asarray(targets) != np.asarray(labels))
  step = max(1 / 255, eps / num_steps)
  x = np.asarray(images, np.float32)
  lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
  noise = eps * jnp.stack([
    jax.random.uniform(
      jax.random.fold_in(key_start, int(i)), images.shape[1:],
      minval=-1.0, maxval=1.0,
    )
    for i in ids
  ])  # fmt: skip
  adv_ref = x + np.asarray(noise)

  def target_loss(z):
    return attacks.example_losses(logits_fn(z), targets, 'xent').sum()

  grad_fn = jax.jit(jax.grad(target_loss))  # (Op by op it takes minutes.)
  for _ in range(num_steps):
    g = np.asarray(grad_fn(jnp.asarray(adv_ref)))
    adv_ref = np.clip(adv_ref - step * np.sign(g), lo, hi)
  np.testing.assert_allclose(adv, adv_ref, atol=1e-6)
  assert np.abs(np.asarray(adv) - x).max() <= eps + 1e-6
  loss_fn = jax.jit(target_loss)
  assert float(loss_fn(adv)) < float(loss_fn(images))
