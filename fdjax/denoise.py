"""Feature denoising operations on NHWC feature maps.

These are the denoising operations compared by Xie et al., "Feature Denoising
for Improving Adversarial Robustness" (CVPR 2019), Sec. 4 and its ablations:

* ``non_local``: non-local means over all H*W positions, with a Gaussian
  (softmax) or dot-product affinity.
* ``bilateral``: the Gaussian affinity restricted to a local window.
* ``mean``: a box (mean) filter.
* ``median``: a per-channel median filter.
* ``null``: the identity (the denoising block is then only 1x1 conv +
  residual).

Every op is a pure function of an ``[N, H, W, C]`` array that returns an array
of the same shape and dtype. They work under ``jax.jit``, ``jax.vmap`` and
``jax.grad`` for float32, bfloat16 and (with x64 enabled) float64 inputs. With
reduced-precision inputs (bfloat16, float16) the affinities, softmaxes and
sums are computed in float32 and the result is cast back to the input dtype.

The embedded variants take ``theta`` and ``phi``, the 1x1-convolution
embeddings of the feature map (``[N, H, W, D]``, D may differ from C); the
model computes them, these functions only combine them.

Ops are also reachable by name through ``DENOISE_OPS``, ``get`` and ``apply``,
so configs can say ``model.denoise.op = 'non_local'``.
"""

from collections.abc import Callable
from collections.abc import Mapping
import math
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

AFFINITIES = ('gaussian', 'dot_product')

# Dtypes for which `jax.nn.dot_product_attention` is used in the Gaussian
# form. Its XLA path always runs the softmax in float32, which would throw
# away float64 precision, so float64 uses the explicit path below.
_LIBRARY_ATTENTION_DTYPES = (
  np.dtype(jnp.float32),
  np.dtype(jnp.bfloat16),
  np.dtype(jnp.float16),
)


def _as_nhwc(x: jax.typing.ArrayLike, name: str) -> jax.Array:
  """Returns `x` as a floating-point rank-4 array or raises ValueError."""
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(
      f'{name} must be a rank-4 [N, H, W, C] array, got shape {x.shape} '
      f'(rank {x.ndim}).'
    )
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
      f'{name} must have a floating-point dtype (float32, bfloat16, '
      f'float64, ...), got {x.dtype}.'
    )
  if x.shape[1] == 0 or x.shape[2] == 0:
    raise ValueError(f'{name} must have non-empty H and W, got {x.shape}.')
  return x


def _check_size(size: Any) -> int:
  """Returns `size` if it is a positive odd int, else raises ValueError."""
  if (
    isinstance(size, bool)
    or not isinstance(size, (int, np.integer))
    or size < 1
    or size % 2 == 0
  ):
    raise ValueError(
      f'size must be a positive odd int (1, 3, 5, ...), got {size!r}.'
    )
  return int(size)


def _embeddings(
  x: jax.Array,
  theta: jax.typing.ArrayLike | None,
  phi: jax.typing.ArrayLike | None,
) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
  """Validates theta/phi (default: x) and casts all three to one dtype."""
  theta = x if theta is None else _as_nhwc(theta, 'theta')
  phi = x if phi is None else _as_nhwc(phi, 'phi')
  for name, e in (('theta', theta), ('phi', phi)):
    if e.shape[:3] != x.shape[:3]:
      raise ValueError(
        f'{name} must have the same N, H, W as x {tuple(x.shape[:3])}, got '
        f'shape {e.shape}.'
      )
  if theta.shape[-1] != phi.shape[-1]:
    raise ValueError(
      'theta and phi must have the same channel count D (a missing one '
      f'defaults to x), got theta {theta.shape} and phi {phi.shape}.'
    )
  dtype = jnp.result_type(x, theta, phi)
  return theta.astype(dtype), phi.astype(dtype), x.astype(dtype), dtype


def _accumulation_dtype(dtype: Any) -> Any:
  """float32 for reduced-precision dtypes, else the dtype itself."""
  return jnp.promote_types(dtype, jnp.float32)


