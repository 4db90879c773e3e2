"""ResNet / ResNeXt with feature-denoising blocks (Flax linen).

The backbone is exactly the original's post-activation ResNet v1
(docs/architecture.md): a 7x7/2 stem and 3x3/2 max-pool, bottlenecks with
the stride on the 3x3 convolution, projection shortcuts only where the
channel count changes, 'SAME' padding (TF's rule, which XLA shares),
BatchNorm with momentum 0.9 and epsilon 1e-5, the last BN of every residual
branch initialised to zero, convolutions initialised with variance-scaling
(2, fan_out) and the classifier with N(0, 0.01).

Feature-denoising blocks (`DenoisingBlock`) go after the last residual block
of every stage (`denoise_placement='stage'`, the paper's "4 blocks") or after
every residual block (`'all'`, the CAAD 2018 winner), with any op of
`fdjax.denoise`.

Module names mirror the original's variable scopes so that its released
weights map one to one (see `fdjax.convert`): `conv0`, `group{g}_block{b}`
holding `conv1`, `conv2`, `conv3`, `convshortcut` (and `non_local` for
denoise-after-every-block), `group{g}_denoise` for the per-stage blocks and
`linear`. Each convolution `X` has its BatchNorm in `X_bn`.

Models take RGB images in [0, 1] (float) or [0, 255] (uint8), NHWC, and
normalise inside: `normalization='tensorpack'` reverses the channels to BGR
and maps to [-1, 1] as the original did; `'mean_std'` subtracts the ImageNet
RGB mean and divides by its standard deviation.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> model = ResNet(stage_sizes=(1, 1), num_classes=10, num_filters=8,
  ...                stem='cifar', denoise_placement='stage')
  >>> x = jnp.ones((2, 16, 16, 3)) * 0.5
  >>> variables = model.init(jax.random.key(0), x)
  >>> model.apply(variables, x).shape
  (2, 10)
"""

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdjax import denoise
from fdjax import layers
from fdjax import parallel

ModuleDef = Any

STAGE_SIZES = {
  18: None,  # Not a bottleneck network; listed so the error names it.
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
}
DENOISE_PLACEMENTS = ('none', 'stage', 'all')
NORMALIZATIONS = ('tensorpack', 'mean_std')
STEMS = ('imagenet', 'cifar')

# ImageNet RGB statistics on the [0, 1] scale.
_MEAN_RGB = (0.485, 0.456, 0.406)
_STDDEV_RGB = (0.229, 0.224, 0.225)

conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'truncated_normal')
linear_init = nn.initializers.normal(stddev=0.01)
embedding_init = nn.initializers.normal(stddev=0.01)


def _check_choice(name: str, value: Any, valid: Sequence[Any]) -> None:
  if value not in valid:
    raise ValueError(f'{name}={value!r} is not valid; valid: {list(valid)}.')


class DenoisingBlock(nn.Module):
  """Feature denoising block: op -> 1x1 conv -> BN (gamma 0) -> residual.

  Identity at initialisation because the BatchNorm scale starts at zero.

  Attributes:
    op: name of a `fdjax.denoise` op ('non_local', 'bilateral', 'mean',
      'median', 'null').
    affinity: 'gaussian' or 'dot_product' (non-local op only).
    embed: learn theta/phi 1x1 embeddings C -> C/2 (ops with affinities).
    size: window size of the local ops (bilateral, mean, median).
    use_conv: the 1x1 convolution after the op (paper ablation: without).
    residual: add the block's input back (paper ablation: without).
    conv: convolution constructor (set by the network).
    norm: BatchNorm constructor (set by the network).
  """

  op: str = 'non_local'
  affinity: str = 'gaussian'
  embed: bool = True
  size: int = 3
  use_conv: bool = True
  residual: bool = True
  conv: ModuleDef = None
  norm: ModuleDef = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = self.conv or functools.partial(
      nn.Conv, use_bias=False, kernel_init=conv_init
    )
    norm = self.norm or functools.partial(
      nn.BatchNorm, use_running_average=True, momentum=0.9, epsilon=1e-5
    )
    channels = x.shape[-1]
    theta = phi = None
    if self.embed and denoise.uses_embedding(self.op):
      if channels % 2:
        raise ValueError(
          f'embed=True needs an even channel count, got {channels}'
        )
      theta = conv(
        channels // 2,
        (1, 1),
        kernel_init=embedding_init,
        name='embedding_theta',
      )(x)
      phi = conv(
        channels // 2,
        (1, 1),
        kernel_init=embedding_init,
        name='embedding_phi',
      )(x)
    y = denoise.apply(
      self.op,
      x,
      affinity=self.affinity,
      size=self.size,
      theta=theta,
      phi=phi,
    )
    if self.use_conv:
      y = conv(channels, (1, 1), name='conv')(y)
    y = norm(scale_init=nn.initializers.zeros, name='conv_bn')(y)
    return x + y if self.residual else y


