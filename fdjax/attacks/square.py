"""Square attack (Andriushchenko et al., 2020): random search on the score.

A score-based black-box attack: it uses only the logits of forward passes,
never a gradient, so it also breaks models whose gradients are masked. From
a start on the boundary of the ball (L-inf: vertical stripes of +-epsilon;
L2: a grid of squares, each holding a signed "pseudo-gaussian" pattern), each
iteration proposes a change confined to one random square window of side
``s`` and keeps it when the margin loss decreases or the example becomes
misclassified. The side shrinks along AutoAttack's schedule of ``p``, the
fraction of pixels a window covers (:func:`p_selection`,
:func:`square_side`).

* L-inf: the window is set to ``x_best +- 2 epsilon`` (one random sign per
  channel) and the result is clipped to the ball and the bounds.
* L2: the perturbation's mass in the window and in a second random window
  is moved into the first one, as a new signed pattern plus the window's old
  direction, keeping the image's norm at epsilon.

The algorithm is that of the authors' code in AutoAttack (called the
reference below), as AutoAttack's standard version runs it:
``num_queries=5000``, ``p_init=0.8``, one run, the margin loss
``z_y - max_{j != y} z_j`` descended (untargeted) or the cross-entropy of
the targets (targeted). Only the examples the model
classifies correctly are attacked; an example stops querying the model once
it is misclassified (its margin <= 0), and the loop stops when every example
is done or the queries are spent. Each iteration runs one forward pass for
the whole batch, frozen examples included (their results are discarded, and
their query counts no longer grow).

Randomness is per example: window positions, signs and patterns come from
``fold_in(key, example_id)`` and the iteration, so an example's attack does
not depend on the rest of its batch (the reference draws one window and,
for L-inf, one set of signs for the whole batch). Window positions are drawn
as the reference does, uniform in ``{0, ..., side_length - s - 1}`` (``0``
when ``s`` equals the side), so the last row and column of positions are
never drawn.

Images are NHWC: a window is ``[h:h + s, w:w + s]`` over all channels.
"""

import math
from typing import Any

import jax
from jax.extend.random import threefry2x32_p
import jax.numpy as jnp
import numpy as np
import optax

from fdjax.attacks import ball
from fdjax.attacks.ball import LogitsFn

SQUARE_LOSSES = ('margin', 'ce')

# p halves each time the rescaled iteration passes one of these.
_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_NUM_LEVELS = len(_THRESHOLDS) + 1
# The schedule is written for 10,000 queries and rescaled to num_queries.
_SCHEDULE_QUERIES = 10000
# Integer schedule arithmetic stays inside int32 up to here.
MAX_QUERIES = 200_000


def _level(
  iteration: jax.typing.ArrayLike, num_queries: Any, rescale: bool = True
) -> jax.Array:
  """Number of halvings of p at an iteration (0 .. 9), traceable."""
  nq = jnp.asarray(num_queries, jnp.int32)
  it = jnp.clip(jnp.asarray(iteration, jnp.int32), 0, nq)
  if not rescale:  # The thresholds apply to the iteration itself.
    level = jnp.zeros(it.shape, jnp.int32)
    for t in _THRESHOLDS:
      level += (it > t).astype(jnp.int32)
    return level
  # The rescaled iteration floor(it * 10000 / nq) exceeds t exactly when
  # it * 10000 >= (t + 1) * nq; integers avoid any rounding at the edges.
  level = jnp.zeros(it.shape, jnp.int32)
  for t in _THRESHOLDS:
    level += (it * _SCHEDULE_QUERIES >= (t + 1) * nq).astype(jnp.int32)
  return level


def p_selection(
  p_init: jax.typing.ArrayLike,
  iteration: jax.typing.ArrayLike,
  num_queries: jax.typing.ArrayLike,
  rescale_schedule: bool = True,
) -> jax.Array:
  """The fraction of pixels a window covers at an iteration.

  AutoAttack's schedule: ``p_init`` halves when the iteration, rescaled to
  10,000 queries as ``floor(iteration * 10000 / num_queries)``, passes 10,
  50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (strictly greater), down to
  ``p_init / 512``.

  Args:
    p_init: the initial fraction (0.8 in AutoAttack); may be traced.
    iteration: the iteration, 0-based, an integer of any shape; may be
      traced.
    num_queries: the attack's query budget (may be traced), at most
      ``MAX_QUERIES``.
    rescale_schedule: rescale the iteration to 10,000 queries first (the
      reference's default); AutoAttack's standard version runs Square with
      False: the thresholds then apply to the iteration itself.

  Returns:
    float32 ``p`` with the shape of ``iteration``.

  Examples:
    >>> p = p_selection(0.8, jnp.array([0, 5, 6, 26, 4999]), 5000)
    >>> (p / 0.8).tolist()
    [1.0, 1.0, 0.5, 0.25, 0.001953125]
  """
  level = _level(iteration, num_queries, rescale_schedule)
  return jnp.ldexp(jnp.asarray(p_init, jnp.float32), -level)


