r"""Loads the original release's tensorpack npz weights into fdjax models.

The original authors released R152.npz, R152-Denoise.npz and
X101-DenoiseAll.npz (and the same families at other depths): one array per
graph variable, keyed by its name (with or without ':0'). Conv kernels are
HWIO like Flax's; BatchNorm keeps gamma, beta and the moving mean/variance
under `<scope>/bn/`. fdjax's module names mirror those scopes (see
`fdjax.models`), so the mapping is a renaming: every variable of the file
must be used and every parameter of the model filled, or loading fails with
the list of offenders.

The original takes BGR uint8 images scaled to [-1, 1]; the converted model
takes fdjax's RGB [0, 1] (or uint8) images and does the same internally
(`normalization='tensorpack'`), so its logits equal the original's.

Command line (writes an orbax checkpoint that `fdjax.main --mode=eval`
evaluates):

  python -m fdjax.convert --npz R152-Denoise.npz --arch ResNetDenoise \
      --depth 152 --out /tmp/r152_denoise
"""

from collections.abc import Mapping
import os
import re
from typing import Any
import zipfile

from absl import app
from absl import flags
from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from fdjax import checkpoints
from fdjax import models
from fdjax import workdir as workdir_lib

# The original's model classes and the `fdjax.models.VARIANTS` suffix of
# the network each builds (nets.py of the original release).
ARCHS = {
  'ResNet': ('r', ''),
  'ResNetDenoise': ('r', '_denoise'),
  'ResNeXtDenoiseAll': ('x', '_denoise_all'),
}

_GROUP_BLOCK = re.compile(r'^group(\d+)_block(\d+)(_non_local)?$')


def model_settings(arch: str, depth: int, num_classes: int = 1000) -> dict:
  """The `fdjax.models.create_model` kwargs of an original architecture.

  Args:
    arch: 'ResNet', 'ResNetDenoise' or 'ResNeXtDenoiseAll'.
    depth: 50, 101 or 152.
    num_classes: classifier outputs (1000 for the released files).

  Returns:
    A dict of strings and numbers (JSON-able; stored with checkpoints).

  Raises:
    ValueError: an unknown arch.
  """
  if arch not in ARCHS:
    raise ValueError(
      f'arch={arch!r} is not valid; choose one of: {", ".join(ARCHS)}'
    )
  prefix, suffix = ARCHS[arch]
  if depth not in (50, 101, 152):
    raise ValueError(
      f'depth={depth!r} is not valid; valid: 50, 101, 152 (the '
      'original release)'
    )
  return dict(
    models.variant(f'{prefix}{int(depth)}{suffix}'),
    num_classes=int(num_classes),
    normalization='tensorpack',
  )


def tensorpack_name(path: tuple[str, ...]) -> str:
  """The original's variable name of a Flax variable path.

  Args:
    path: (collection, module..., leaf), e.g.
      ('params', 'group0_block0', 'conv1_bn', 'scale').

  Returns:
    The tensorpack name, e.g. 'group0/block0/conv1/bn/gamma'.

  Examples:
    >>> tensorpack_name(('params', 'group0_block0', 'conv1_bn', 'scale'))
    'group0/block0/conv1/bn/gamma'
    >>> tensorpack_name(('batch_stats', 'group1_denoise', 'conv_bn', 'var'))
    'group1_denoise/conv/bn/variance/EMA'
    >>> tensorpack_name(('params', 'linear', 'bias'))
    'linear/b'
  """
  collection, *modules, leaf = path
  parts = []
  for module in modules:
    match = _GROUP_BLOCK.match(module)
    if match:
      parts += [f'group{match[1]}', f'block{match[2]}']
      if match[3]:
        parts.append('non_local')
    elif module.endswith('_bn'):
      parts += [module[: -len('_bn')], 'bn']
    else:
      parts.append(module)
  is_bn = bool(modules) and modules[-1].endswith('_bn')
  if collection == 'batch_stats':
    leaf_name = {'mean': 'mean/EMA', 'var': 'variance/EMA'}[leaf]
  elif is_bn:
    leaf_name = {'scale': 'gamma', 'bias': 'beta'}[leaf]
  else:
    leaf_name = {'kernel': 'W', 'bias': 'b'}[leaf]
  return '/'.join(parts + [leaf_name])


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """{name: array} of an npz file; a malformed file is one ValueError line.

  Raises:
    ValueError: the file is missing, not an npz archive (truncated, not a
      zip, an .npy), holds objects (pickles), a damaged array, or a name
      twice; the message names the path and what was wrong.
  """
  arrays = {}
  try:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise ValueError('a single array (.npy), not an npz archive')
    with data:
      for key in data.files:
        name = key[:-2] if key.endswith(':0') else key
        if name in arrays:
          raise ValueError(f'variable {name!r} appears twice')
        try:
          arrays[name] = data[key]
        except ValueError as e:
          if 'allow_pickle' in str(e):
            raise ValueError(
              f'{key!r} holds Python objects, not numbers (a pickle; '
              'never loaded)'
            ) from None
          raise ValueError(f'{key!r} is damaged ({e})') from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
          raise ValueError(f'{key!r} is damaged ({e})') from None
  except FileNotFoundError:
    raise ValueError(f'{path}: no such file') from None
  except IsADirectoryError:
    raise ValueError(f'{path}: a directory, not an npz file') from None
  except ValueError as e:
    if 'allow_pickle' in str(e):  # np.load's words for "not npz or npy".
      e = 'not an npz archive (truncated, or another format)'
    raise ValueError(f'{path}: {e}') from None
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise ValueError(f'{path}: not a readable npz archive ({e})') from None
  return arrays