class Bottleneck(nn.Module):
  """Post-activation bottleneck; the stride is on the 3x3 convolution."""

  width: int
  out_channels: int
  strides: int = 1
  groups: int = 1
  conv: ModuleDef = None
  norm: ModuleDef = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv, norm = self.conv, self.norm
    y = conv(self.width, (1, 1), name='conv1')(x)
    y = nn.relu(norm(name='conv1_bn')(y))
    y = conv(
      self.width,
      (3, 3),
      strides=self.strides,
      feature_group_count=self.groups,
      name='conv2',
    )(y)
    y = nn.relu(norm(name='conv2_bn')(y))
    y = conv(self.out_channels, (1, 1), name='conv3')(y)
    y = norm(scale_init=nn.initializers.zeros, name='conv3_bn')(y)
    shortcut = x
    if x.shape[-1] != self.out_channels:
      shortcut = conv(
        self.out_channels,
        (1, 1),
        strides=self.strides,
        name='convshortcut',
      )(x)
      shortcut = norm(name='convshortcut_bn')(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet / ResNeXt v1 with optional feature-denoising blocks.

  Attributes:
    stage_sizes: bottlenecks per stage, e.g. (3, 8, 36, 3) for ResNet-152.
    num_classes: classifier outputs.
    num_filters: stem width; stage g has outputs 4 * num_filters * 2**g.
    groups: ResNeXt cardinality (1 for ResNet).
    width_per_group: ResNeXt bottleneck width per group at stage 0 (the "8d"
      of 32x8d); ignored when groups == 1.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv,
      no pool) for small images.
    normalization: 'tensorpack' (BGR, x * 2 - 1) or 'mean_std'.
    denoise_placement: 'none', 'stage' (after the last block of each stage)
      or 'all' (after every block).
    denoise_op, denoise_affinity, denoise_embed, denoise_size,
    denoise_use_conv, denoise_residual: the `DenoisingBlock` settings.
    bn_axis_name: mesh axis to synchronise BatchNorm statistics over (None:
      per-device statistics, as the original).
    dtype: computation dtype (params stay float32).
    conv_impl: how convolutions are computed: 'auto' (matrix products on
      CPU, where they are much faster, XLA's convolutions elsewhere), 'xla'
      (`nn.Conv`) or 'matmul' (`MatmulConv`). Same parameters either way.
  """

  stage_sizes: Sequence[int]
  num_classes: int = 1000
  num_filters: int = 64
  groups: int = 1
  width_per_group: int = 64
  stem: str = 'imagenet'
  normalization: str = 'tensorpack'
  denoise_placement: str = 'none'
  denoise_op: str = 'non_local'
  denoise_affinity: str = 'gaussian'
  denoise_embed: bool = True
  denoise_size: int = 3
  denoise_use_conv: bool = True
  denoise_residual: bool = True
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  def _normalize(self, x: jax.Array) -> jax.Array:
    if x.dtype == jnp.uint8:
      x = x.astype(jnp.float32) / 255.0
    x = x.astype(jnp.float32)
    if self.normalization == 'tensorpack':
      x = x[..., ::-1] * 2.0 - 1.0
    else:
      x = (x - jnp.asarray(_MEAN_RGB)) / jnp.asarray(_STDDEV_RGB)
    return x.astype(self.dtype)

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool = False, return_features: bool = False
  ):
    """Runs the network.

    Args:
      x: images [N, H, W, 3], RGB, float in [0, 1] or uint8.
      train: use batch statistics and update the moving averages (call with
        `mutable=['batch_stats']`); False uses the moving statistics.
      return_features: also return a dict of the feature maps before and
        after each denoising block, keyed by block name.

    Returns:
      Logits [N, num_classes] in float32, or `(logits, features)`.
    """
    _check_choice('stem', self.stem, STEMS)
    _check_choice('normalization', self.normalization, NORMALIZATIONS)
    _check_choice(
      'denoise_placement', self.denoise_placement, DENOISE_PLACEMENTS
    )
    if self.denoise_placement != 'none':
      denoise.get(self.denoise_op)  # Fails early with the valid names.
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(
        f'expected images [N, H, W, 3] (NHWC RGB), got shape {x.shape}'
      )
    conv_impl = layers.resolve_conv_impl(self.conv_impl)
    conv = functools.partial(
      layers.MatmulConv if conv_impl == 'matmul' else nn.Conv,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=conv_init,
      padding='SAME',
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      axis_name=self.bn_axis_name if train else None,
    )
    make_denoise = functools.partial(
      DenoisingBlock,
      op=self.denoise_op,
      affinity=self.denoise_affinity,
      embed=self.denoise_embed,
      size=self.denoise_size,
      use_conv=self.denoise_use_conv,
      residual=self.denoise_residual,
      conv=conv,
      norm=norm,
    )
    features = {}

    def denoise_block(y, name):
      out = make_denoise(name=name)(y)
      features[name] = {'before': y, 'after': out}
      return out

    x = self._normalize(x)
    if self.stem == 'imagenet':
      x = conv(self.num_filters, (7, 7), strides=2, name='conv0')(x)
      x = nn.relu(norm(name='conv0_bn')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    else:
      x = conv(self.num_filters, (3, 3), name='conv0')(x)
      x = nn.relu(norm(name='conv0_bn')(x))

    for g, num_blocks in enumerate(self.stage_sizes):
      out_channels = self.num_filters * 4 * 2**g
      if self.groups == 1:
        width = self.num_filters * 2**g
      else:
        width = self.groups * self.width_per_group * 2**g
      for b in range(num_blocks):
        x = Bottleneck(
          width=width,
          out_channels=out_channels,
          strides=2 if (b == 0 and g > 0) else 1,
          groups=self.groups,
          conv=conv,
          norm=norm,
          name=f'group{g}_block{b}',
        )(x)
        if self.denoise_placement == 'all':
          x = denoise_block(x, f'group{g}_block{b}_non_local')
      if self.denoise_placement == 'stage':
        x = denoise_block(x, f'group{g}_denoise')

    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=linear_init,
      name='linear',
    )(x)
    logits = logits.astype(jnp.float32)
    if return_features:
      return logits, features
    return logits


ResNet50 = functools.partial(ResNet, stage_sizes=STAGE_SIZES[50])
ResNet101 = functools.partial(ResNet, stage_sizes=STAGE_SIZES[101])
ResNet152 = functools.partial(ResNet, stage_sizes=STAGE_SIZES[152])
ResNeXt101_32x8d = functools.partial(
  ResNet, stage_sizes=STAGE_SIZES[101], groups=32, width_per_group=8
)
# A tiny network with the real code path, for tests and CPU smoke runs.
_ResNetTiny = functools.partial(
  ResNet, stage_sizes=(1, 1), num_filters=4, stem='cifar'
)

ARCHS = ('resnet', 'resnext')


def create_model(
  *,
  arch: str = 'resnet',
  depth: int = 50,
  num_classes: int = 1000,
  dtype: Any = jnp.float32,
  **kwargs,
) -> ResNet:
  """Builds a network by name, as configs describe it.

  Args:
    arch: 'resnet' or 'resnext' (ResNeXt 32x8d).
    depth: 50, 101 or 152; or 0 with `stage_sizes` in kwargs for custom
      (tiny) networks.
    num_classes: classifier outputs.
    dtype: computation dtype, e.g. jnp.bfloat16 on TPU, or its name.
    **kwargs: other `ResNet` attributes (denoise_placement, denoise_op, ...).

  Returns:
    An unbound `ResNet` module.

  Raises:
    ValueError: an unknown arch, depth or attribute.

  Examples:
    >>> model = create_model(arch='resnet', depth=152,
    ...                      denoise_placement='stage')
    >>> model.stage_sizes
    (3, 8, 36, 3)
  """
  _check_choice('arch', arch, ARCHS)
  if 'stage_sizes' in kwargs and kwargs['stage_sizes'] is not None:
    kwargs['stage_sizes'] = tuple(kwargs['stage_sizes'])
  else:
    kwargs.pop('stage_sizes', None)
    if STAGE_SIZES.get(depth) is None:
      raise ValueError(
        f'depth={depth!r} is not valid; choose one of: 50, 101, 152 '
        '(or give stage_sizes)'
      )
    kwargs['stage_sizes'] = STAGE_SIZES[depth]
  if arch == 'resnext':
    kwargs.setdefault('groups', 32)
    kwargs.setdefault('width_per_group', 8)
  if isinstance(dtype, str):
    dtype = jnp.dtype(dtype)
  valid = set(ResNet.__dataclass_fields__) - {'parent', 'name'}
  unknown = sorted(set(kwargs) - valid)
  if unknown:
    raise ValueError(
      f'unknown model option(s) {unknown}; valid: {sorted(valid)}'
    )
  return ResNet(num_classes=num_classes, dtype=dtype, **kwargs)


def _variants() -> dict[str, dict[str, Any]]:
  stage = dict(
    denoise_placement='stage',
    denoise_op='non_local',
    denoise_affinity='gaussian',
    denoise_embed=True,
  )
  out = {}
  for prefix, arch in (('r', 'resnet'), ('x', 'resnext')):
    for depth in (50, 101, 152):
      base = f'{prefix}{depth}'
      out[base] = dict(arch=arch, depth=depth, denoise_placement='none')
      out[f'{base}_denoise'] = dict(arch=arch, depth=depth, **stage)
      # The released ResNeXt DenoiseAll uses dot-product affinities without
      # embedding; the ResNet one the Gaussian embedded form.
      out[f'{base}_denoise_all'] = dict(
        out[f'{base}_denoise'], denoise_placement='all'
      )
      if arch == 'resnext':
        out[f'{base}_denoise_all'].update(
          denoise_affinity='dot_product', denoise_embed=False
        )
  # The paper's ablations of the denoising operation (Table 4 / Figure 7).
  out['r152_nonlocal_gaussian'] = dict(out['r152_denoise'])
  out['r152_nonlocal_dot'] = dict(
    out['r152_denoise'], denoise_affinity='dot_product'
  )
  for op in ('bilateral', 'mean', 'median', 'null'):
    out[f'r152_{op}'] = dict(out['r152_denoise'], denoise_op=op)
  return out


VARIANTS: dict[str, dict[str, Any]] = _variants()
"""The named networks: `create_model` keyword arguments by name.

``r``/``x`` + depth (ResNet / ResNeXt 32x8d), optionally ``_denoise`` (a
non-local block after each stage, the paper's R152-Denoise) or
``_denoise_all`` (after every residual block, the CAAD 2018 entry), and the
paper's ablations ``r152_nonlocal_gaussian``, ``r152_nonlocal_dot``,
``r152_bilateral``, ``r152_mean``, ``r152_median``, ``r152_null``.
"""


def variant(name: str) -> dict[str, Any]:
  """The `create_model` keyword arguments of a named network.

  Args:
    name: a key of `VARIANTS`.

  Returns:
    A new dict of strings and numbers.

  Raises:
    ValueError: an unknown name, listing the valid ones.

  Examples:
    >>> variant('r152_denoise')['denoise_placement']
    'stage'
  """
  if name not in VARIANTS:
    raise ValueError(
      f'model variant {name!r} is not valid; valid: {sorted(VARIANTS)}.'
    )
  return dict(VARIANTS[name])


def model_kwargs(model_config: Any, num_classes: int) -> dict[str, Any]:
  """`create_model` kwargs from a config's `model` section (JSON-able).

  ``sync_batch_stats`` is not a model attribute: `from_config` turns it into
  the BatchNorm axis name. ``stage_sizes=None`` means "from the depth".

  Args:
    model_config: `config.model` (a ConfigDict or a mapping).
    num_classes: classifier outputs.

  Returns:
    A dict of strings, numbers and lists, as stored with checkpoints.
  """
  if hasattr(model_config, 'to_dict'):
    model_config = model_config.to_dict()
  kwargs = dict(model_config or {})
  kwargs.pop('sync_batch_stats', None)
  if kwargs.get('stage_sizes') is None:
    kwargs.pop('stage_sizes', None)
  else:
    kwargs['stage_sizes'] = list(kwargs['stage_sizes'])
  kwargs['num_classes'] = int(num_classes)
  return kwargs


def from_config(
  model_config: Any, num_classes: int, *, bn_axis_name: str = parallel.AXIS
) -> ResNet:
  """The network a config's `model` section describes.

  Args:
    model_config: `config.model` (fields: `fdjax/config_base.py`).
    num_classes: classifier outputs.
    bn_axis_name: the device axis for synchronised BatchNorm, used when
      `model_config.sync_batch_stats` is set (`fdjax.parallel`'s 'data').

  Returns:
    An unbound `ResNet`.

  Examples:
    >>> from fdjax import config_base
    >>> from_config(config_base.model_config(), 10).stage_sizes
    (3, 8, 36, 3)
  """
  sync = bool(dict(model_config or {}).get('sync_batch_stats', False))
  kwargs = model_kwargs(model_config, num_classes)
  if sync:
    kwargs['bn_axis_name'] = bn_axis_name
  return create_model(**kwargs)