def _side_table(
  p_init: float, height: int, width: int, channels: int, norm: str
) -> np.ndarray:
  """The window side for each level of the schedule, in Python floats."""
  num_features = channels * height * width
  sides = []
  for level in range(_NUM_LEVELS):
    p = p_init / 2**level
    s = int(round(math.sqrt(p * num_features / channels)))
    if norm == 'linf':
      s = max(s, 1)
    else:
      s = max(s, 3)
      s += 1 - s % 2  # Odd, so that the pattern has a centre row.
    sides.append(min(s, height, width))
  return np.asarray(sides, np.int32)


def square_side(
  p_init: float,
  iteration: jax.typing.ArrayLike,
  num_queries: jax.typing.ArrayLike,
  height: int,
  width: int,
  channels: int = 1,
  norm: str = 'linf',
  rescale_schedule: bool = True,
) -> jax.Array:
  """The side ``s`` of the square window at an iteration.

  ``round(sqrt(p * height * width))`` (half to even, as Python rounds) with
  ``p = p_selection(p_init, iteration, num_queries)``; at least 1 (L-inf) or
  at least 3 and odd (L2), and at most ``min(height, width)``. Each level of
  the schedule's side is computed in double precision, as the reference
  does, so no rounding edge can differ.

  Args:
    p_init: the initial fraction, a Python float (static).
    iteration: 0-based iteration, an integer of any shape; may be traced.
    num_queries: the query budget (may be traced).
    height: image height (static).
    width: image width (static).
    channels: number of channels (static).
    norm: ``'linf'`` or ``'l2'``.

  Returns:
    int32 sides with the shape of ``iteration``.

  Raises:
    ValueError: for an unknown norm.

  Examples:
    >>> square_side(0.8, jnp.array([0, 11, 50, 4999]), 5000, 8, 8).tolist()
    [7, 5, 4, 1]
  """
  ball.check_norm(norm)
  table = _side_table(float(p_init), height, width, channels, norm)
  return jnp.asarray(table)[_level(iteration, num_queries, rescale_schedule)]


def _window(h: int, w: int, s: jax.Array, vh: jax.Array, vw: jax.Array):
  """[batch, h, w] masks of the windows [vh:vh + s, vw:vw + s]."""
  rows = jnp.arange(h)[None, :, None] - vh[:, None, None]
  cols = jnp.arange(w)[None, None, :] - vw[:, None, None]
  return (rows >= 0) & (rows < s) & (cols >= 0) & (cols < s)


