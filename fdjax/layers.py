"""How convolutions are computed: XLA's, or matrix products on CPU.

XLA:CPU runs ResNet's convolutions slowly: 1x1 convolutions and their
gradients go through its convolution path with kernel transposes, and a 3x3
convolution on a map smaller than its window (the last stage at 64x64
input) has its operands swapped by XLA into a form that falls back to a
naive loop (~0.45 s per convolution for ResNet-50, batch 8). Computing the
same convolutions as matrix products (1x1: a dot over channels; kxk: the
k*k shifted windows concatenated along channels, then one dot) is ~1.3x
faster at 224x224 and ~7x faster at 64x64 on CPU (see fdjax.benchmark).
Accelerators keep XLA's native convolutions.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _check_choice(name: str, value: Any, valid: Sequence[Any]) -> None:
  if value not in valid:
    raise ValueError(f'{name}={value!r} is not valid; valid: {list(valid)}.')


CONV_IMPLS = ('auto', 'xla', 'matmul')


def conv_as_matmul(
  x: jax.Array,
  kernel: jax.Array,
  strides: int | Sequence[int] = 1,
  feature_group_count: int = 1,
) -> jax.Array:
  """A 'SAME'-padded NHWC convolution computed with matrix products.

  Equal to ``lax.conv_general_dilated(x, kernel, strides, 'SAME',
  dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=...)``
  (TF's 'SAME' rule: extra padding at the bottom/right), up to float
  rounding. A 1x1 kernel is one dot over channels (after subsampling for
  strides); a kh x kw kernel concatenates the kh*kw shifted, strided windows
  of the padded input along channels ("im2col") and does one dot, or a
  batched one per group.

  Args:
    x: [N, H, W, C] input.
    kernel: [kh, kw, C // feature_group_count, O] weights (flax's layout).
    strides: an int or (sh, sw).
    feature_group_count: groups (ResNeXt cardinality); C and O divisible.

  Returns:
    [N, ceil(H / sh), ceil(W / sw), O].

  Raises:
    ValueError: shapes that do not fit together.

  Examples:
    >>> x = jnp.arange(2 * 5 * 5 * 4.0).reshape(2, 5, 5, 4) / 100
    >>> k = jnp.ones((3, 3, 4, 6)) / 10
    >>> ref = jax.lax.conv_general_dilated(
    ...     x, k, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    >>> bool(jnp.allclose(conv_as_matmul(x, k, 2), ref, atol=1e-6))
    True
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(
      f'expected x [N, H, W, C] and kernel [kh, kw, C/groups, O], got '
      f'shapes {x.shape} and {kernel.shape}'
    )
  kh, kw, cin, out = kernel.shape
  groups = feature_group_count
  if groups < 1 or x.shape[-1] != cin * groups or out % groups:
    raise ValueError(
      f'input channels {x.shape[-1]} must equal kernel input channels '
      f'{cin} x feature_group_count {groups}, and output channels {out} '
      'must divide by it'
    )
  sh, sw = (strides, strides) if isinstance(strides, int) else strides
  n, h, w, c = x.shape
  if kh == kw == 1 and groups == 1:
    return jnp.dot(x[:, ::sh, ::sw, :], kernel[0, 0])
  pads = jax.lax.padtype_to_pads((h, w), (kh, kw), (sh, sw), 'SAME')
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  oh, ow = -(-h // sh), -(-w // sw)
  windows = [
    jax.lax.slice(
      xp,
      (0, i, j, 0),
      (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c),
      (1, sh, sw, 1),
    )
    for i in range(kh)
    for j in range(kw)
  ]
  if groups == 1:
    patches = jnp.concatenate(windows, axis=-1)
    return jnp.dot(patches, kernel.reshape(kh * kw * cin, out))
  patches = jnp.stack(windows, axis=3).reshape(n, oh, ow, kh * kw, groups, cin)
  kernel = kernel.reshape(kh * kw, cin, groups, out // groups)
  y = jnp.einsum('nhwkgc,kcgo->nhwgo', patches, kernel)
  return y.reshape(n, oh, ow, out)


class MatmulConv(nn.Module):
  """`nn.Conv` without bias and with 'SAME' padding, as matrix products.

  A drop-in for ``nn.Conv(features, kernel_size, strides, padding='SAME',
  use_bias=False, feature_group_count=...)``: the same parameter
  ('kernel', [kh, kw, in / groups, features], `param_dtype`), initialiser
  and dtype promotion, the same result up to float rounding; computed by
  `conv_as_matmul`, which XLA:CPU runs much faster (grouped convolutions
  stay XLA's, which are faster there).

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: an int or (sh, sw).
    padding: must be 'SAME'.
    feature_group_count: groups.
    use_bias: must be False.
    dtype: computation dtype (None: from the inputs).
    param_dtype: the kernel's dtype.
    kernel_init: the kernel's initialiser.
  """

  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: str = 'SAME'
  feature_group_count: int = 1
  use_bias: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.padding != 'SAME' or self.use_bias:
      raise ValueError(
        "MatmulConv supports only padding='SAME' and use_bias=False, got "
        f'padding={self.padding!r}, use_bias={self.use_bias!r}'
      )
    kh, kw = self.kernel_size
    kernel = self.param(
      'kernel',
      self.kernel_init,
      (kh, kw, x.shape[-1] // self.feature_group_count, self.features),
      self.param_dtype,
    )
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if self.feature_group_count > 1:
      # XLA:CPU's grouped convolutions beat the batched-dot form (~3x for
      # ResNeXt's 3x3, 32 groups) and are never operand-swapped.
      strides = self.strides
      strides = (strides, strides) if isinstance(strides, int) else strides
      return jax.lax.conv_general_dilated(
        x,
        kernel,
        tuple(strides),
        'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=self.feature_group_count,
      )
    return conv_as_matmul(x, kernel, self.strides)


def resolve_conv_impl(conv_impl: str) -> str:
  """'xla' or 'matmul': what `conv_impl` means on the default backend.

  Args:
    conv_impl: 'auto' (matrix products on CPU, XLA's convolutions on
      accelerators), 'xla' or 'matmul'.

  Returns:
    'xla' or 'matmul'.

  Raises:
    ValueError: another value.

  Examples:
    >>> resolve_conv_impl('xla')
    'xla'
  """
  _check_choice('conv_impl', conv_impl, CONV_IMPLS)
  if conv_impl == 'auto':
    return 'matmul' if jax.default_backend() == 'cpu' else 'xla'
  return conv_impl