def convert_variables(
  arrays: Mapping[str, np.ndarray], model: models.ResNet
) -> dict[str, Any]:
  """Maps tensorpack arrays onto the variables of `model`.

  Args:
    arrays: tensorpack name (without ':0') -> array.
    model: the fdjax model to fill.

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 jax arrays.

  Raises:
    ValueError: missing, unexpected or mis-shaped variables, listed.
  """
  abstract = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32)
  )
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))
  names = {path: tensorpack_name(path) for path in flat}
  expected = set(names.values())
  missing = sorted(expected - set(arrays))
  unexpected = sorted(set(arrays) - expected)
  misshaped = sorted(
    f'{name}: file {tuple(arrays[name].shape)}, model {flat[path].shape}'
    for path, name in names.items()
    if name in arrays and tuple(arrays[name].shape) != flat[path].shape
  )
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing: {", ".join(missing)}')
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected: {", ".join(unexpected)}')
  if misshaped:
    problems.append(f'{len(misshaped)} mis-shaped: {"; ".join(misshaped)}')
  if problems:
    raise ValueError(
      'the weights do not match the model (' + '. '.join(problems) + ')'
    )
  filled = {
    path: jnp.asarray(arrays[name], dtype=jnp.float32)
    for path, name in names.items()
  }
  variables = flax.traverse_util.unflatten_dict(filled)
  variables.setdefault('batch_stats', {})
  return variables


def load_tensorpack(
  path: str, *, arch: str, depth: int
) -> tuple[models.ResNet, dict[str, Any]]:
  """Loads an original release npz file into an fdjax model.

  Args:
    path: the npz file (R152.npz, R152-Denoise.npz, X101-DenoiseAll.npz, or
      the same families at depth 50/101/152).
    arch: 'ResNet', 'ResNetDenoise' or 'ResNeXtDenoiseAll'.
    depth: 50, 101 or 152.

  Returns:
    (model, variables): `model.apply(variables, images)` gives the original's
    logits for RGB images in [0, 1] (or uint8).

  Raises:
    ValueError: an unknown arch/depth, or weights that do not fit the model
      (the message lists every offending variable).
  """
  settings = model_settings(arch, depth)
  arrays = _read_npz(path)
  if 'linear/W' in arrays and arrays['linear/W'].ndim == 2:
    settings['num_classes'] = int(arrays['linear/W'].shape[1])
  model = models.create_model(**settings)
  try:
    variables = convert_variables(arrays, model)
  except ValueError as e:
    raise ValueError(f'{path} (arch={arch}, depth={depth}): {e}') from None
  return model, variables


def check_out_dir(out: str) -> None:
  """Refuses an --out that holds checkpoints (a training run's or another
  conversion's): converting never overwrites nor deletes a checkpoint.

  Raises:
    ValueError: `out/checkpoints/` holds a step, or `out` is a file.
  """
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f'--out={out!r} is a file; valid: a directory.')
  if workdir_lib.holds_checkpoints(out) or os.path.exists(
    os.path.join(out, workdir_lib.CONFIG_FILE)
  ):
    raise ValueError(
      f'--out={out!r} already holds checkpoints or a training run '
      f'({checkpoints.checkpoint_dir(out)}); valid: an empty or new '
      'directory (nothing is overwritten or deleted).'
    )


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    check_out_dir(f.out)
    model, variables = load_tensorpack(f.npz, arch=f.arch, depth=f.depth)
  except ValueError as e:
    raise SystemExit(f'FATAL {e}') from None
  settings = model_settings(f.arch, f.depth, model.num_classes)
  # max_to_keep=None: orbax deletes nothing.
  manager = checkpoints.create_manager(
    f.out, enable_async=False, max_to_keep=None
  )
  checkpoints.save(
    manager,
    0,
    variables,
    meta={'model': settings, 'source': f.npz},
    force=True,
  )
  manager.wait_until_finished()
  manager.close()
  num_params = sum(x.size for x in jax.tree.leaves(variables['params']))
  logging.info(
    'Wrote %s (%s, depth %d, %d parameters) to %s',
    f.npz,
    f.arch,
    f.depth,
    num_params,
    checkpoints.checkpoint_dir(f.out),
  )
  print(
    f'converted {f.npz}: {f.arch}-{f.depth}, {num_params:,} parameters -> '
    f'{checkpoints.checkpoint_dir(f.out)}'
  )


def _define_flags():
  # Defined only when run as a program: importing fdjax defines no flags.
  flags.DEFINE_string('npz', None, 'tensorpack npz file of the release.')
  flags.DEFINE_enum('arch', None, list(ARCHS), 'the original model class.')
  flags.DEFINE_integer('depth', None, 'network depth: 50, 101 or 152.')
  flags.DEFINE_string('out', None, 'output directory (orbax checkpoint).')
  flags.mark_flags_as_required(['npz', 'arch', 'depth', 'out'])
  flags.register_validator(
    'depth', lambda d: d in (50, 101, 152), '--depth must be 50, 101 or 152'
  )


if __name__ == '__main__':
  _define_flags()
  app.run(main)