def _gaussian_attention(
  t: jax.Array,
  p: jax.Array,
  v: jax.Array,
  *,
  use_library: bool | None = None,
) -> jax.Array:
  """softmax_j(t_i . p_j / sqrt(d)) v_j for [N, L, D], [N, L, D], [N, L, C].

  Args:
    t: queries (theta), shape [N, L, D].
    p: keys (phi), shape [N, L, D].
    v: values (the feature map), shape [N, L, C], same dtype as t and p.
    use_library: whether to use `jax.nn.dot_product_attention` (a single
      head). None picks it when D == C (the library needs values as wide as
      keys) and the dtype is not float64 (its softmax is always float32).

  Returns:
    An [N, L, C] array of v's dtype.
  """
  d, c = t.shape[-1], v.shape[-1]
  scale = 1.0 / math.sqrt(d)
  if use_library is None:
    use_library = d == c and np.dtype(v.dtype) in _LIBRARY_ATTENTION_DTYPES
  if use_library:
    if d != c:
      raise ValueError(
        f'jax.nn.dot_product_attention needs D == C, got D={d}, C={c}.'
      )
    # Single head: [N, L, 1, D]. implementation=None lets JAX choose; as of
    # jax 0.10 that is always its XLA path (cuDNN's fused kernel is only used
    # when asked for, and only for head dims up to 128-256 in 16-bit floats),
    # so the feature maps of a ResNet (C >= 256) get the XLA path anyway.
    y = jax.nn.dot_product_attention(
      t[:, :, None, :],
      p[:, :, None, :],
      v[:, :, None, :],
      scale=scale,
      implementation=None,
    )
    return y[:, :, 0, :]
  # Same computation written out; it holds one [L, L] matrix per image.
  acc = _accumulation_dtype(v.dtype)
  logits = jnp.einsum('nid,njd->nij', t, p, preferred_element_type=acc)
  weights = jax.nn.softmax(logits * jnp.asarray(scale, acc), axis=-1)
  y = jnp.einsum(
    'nij,njc->nic', weights.astype(v.dtype), v, preferred_element_type=acc
  )
  return y.astype(v.dtype)


def _cheaper_association(length: int, d: int, c: int) -> str:
  """Which way to evaluate (1 / L) theta phi^T x; static, from shapes.

  Args:
    length: the number of positions L = H * W.
    d: the embedding width D of theta and phi.
    c: the channel count C of x.

  Returns:
    'pairwise' for (theta phi^T) x, about L^2 (D + C) multiply-adds, or
    'channel' for theta (phi^T x), about 2 L D C; the cheaper one ('channel'
    on a tie, as it also needs less memory).
  """
  pairwise = length * length * (d + c)
  channel = 2 * length * d * c
  return 'channel' if channel <= pairwise else 'pairwise'


def _dot_product_affinity(
  t: jax.Array,
  p: jax.Array,
  v: jax.Array,
  *,
  association: str | None = None,
) -> jax.Array:
  """(1 / L) sum_j (t_i . p_j) v_j for [N, L, D], [N, L, D], [N, L, C].

  Args:
    t: theta, shape [N, L, D].
    p: phi, shape [N, L, D].
    v: the feature map, shape [N, L, C], same dtype as t and p.
    association: 'pairwise' for (t p^T) v, 'channel' for t (p^T v), or None
      for the cheaper of the two (see `_cheaper_association`).

  Returns:
    An [N, L, C] array of v's dtype.
  """
  length, d = p.shape[-2:]
  c = v.shape[-1]
  if association is None:
    association = _cheaper_association(length, d, c)
  acc = _accumulation_dtype(v.dtype)
  inv_length = jnp.asarray(1.0 / length, acc)
  # Scale the intermediate in the accumulation dtype: the sum over positions
  # can exceed the float16 range before the 1 / L.
  if association == 'pairwise':
    a = jnp.einsum('nid,njd->nij', t, p, preferred_element_type=acc)
    a = (a * inv_length).astype(v.dtype)
    y = jnp.einsum('nij,njc->nic', a, v, preferred_element_type=acc)
  elif association == 'channel':
    m = jnp.einsum('njd,njc->ndc', p, v, preferred_element_type=acc)
    m = (m * inv_length).astype(v.dtype)
    y = jnp.einsum('nid,ndc->nic', t, m, preferred_element_type=acc)
  else:
    raise ValueError(
      f"association must be 'pairwise', 'channel' or None, got {association!r}."
    )
  return y.astype(v.dtype)


