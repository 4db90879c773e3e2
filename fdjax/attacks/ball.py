"""The threat model's geometry, shared by every attack of `fdjax.attacks`.

Norm balls (L-inf, L2) around the clean images intersected with the pixel
bounds: projections, steepest-ascent directions, uniform random starts, and
the per-example keys (``fold_in(key, global_id)``) that make an attack's
randomness independent of how a batch is split over devices or hosts. Also
the input checks every attack runs before tracing anything.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NORMS = ('linf', 'l2')

LogitsFn = Callable[[jax.Array], jax.Array]


def check_norm(norm: str) -> None:
  if norm not in NORMS:
    raise ValueError(f'unknown attack norm {norm!r}; valid: {NORMS}.')


def check_batch(
  images: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  example_ids: jax.typing.ArrayLike | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Checks an attack's batch; returns (images, labels, example_ids) arrays.

  Raises:
    ValueError: images of rank < 2 or not floating point, labels or example
      ids not of shape [batch].
  """
  images = jnp.asarray(images)
  if images.ndim < 2:
    raise ValueError(
      f'images must be [batch, ...] with rank >= 2, got shape {images.shape}.'
    )
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
      f'images must be floating point, got {images.dtype}; convert e.g. '
      'uint8 pixels with images.astype(jnp.float32).'
    )
  batch = images.shape[0]
  labels = jnp.asarray(labels)
  if labels.shape != (batch,):
    raise ValueError(f'labels must have shape ({batch},), got {labels.shape}.')
  if example_ids is None:
    example_ids = jnp.arange(batch)
  example_ids = jnp.asarray(example_ids)
  if example_ids.shape != (batch,):
    raise ValueError(
      f'example_ids must have shape ({batch},), got {example_ids.shape}.'
    )
  return images, labels, example_ids


def check_logits(logits: jax.Array, batch: int) -> jax.Array:
  """Raises unless `logits` are [batch, num_classes]."""
  if logits.ndim != 2 or logits.shape[0] != batch:
    raise ValueError(
      f'logits_fn must return [{batch}, num_classes] logits, got shape '
      f'{logits.shape}.'
    )
  return logits


def reduce_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim))


def per_example(v: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a [batch] array to broadcast against x [batch, ...]."""
  return v.reshape(v.shape + (1,) * (x.ndim - 1))


def l2_norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=reduce_axes(x)))


def example_keys(key: jax.Array, example_ids: jax.Array) -> jax.Array:
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids)


def random_start_delta(
  key: jax.Array,
  x0: jax.Array,
  epsilon: jax.Array,
  norm: str,
  example_ids: jax.Array,
) -> jax.Array:
  """Uniform noise in the epsilon ball, one fold_in(key, id) per example."""
  keys = example_keys(key, example_ids)
  shape = x0.shape[1:]
  if norm == 'linf':
    u = jax.vmap(lambda k: jax.random.uniform(k, shape, x0.dtype, -1.0, 1.0))(
      keys
    )
    return epsilon * u

  # Uniform in the n-ball: the first n coordinates of a uniform point on
  # the sphere in n + 2 dimensions (Voelker, Gosmann & Stewart, 2017); one
  # normal draw per example, no separate radius.
  size = int(np.prod(shape))

  def ball(k):
    g = jax.random.normal(k, (size + 2,), x0.dtype)
    return (g[:size] / jnp.sqrt(jnp.sum(jnp.square(g)))).reshape(shape)

  return epsilon * jax.vmap(ball)(keys)


def project(
  x: jax.Array,
  x0: jax.Array,
  epsilon: jax.Array,
  norm: str,
  lo: jax.Array,
  hi: jax.Array,
) -> jax.Array:
  """Projects onto the epsilon ball around x0, then clips to [lo, hi]."""
  if norm == 'linf':
    x = jnp.clip(x, x0 - epsilon, x0 + epsilon)
  else:
    delta = x - x0
    n = l2_norm(delta)
    scale = jnp.where(
      n > epsilon, epsilon / jnp.where(n > 0, n, 1.0), jnp.ones_like(n)
    )
    x = x0 + delta * per_example(scale, x)
  return jnp.clip(x, lo, hi)


def ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
  """Steepest ascent direction of unit norm: sign (L-inf) or g/||g|| (L2)."""
  if norm == 'linf':
    return jnp.sign(grad)
  n = l2_norm(grad)
  inv = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)
  return grad * per_example(inv, grad)


def is_static_bool(x: Any) -> bool:
  return isinstance(x, (bool, np.bool_))


def check_bounds(bounds: Any) -> tuple[Any, Any]:
  try:
    lo, hi = bounds
  except (TypeError, ValueError):
    raise ValueError(
      f'bounds must be a pair (lo, hi), got {bounds!r}.'
    ) from None
  try:
    ok = bool(np.all(np.asarray(lo) < np.asarray(hi)))
  except (TypeError, jax.errors.ConcretizationTypeError):
    ok = True  # Traced bounds: cannot be checked here.
  if not ok:
    raise ValueError(f'bounds must satisfy lo < hi, got {bounds!r}.')
  return lo, hi