def _eta(s: jax.typing.ArrayLike, m: int) -> jax.Array:
  """The L2 attack's [s, s] pattern, in the top-left corner of [m, m].

  The top ``s // 2`` rows and the bottom ``s - s // 2`` rows each hold a
  rectangle pattern of unit norm (the bottom one negated), and the whole
  has unit norm. A rectangle of r rows and s columns gives the cell at
  Chebyshev distance d from its centre ``(r // 2, s // 2)`` the value
  ``sum_{k=d}^{s // 2} 1 / (k + 1)**2``: the sum of nested squares of
  weights 1, 1/4, 1/9, ... around the centre, cut to the rectangle.
  """
  s = jnp.asarray(s, jnp.int32)
  # tail[K, d] = sum_{k=d}^{K-1} 1 / (k + 1)**2, in double precision.
  n = m // 2 + 2
  cum = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n) ** 2)])
  tail = jnp.asarray(
    np.maximum(cum[:, None] - cum[None, :], 0.0).astype(np.float32)
  )
  a = jnp.arange(m)[:, None]
  b = jnp.arange(m)[None, :]
  top_rows = s // 2
  top = a < top_rows
  rows = jnp.where(top, top_rows, s - top_rows)
  i = jnp.where(top, a, a - top_rows)
  d = jnp.maximum(jnp.abs(i - rows // 2), jnp.abs(b - s // 2))
  valid = (a < s) & (b < s)
  big = s // 2 + 1
  r = jnp.where(valid, tail[big, jnp.clip(d, 0, n - 1)], 0.0)
  n_top = jnp.sqrt(jnp.sum(jnp.where(top, r * r, 0.0)))
  n_bottom = jnp.sqrt(jnp.sum(jnp.where(top, 0.0, r * r)))
  e = jnp.where(
    top, r / jnp.where(n_top > 0, n_top, 1.0), -r / jnp.maximum(n_bottom, 1e-30)
  )
  return e / jnp.sqrt(jnp.sum(e * e))


def _l2_init_layout(h: int, w: int):
  """Static layout of the L2 start: side, grid shape and pixel maps.

  Squares of side ``h // 5`` tile the image from ``((h - 5 s) // 2, same)``
  in steps of s, ``h // s`` rows by ``w // s`` columns of them (those past
  the edge are cut or empty, as in the reference).
  """
  s = h // 5
  if s < 1:
    raise ValueError(f'the L2 square attack needs height >= 5, got {h}.')
  start = (h - 5 * s) // 2
  grid = (h // s, w // s)

  def axis(size, count):
    t = np.arange(size) - start
    covered = (t >= 0) & (t < count * s)
    return covered, np.clip(t // s, 0, count - 1), np.mod(t, s)

  cov_h, qi, ai = axis(h, grid[0])
  cov_w, qj, bj = axis(w, grid[1])
  covered = cov_h[:, None] & cov_w[None, :]
  return s, grid, covered, qi, qj, ai, bj


def _linf_init(x0, epsilon, signs, lo, hi):
  """Vertical stripes: x0 + epsilon * signs[batch, width, channels]."""
  return jnp.clip(x0 + epsilon * signs[:, None, :, :], lo, hi)


def _normalize_l2(delta, epsilon):
  n = ball.l2_norm(delta)
  return delta / ball.per_example(n + 1e-12, delta) * epsilon


def _l2_init(x0, epsilon, transpose, signs, lo, hi):
  """Signed patterns in a grid of squares, scaled to norm epsilon.

  Args:
    x0: [batch, h, w, c] clean images.
    epsilon: the radius.
    transpose: [batch, rows, cols] bool, per square: transpose its pattern.
    signs: [batch, rows, cols, c] +-1, per square and channel.
    lo: lower bound.
    hi: upper bound.
  """
  _, h, w, _ = x0.shape
  s, _, covered, qi, qj, ai, bj = _l2_init_layout(h, w)
  e = _eta(s, s)
  plain = e[ai[:, None], bj[None, :]]
  swapped = e[bj[None, :], ai[:, None]]
  t = transpose[:, qi[:, None], qj[None, :]]
  pattern = jnp.where(t, swapped, plain)
  sign = signs[:, qi[:, None], qj[None, :], :]
  delta = jnp.where(covered[None, :, :, None], pattern[..., None] * sign, 0.0)
  return jnp.clip(x0 + _normalize_l2(delta.astype(x0.dtype), epsilon), lo, hi)


def _linf_candidate(x0, x_best, epsilon, s, vh, vw, signs, lo, hi):
  """x_best with window [vh:vh+s, vw:vw+s] moved by 2 eps signs[:, c]."""
  _, h, w, _ = x0.shape
  m = _window(h, w, s, vh, vw)[..., None]
  x = x_best + jnp.where(m, 2.0 * epsilon * signs[:, None, None, :], 0.0)
  x = jnp.clip(x, x0 - epsilon, x0 + epsilon)
  return jnp.clip(x, lo, hi)


def _l2_candidate(
  x0, x_best, epsilon, s, vh, vw, vh2, vw2, transpose, signs, lo, hi
):
  """Moves the mass of windows 1 and 2 into window 1 as a new pattern.

  Per channel, window 1 becomes ``signs * eta + old_1 / ||old_1||``,
  rescaled to the norm of windows 1 and 2 together plus the ball's unused
  budget ``(eps**2 - ||delta||**2) / c``; window 2 (minus window 1) is
  zeroed; the whole perturbation is then rescaled to norm epsilon and
  clipped to the bounds.
  """
  _, h, w, c = x0.shape
  delta = x_best - x0
  m1 = _window(h, w, s, vh, vw)
  m2 = _window(h, w, s, vh2, vw2)
  sq = delta * delta
  norm_1 = jnp.sqrt(jnp.sum(jnp.where(m1[..., None], sq, 0.0), axis=(1, 2)))
  norm_12 = jnp.sqrt(
    jnp.sum(jnp.where((m1 | m2)[..., None], sq, 0.0), axis=(1, 2))
  )
  norm_image = ball.l2_norm(delta)

  e = _eta(s, min(h, w))
  m = e.shape[0]
  a = jnp.clip(jnp.arange(h)[None, :, None] - vh[:, None, None], 0, m - 1)
  b = jnp.clip(jnp.arange(w)[None, None, :] - vw[:, None, None], 0, m - 1)
  pattern = jnp.where(transpose[:, None, None], e[b, a], e[a, b])
  new = pattern[..., None] * signs[:, None, None, :] + delta / (
    1e-12 + norm_1[:, None, None, :]
  )
  new = jnp.where(m1[..., None], new, 0.0)
  norm_new = jnp.sqrt(jnp.sum(new * new, axis=(1, 2)))
  budget = jnp.maximum(epsilon**2 - norm_image**2, 0.0)[:, None] / c
  scale = jnp.sqrt(budget + norm_12**2) / (1e-12 + norm_new)
  new = new * scale[:, None, None, :]
  delta = jnp.where(
    m1[..., None], new, jnp.where(m2[..., None], 0.0, delta)
  ).astype(x0.dtype)
  return jnp.clip(x0 + _normalize_l2(delta, epsilon), lo, hi)


def _scores(logits, labels, targets, loss):
  """(margin, loss) of the reference: margin <= 0 means success."""
  logits = logits.astype(jnp.float32)
  if targets is not None:
    is_t = jax.nn.one_hot(targets, logits.shape[-1], dtype=bool)
    z_t = jnp.sum(jnp.where(is_t, logits, 0.0), axis=-1)
    margin = jnp.max(jnp.where(is_t, -jnp.inf, logits), axis=-1) - z_t
    return margin, optax.softmax_cross_entropy_with_integer_labels(
      logits, targets
    )
  is_y = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  z_y = jnp.sum(jnp.where(is_y, logits, 0.0), axis=-1)
  margin = z_y - jnp.max(jnp.where(is_y, -jnp.inf, logits), axis=-1)
  if loss == 'margin':
    return margin, margin
  return margin, -optax.softmax_cross_entropy_with_integer_labels(
    logits, labels
  )


def _accept(state, x_new, margin, loss, todo):
  """The reference's update of (x_best, margin_min, loss_min, queries)."""
  x_best, margin_min, loss_min, queries = state
  improved = loss < loss_min
  loss_min = jnp.where(todo & improved, loss, loss_min)
  accept = todo & (improved | (margin <= 0.0))
  margin_min = jnp.where(accept, margin, margin_min)
  x_best = jnp.where(ball.per_example(accept, x_best), x_new, x_best)
  return x_best, margin_min, loss_min, queries + todo.astype(queries.dtype)


def _keypairs(keys: jax.Array) -> jax.Array:
  """[batch, 2] uint32 Threefry keys from per-example PRNG keys.

  The data of a (default) Threefry key is such a pair already, as for a
  raw uint32[2] key; other implementations draw one.
  """
  if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    data = jax.random.key_data(keys)
  else:
    data = keys
  if data.shape[1:] == (2,) and data.dtype == jnp.uint32:
    return data
  return jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))(keys)


def _words(keypairs: jax.Array, counter: jax.Array, n: int) -> jax.Array:
  """[batch, n] random uint32: Threefry-2x32 of (counter, 0 .. n/2 - 1).

  One hash for all the words an iteration needs, per example: much cheaper
  than ``fold_in`` plus several ``jax.random`` calls in a loop body.
  """
  batch = keypairs.shape[0]
  half = (n + 1) // 2
  shape = (batch, half)
  k1 = jnp.broadcast_to(keypairs[:, :1], shape)
  k2 = jnp.broadcast_to(keypairs[:, 1:], shape)
  x0 = jnp.broadcast_to(jnp.asarray(counter, jnp.uint32), shape)
  x1 = jnp.broadcast_to(jnp.arange(half, dtype=jnp.uint32), shape)
  y0, y1 = threefry2x32_p.bind(k1, k2, x0, x1)
  return jnp.concatenate([y0, y1], axis=1)[:, :n]


def _sign(words: jax.Array) -> jax.Array:
  """+-1 float32 from the top bit."""
  return jnp.where(words >> 31 == 1, 1.0, -1.0).astype(jnp.float32)


def _coin(words: jax.Array) -> jax.Array:
  return words >> 31 == 1


def _index(words: jax.Array, high: jax.Array) -> jax.Array:
  """The reference's int(U * high), U uniform in [0, 1): in [0, high - 1].

  ``high`` <= 0 gives 0, like the reference's draw for a window that fills
  the image.
  """
  u = (words >> 8).astype(jnp.float32) * 2.0**-24
  high = jnp.maximum(high, 1)
  return jnp.minimum(jnp.floor(u * high).astype(jnp.int32), high - 1)


def _draw_init(keypairs, norm, shape):
  h, w, c = shape
  batch = keypairs.shape[0]
  if norm == 'linf':
    words = _words(keypairs, 0, w * c)
    return (_sign(words).reshape(batch, w, c),)
  _, grid, *_ = _l2_init_layout(h, w)
  n = grid[0] * grid[1]
  words = _words(keypairs, 0, n * (1 + c))
  return (
    _coin(words[:, :n]).reshape(batch, *grid),
    _sign(words[:, n:]).reshape(batch, *grid, c),
  )


def _draw_step(keypairs, i, norm, shape, s):
  h, w, c = shape
  if norm == 'linf':
    words = _words(keypairs, i, 2 + c)
    return (
      _index(words[:, 0], h - s),
      _index(words[:, 1], w - s),
      _sign(words[:, 2:]),
    )
  words = _words(keypairs, i, 5 + c)
  return (
    _index(words[:, 0], h - s),
    _index(words[:, 1], w - s),
    _index(words[:, 2], h - s),
    _index(words[:, 3], w - s),
    _coin(words[:, 4]),
    _sign(words[:, 5:]),
  )


def square(
  logits_fn: LogitsFn,
  key: jax.Array,
  images: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  epsilon: jax.typing.ArrayLike,
  norm: str = 'linf',
  num_queries: jax.typing.ArrayLike = 5000,
  p_init: float = 0.8,
  loss: str = 'margin',
  targets: jax.typing.ArrayLike | None = None,
  bounds: tuple[Any, Any] = (0.0, 1.0),
  example_ids: jax.typing.ArrayLike | None = None,
  return_queries: bool = False,
  rescale_schedule: bool = True,
) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, jax.Array]:
  """Square attack (Andriushchenko et al., 2020) under L-inf or L2.

  AutoAttack's version (one run): the examples classified correctly are
  attacked with at most ``num_queries`` iterations of one forward pass
  each, after one query at the start; see the module docstring.

  Args:
    logits_fn: maps a [batch, h, w, c] image batch to [batch, num_classes]
      logits. Only called forward: no gradient is taken.
    key: a PRNG key (typed or raw).
    images: [batch, height, width, channels] clean images, a float dtype,
      inside ``bounds``.
    labels: [batch] integer true labels (used unless ``targets`` is given).
    epsilon: radius of the ball (may be traced).
    norm: ``'linf'`` or ``'l2'`` (L2 needs a height of at least 5).
    num_queries: iterations at most (may be traced), at most
      ``MAX_QUERIES``.
    p_init: initial fraction of pixels in a window (static Python float).
    loss: untargeted loss: ``'margin'`` (``z_y - max_{j != y} z_j``) or
      ``'ce'`` (minus the cross-entropy of ``labels``). The targeted attack
      always descends the cross-entropy of the targets, as the reference.
    targets: [batch] integer targets for a targeted attack (then
      ``labels`` are not used, as in the reference: the examples already
      classified as their target are not attacked and count as successes).
    bounds: (lo, hi) valid pixel range; scalars or arrays broadcasting
      against the images.
    example_ids: [batch] integer GLOBAL ids of the examples; example i draws
      its randomness from ``fold_in(key, example_ids[i])``. Defaults to
      ``arange(batch)``.
    rescale_schedule: rescale the square-size schedule to `num_queries`
      (see :func:`square_side`); AutoAttack's standard version uses False.
    return_queries: also return the number of queries each example used
      (static Python bool).

  Returns:
    ``(adv_images, is_adv)``, or ``(adv_images, is_adv, queries)`` with
    ``return_queries``: ``adv_images`` of the shape and dtype of ``images``,
    the attack's point where it succeeded and the clean image elsewhere;
    ``is_adv`` [batch] bool, whether ``argmax logits_fn(adv_images)``
    differs from the label (untargeted) or equals the target (targeted),
    True for the examples not attacked because they already were;
    ``queries`` [batch] int32, 0 for those. All through ``stop_gradient``.

  Raises:
    ValueError: for an unknown norm or loss, bounds without lo < hi, images
      not [batch, h, w, c] floats, labels, targets or ids not of shape
      [batch], an L2 attack on images of height < 5, or ``num_queries``
      above ``MAX_QUERIES``.

  Examples:
    >>> logits_fn = lambda x: jnp.concatenate(
    ...     [x[:, 0, 0], 1.0 - x[:, 0, 0]], axis=-1)
    >>> x = jnp.array([[[[0.45], [0.5]]]])  # [1, 1, 2, 1], class 1
    >>> adv, is_adv = square(logits_fn, jax.random.key(0), x,
    ...                      jnp.array([1]), epsilon=0.1, num_queries=20)
    >>> round(float(adv[0, 0, 0, 0]), 4), is_adv.tolist()
    (0.55, [True])
  """
  ball.check_norm(norm)
  if loss not in SQUARE_LOSSES:
    raise ValueError(f'unknown square loss {loss!r}; valid: {SQUARE_LOSSES}.')
  lo, hi = ball.check_bounds(bounds)
  images, labels, example_ids = ball.check_batch(images, labels, example_ids)
  if images.ndim != 4:
    raise ValueError(
      'images must be [batch, height, width, channels], got shape '
      f'{images.shape}.'
    )
  batch, h, w, c = images.shape
  if targets is not None:
    targets = jnp.asarray(targets)
    if targets.shape != (batch,):
      raise ValueError(
        f'targets must have shape ({batch},), got {targets.shape}.'
      )
  if isinstance(num_queries, (int, np.integer)) and not (
    0 <= num_queries <= MAX_QUERIES
  ):
    raise ValueError(
      f'num_queries must be in [0, {MAX_QUERIES}], got {num_queries}.'
    )
  if norm == 'l2':
    _l2_init_layout(h, w)  # Raises for images too small.
  p_init = float(p_init)
  shape = (h, w, c)

  dtype = jnp.promote_types(images.dtype, jnp.float32)
  x0 = images.astype(dtype)
  epsilon = jnp.asarray(epsilon, dtype)
  lo = jnp.asarray(lo, dtype)
  hi = jnp.asarray(hi, dtype)
  num_queries = jnp.asarray(num_queries, jnp.int32)

  def forward(x):
    return ball.check_logits(logits_fn(x), batch)

  def succeeded(logits):
    pred = jnp.argmax(logits, axis=-1)
    return pred == targets if targets is not None else pred != labels

  # The start uses counter 0, iteration i counter i + 1.
  keypairs = _keypairs(ball.example_keys(key, example_ids))

  active = ~succeeded(forward(x0))
  draws = _draw_init(keypairs, norm, shape)
  if norm == 'linf':
    x_best = _linf_init(x0, epsilon, *draws, lo, hi)
  else:
    x_best = _l2_init(x0, epsilon, *draws, lo, hi)
  margin, loss_value = _scores(forward(x_best), labels, targets, loss)
  state = (x_best, margin, loss_value, active.astype(jnp.int32))

  def cond(carry):
    i, (_, margin_min, _, _) = carry
    return (i < num_queries) & jnp.any(active & (margin_min > 0.0))

  def body(carry):
    i, state = carry
    x_best, margin_min, _, _ = state
    todo = active & (margin_min > 0.0)
    s = square_side(p_init, i, num_queries, h, w, c, norm, rescale_schedule)
    draws = _draw_step(keypairs, i + 1, norm, shape, s)
    if norm == 'linf':
      x_new = _linf_candidate(x0, x_best, epsilon, s, *draws, lo, hi)
    else:
      x_new = _l2_candidate(x0, x_best, epsilon, s, *draws, lo, hi)
    margin, loss_value = _scores(forward(x_new), labels, targets, loss)
    return i + 1, _accept(state, x_new, margin, loss_value, todo)

  _, (x_best, _, _, queries) = jax.lax.while_loop(
    cond, body, (jnp.int32(0), state)
  )
  success = active & succeeded(forward(x_best))
  adv = jnp.where(ball.per_example(success, x0), x_best, x0)
  is_adv = success | ~active
  out = (adv.astype(images.dtype), is_adv)
  if return_queries:
    out += (queries,)
  return jax.lax.stop_gradient(out)