def non_local_means(
  x: jax.typing.ArrayLike,
  *,
  affinity: str = 'gaussian',
  theta: jax.typing.ArrayLike | None = None,
  phi: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Non-local means: a weighted mean of the features at all H*W positions.

  Computes ``y_i = sum_j f(theta_i, phi_j) x_j`` where j runs over all H*W
  positions of the same image, and

  * ``affinity='gaussian'``: ``f = softmax_j(theta_i . phi_j / sqrt(d))``,
    with d the channel count of theta. Evaluated with
    `jax.nn.dot_product_attention` (one head) when D == C and the dtype is not
    float64, otherwise with an equivalent explicit softmax; either way one
    HW x HW affinity matrix per image and a float32 (or float64) softmax.
  * ``affinity='dot_product'``: ``f = theta_i . phi_j / (H*W)``, evaluated as
    (theta phi^T) x or theta (phi^T x), whichever costs fewer multiply-adds
    for the static shapes; the latter never forms an HW x HW matrix.

  Args:
    x: the feature map, [N, H, W, C], floating point.
    affinity: 'gaussian' or 'dot_product'.
    theta: the embedding of the query positions, [N, H, W, D]; defaults to x.
    phi: the embedding of the key positions, [N, H, W, D]; defaults to x.

  Returns:
    The denoised map, same shape and dtype as x.

  Raises:
    ValueError: if x, theta or phi is not a rank-4 floating-point array, if
      their N, H, W or theta/phi's D disagree, or if `affinity` is unknown.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 2, 2, 3))
    >>> print(non_local_means(x)[0, 0, 0])  # softmax weights sum to one
    [1. 1. 1.]
    >>> print(non_local_means(x, affinity='dot_product')[0, 0, 0])  # 4*3/4
    [3. 3. 3.]
    >>> theta = phi = jnp.ones((1, 2, 2, 5))  # embeddings may differ in width
    >>> non_local_means(x, theta=theta, phi=phi).shape
    (1, 2, 2, 3)
  """
  x = _as_nhwc(x, 'x')
  if affinity not in AFFINITIES:
    raise ValueError(
      f"Unknown affinity {affinity!r}; valid: 'gaussian', 'dot_product'."
    )
  theta, phi, v, _ = _embeddings(x, theta, phi)
  n, h, w, c = x.shape
  d = theta.shape[-1]
  t = theta.reshape(n, h * w, d)
  p = phi.reshape(n, h * w, d)
  v = v.reshape(n, h * w, c)
  if affinity == 'gaussian':
    y = _gaussian_attention(t, p, v)
  else:
    y = _dot_product_affinity(t, p, v)
  return y.reshape(n, h, w, c).astype(x.dtype)


def _window_offsets(size: int) -> list[tuple[int, int]]:
  """(dy, dx) of a size x size window, row-major, as slice starts."""
  return [(dy, dx) for dy in range(size) for dx in range(size)]


def _shifted(xp: jax.Array, dy: int, dx: int, h: int, w: int) -> jax.Array:
  """The [N, h, w, C] slice of a padded map starting at (dy, dx)."""
  return xp[:, dy : dy + h, dx : dx + w, :]


def _in_image_mask(h: int, w: int, size: int) -> np.ndarray:
  """[h, w, size*size] bool: which window positions fall inside the image."""
  r = size // 2
  rows = np.arange(h)[:, None, None]
  cols = np.arange(w)[None, :, None]
  offsets = np.asarray(_window_offsets(size)) - r  # [size*size, 2]
  ys = rows + offsets[None, None, :, 0]
  xs = cols + offsets[None, None, :, 1]
  return (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)


def bilateral_filter(
  x: jax.typing.ArrayLike,
  *,
  size: int = 3,
  theta: jax.typing.ArrayLike | None = None,
  phi: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Bilateral filter: the Gaussian non-local affinity in a local window.

  Computes ``y_i = sum_j softmax_j(theta_i . phi_j / sqrt(d)) x_j`` where j
  runs over the in-image positions of the size x size window centred at i
  (positions outside the image are left out of the softmax, not padded into
  it), and d is theta's channel count. Logits and softmax are computed in
  float32 (float64 for float64 inputs); no HW x HW matrix is formed.

  Args:
    x: the feature map, [N, H, W, C], floating point.
    size: the window side, a positive odd int.
    theta: the embedding of the centre positions, [N, H, W, D]; defaults to x.
    phi: the embedding of the window positions, [N, H, W, D]; defaults to x.

  Returns:
    The filtered map, same shape and dtype as x.

  Raises:
    ValueError: for a bad x, theta or phi (see `non_local_means`) or a size
      that is not a positive odd int.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    >>> theta = phi = jnp.zeros((1, 3, 3, 2))  # equal weights: a mean filter
    >>> y = bilateral_filter(x, theta=theta, phi=phi)
    >>> print(y[0, ..., 0].round(4))
    [[2.  2.5 3. ]
     [3.5 4.  4.5]
     [5.  5.5 6. ]]
  """
  x = _as_nhwc(x, 'x')
  size = _check_size(size)
  theta, phi, v, dtype = _embeddings(x, theta, phi)
  _, h, w, _ = x.shape
  d = theta.shape[-1]
  r = size // 2
  acc = _accumulation_dtype(dtype)
  pad = ((0, 0), (r, r), (r, r), (0, 0))
  phi_p = jnp.pad(phi.astype(acc), pad)
  v_p = jnp.pad(v.astype(acc), pad)
  t = theta.astype(acc) * jnp.asarray(1.0 / math.sqrt(d), acc)
  offsets = _window_offsets(size)
  # One [N, H, W] logit map per window position; the shifted copies of phi
  # and x are consumed one at a time, never stacked.
  logits = jnp.stack(
    [jnp.sum(t * _shifted(phi_p, dy, dx, h, w), axis=-1) for dy, dx in offsets],
    axis=-1,
  )
  logits = jnp.where(_in_image_mask(h, w, size), logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1)
  y = sum(
    weights[..., k, None] * _shifted(v_p, dy, dx, h, w)
    for k, (dy, dx) in enumerate(offsets)
  )
  return y.astype(x.dtype)


def mean_filter(x: jax.typing.ArrayLike, *, size: int = 3) -> jax.Array:
  """Mean (box) filter over the in-image part of a size x size window.

  Positions outside the image are not counted: the sum is divided by the
  number of in-image window positions (e.g. 4 at a corner for size 3).
  Sums are computed in float32 for reduced-precision inputs.

  Args:
    x: the feature map, [N, H, W, C], floating point.
    size: the window side, a positive odd int.

  Returns:
    The filtered map, same shape and dtype as x.

  Raises:
    ValueError: if x is not a rank-4 floating-point array or size is not a
      positive odd int.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    >>> print(mean_filter(x)[0, ..., 0])
    [[2.  2.5 3. ]
     [3.5 4.  4.5]
     [5.  5.5 6. ]]
  """
  x = _as_nhwc(x, 'x')
  size = _check_size(size)
  _, h, w, _ = x.shape
  r = size // 2
  acc = _accumulation_dtype(x.dtype)
  xp = jnp.pad(x.astype(acc), ((0, 0), (r, r), (r, r), (0, 0)))
  # Separable box sum: 2 * size shifted adds instead of size**2.
  rows = sum(xp[:, dy : dy + h] for dy in range(size))
  total = sum(rows[:, :, dx : dx + w] for dx in range(size))
  count = _in_image_mask(h, w, size).sum(axis=-1)[None, :, :, None]
  return (total / jnp.asarray(count, acc)).astype(x.dtype)


def median_filter(x: jax.typing.ArrayLike, *, size: int = 3) -> jax.Array:
  """Per-channel median of a size x size window, symmetric borders.

  The map is extended by mirroring with the edge repeated (``a b c | c b a``),
  like ``numpy.pad(mode='symmetric')`` and
  ``scipy.ndimage.median_filter(mode='reflect')``. The window has an odd
  number of elements, so the median is one of them and the gradient flows to
  that element only.

  Args:
    x: the feature map, [N, H, W, C], floating point.
    size: the window side, a positive odd int.

  Returns:
    The filtered map, same shape and dtype as x.

  Raises:
    ValueError: if x is not a rank-4 floating-point array or size is not a
      positive odd int.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    >>> print(median_filter(x)[0, ..., 0])
    [[1. 2. 2.]
     [3. 4. 5.]
     [6. 6. 7.]]
  """
  x = _as_nhwc(x, 'x')
  size = _check_size(size)
  if size == 1:
    return x
  _, h, w, _ = x.shape
  r = size // 2
  xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode='symmetric')
  patches = jnp.stack(
    [_shifted(xp, dy, dx, h, w) for dy, dx in _window_offsets(size)], axis=-1
  )
  return jnp.sort(patches, axis=-1)[..., size * size // 2]


def null(x: jax.typing.ArrayLike, **unused: Any) -> jax.Array:
  """The identity: the "null" denoising op of the paper's ablations.

  Args:
    x: the feature map, [N, H, W, C], floating point.
    **unused: ignored (so it can stand in for any other op).

  Returns:
    x, as a jax.Array.

  Raises:
    ValueError: if x is not a rank-4 floating-point array.

  Examples:
    >>> import jax.numpy as jnp
    >>> print(null(jnp.ones((1, 1, 2, 1)), size=3)[0, 0, :, 0])
    [1. 1.]
  """
  del unused
  return _as_nhwc(x, 'x')


DENOISE_OPS: Mapping[str, Callable[..., jax.Array]] = types.MappingProxyType(
  {
    'bilateral': bilateral_filter,
    'mean': mean_filter,
    'median': median_filter,
    'non_local': non_local_means,
    'null': null,
  }
)

_EMBEDDING_OPS = frozenset({'non_local', 'bilateral'})


def get(name: str) -> Callable[..., jax.Array]:
  """Returns the denoising op registered under `name`.

  Args:
    name: one of 'bilateral', 'mean', 'median', 'non_local', 'null'.

  Returns:
    The op's function, e.g. `non_local_means` for 'non_local'.

  Raises:
    ValueError: if `name` is not a registered op; the message lists them.

  Examples:
    >>> get('mean') is mean_filter
    True
    >>> get('gauss')
    Traceback (most recent call last):
      ...
    ValueError: Unknown denoise op 'gauss'; valid ops: bilateral, mean, median, non_local, null
  """  # noqa: E501
  try:
    return DENOISE_OPS[name]
  except (KeyError, TypeError):
    valid = ', '.join(sorted(DENOISE_OPS))
    raise ValueError(
      f'Unknown denoise op {name!r}; valid ops: {valid}'
    ) from None


def uses_embedding(name: str) -> bool:
  """Whether the op `name` takes theta/phi embeddings.

  Args:
    name: a registered op name.

  Returns:
    True for 'non_local' and 'bilateral', False for the others.

  Raises:
    ValueError: if `name` is not a registered op.

  Examples:
    >>> uses_embedding('non_local'), uses_embedding('median')
    (True, False)
  """
  get(name)
  return name in _EMBEDDING_OPS


def apply(
  name: str,
  x: jax.typing.ArrayLike,
  *,
  affinity: str = 'gaussian',
  size: int = 3,
  theta: jax.typing.ArrayLike | None = None,
  phi: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Applies the op `name` to x, passing only the arguments it takes.

  'non_local' gets affinity/theta/phi, 'bilateral' size/theta/phi, 'mean' and
  'median' size, 'null' nothing. `affinity` and `size` are ignored by ops
  that do not take them; theta/phi given to an op that does not use
  embeddings is an error (it would silently waste the embedding).

  Args:
    name: a registered op name (see `DENOISE_OPS`).
    x: the feature map, [N, H, W, C], floating point.
    affinity: 'gaussian' or 'dot_product' (non_local only).
    size: the window side, a positive odd int (bilateral, mean, median).
    theta: the query embedding, [N, H, W, D] (non_local, bilateral).
    phi: the key embedding, [N, H, W, D] (non_local, bilateral).

  Returns:
    The denoised map, same shape and dtype as x.

  Raises:
    ValueError: for an unknown op, theta/phi given to an op without
      embeddings, or any error of the op itself.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    >>> print(apply('mean', x, affinity='dot_product')[0, 1, 1, 0])
    4.0
  """
  fn = get(name)
  if name == 'non_local':
    return fn(x, affinity=affinity, theta=theta, phi=phi)
  if name == 'bilateral':
    return fn(x, size=size, theta=theta, phi=phi)
  if theta is not None or phi is not None:
    raise ValueError(
      f'Denoise op {name!r} takes no theta/phi embeddings; only '
      f'{", ".join(sorted(_EMBEDDING_OPS))} do.'
    )
  if name in ('mean', 'median'):
    return fn(x, size=size)
  return fn(x)
