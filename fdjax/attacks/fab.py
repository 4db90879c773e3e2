"""FAB, the fast adaptive boundary attack (Croce & Hein, ICML 2020).

FAB looks for the adversarial example of smallest L-inf or L2 norm. Each
iteration linearises the decision boundary between the true class and one
other class (the target, or the closest class in the untargeted form) at
the current point, projects both the current point and the clean image onto
that hyperplane intersected with the pixel box, and moves to a biased
combination of the two projections, overshooting by ``eta``:

  x <- clip((x + eta d_x) (1 - alpha) + (x0 + eta d_0) alpha),
  alpha = min(|d_x| / (|d_x| + |d_0|), alpha_max).

When the new point is misclassified it is kept if it is the smallest
adversarial point so far, and the iterate is pulled back towards the clean
image, ``x <- x0 + beta (x - x0)``. An example counts as broken only if the
smallest adversarial point found lies within ``epsilon``, as AutoAttack
checks it.

:func:`fab_targeted` is FAB-T as AutoAttack's standard version runs it: one
run per target class (times the restarts), the classes of the 2nd to
(n+1)-th largest clean logits; a run changes only the examples that are
still robust (the reference runs it on those alone; here every example is
computed and the others are left as they are, which gives the same
results). The first restart starts from the clean image, any further one
from a random point at distance epsilon / 2. :func:`fab` is the untargeted
form. The hyperplane-box projections, :func:`projection_linf` and
:func:`projection_l2`, are public pure functions.

All loops are ``jax.lax`` loops; every example is attacked independently of
the others (no cross-example coupling), and the randomness of example i is
``fold_in(key, example_ids[i])`` folded again with the run's index, so
results do not depend on how a batch is split over devices.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdjax.attacks import ball
from fdjax.attacks.ball import LogitsFn

# Largest finite |r| of the L2 projection: coordinates with (near) zero
# weight get it, and it marks them after sorting.
_BIG = 1e12
# The logit difference of the true class with itself in the untargeted
# form: that class is never the closest boundary.
_SELF = 1e10


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x, idx, axis=1)


# On CPU, rows of up to this many columns are argsorted by a sorting
# network: XLA's CPU sort calls a comparator per comparison and is about
# twice as slow on the projections' [2 batch, dim] arrays.
_NETWORK_MAX = 4096


def _argsort(keys: jax.Array) -> jax.Array:
  """Stable ascending argsort of each row of a [rows, n] array.

  On CPU a bitonic network, one ``fori_loop`` step per layer, on (key,
  index) pairs compared lexicographically: a total order, so the result is
  exactly that of the stable argsort used elsewhere.
  """
  rows, n0 = keys.shape
  n = 1 << max(math.ceil(math.log2(max(n0, 1))), 0)
  if jax.default_backend() != 'cpu' or n > _NETWORK_MAX or n0 < 2:
    return jnp.argsort(keys, axis=1, stable=True)
  idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (rows, n))
  if n > n0:
    pad = jnp.full((rows, n - n0), jnp.inf, keys.dtype)
    keys = jnp.concatenate([keys, pad], axis=1)
  # Layer l compares position i with i ^ step and puts the smaller first
  # where the bit `size` of i is 0 (ascending blocks), last elsewhere.
  layers = [
    (1 << m, 1 << s)
    for m in range(1, n.bit_length())
    for s in range(m - 1, -1, -1)
  ]
  layers = jnp.asarray(np.array(layers, np.int32))
  pos = jnp.arange(n, dtype=jnp.int32)

  def partner(x, step, low):
    return jnp.where(low, jnp.roll(x, -step, axis=1), jnp.roll(x, step, axis=1))

  def layer(i, state):
    keys, idx = state
    size, step = layers[i, 0], layers[i, 1]
    low = (pos & step) == 0  # The partner is at i + step.
    keep_min = low == ((pos & size) == 0)
    other_keys, other_idx = partner(keys, step, low), partner(idx, step, low)
    less = (keys < other_keys) | ((keys == other_keys) & (idx < other_idx))
    keep = less == keep_min
    return (
      jnp.where(keep, keys, other_keys),
      jnp.where(keep, idx, other_idx),
    )

  _, idx = jax.lax.fori_loop(0, len(layers), layer, (keys, idx))
  return idx[:, :n0]


def _bisect(pred: Any, num_rows: int, dim: int) -> jax.Array:
  """Largest index whose `pred` holds, by a fixed number of bisections.

  ``pred(k)`` maps [rows] int indices to [rows] bools; it must hold at 0
  and fail at dim - 1 for the result to be meaningful (other rows get a
  value that is not used).
  """
  num_steps = max(math.ceil(math.log2(dim)), 0)

  def body(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    ok = pred(mid)
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo = jnp.zeros((num_rows,), jnp.int32)
  hi = jnp.full((num_rows,), dim - 1, jnp.int32)
  lo, _ = jax.lax.fori_loop(0, num_steps, body, (lo, hi))
  return lo


def _box(bounds: Any, shape: tuple[int, ...], dtype: Any):
  lo, hi = ball.check_bounds(bounds)
  lo = jnp.broadcast_to(jnp.asarray(lo, dtype), shape)
  hi = jnp.broadcast_to(jnp.asarray(hi, dtype), shape)
  return lo, hi


def _check_rows(points, w, b):
  points = jnp.asarray(points)
  dtype = jnp.promote_types(points.dtype, jnp.float32)
  t = points.astype(dtype)
  w = jnp.asarray(w, dtype)
  b = jnp.asarray(b, dtype)
  if t.ndim != 2 or w.shape != t.shape or b.shape != t.shape[:1]:
    raise ValueError(
      'points and w must be [rows, dim] and b [rows]; got shapes '
      f'{t.shape}, {w.shape} and {b.shape}.'
    )
  return t, w, b


def projection_linf(
  points: jax.typing.ArrayLike,
  w: jax.typing.ArrayLike,
  b: jax.typing.ArrayLike,
  bounds: tuple[Any, Any] = (0.0, 1.0),
) -> jax.Array:
  """Smallest L-inf step onto a hyperplane within the box, row by row.

  For each row, the step ``d`` of smallest L-inf norm such that
  ``<w, points + d> = b`` and ``points + d`` stays in ``bounds``; where the
  hyperplane cannot be reached inside the box, the step to the box corner
  closest to it. Moving by ``lambda`` in every coordinate (clipped at the
  box) changes ``<w, .>`` piecewise linearly in ``lambda``; the kinks are
  sorted and the right piece found by a fixed number of bisection steps.

  Args:
    points: [rows, dim] points inside ``bounds``.
    w: [rows, dim] normals of the hyperplanes.
    b: [rows] offsets of the hyperplanes.
    bounds: (lo, hi) box; scalars or arrays broadcasting against [rows,
      dim].

  Returns:
    [rows, dim] steps ``d`` (at least float32), zero where ``w`` is zero.

  Raises:
    ValueError: for inconsistent shapes or bounds without lo < hi.

  Examples:
    >>> project = jax.jit(projection_linf)
    >>> d = project(jnp.array([[0.5, 0.5]]), jnp.array([[1.0, 1.0]]),
    ...             jnp.array([0.8]))
    >>> d.round(6).tolist()
    [[-0.1, -0.1]]
  """
  t, w, b = _check_rows(points, w, b)
  rows, dim = t.shape
  lo, hi = _box(bounds, t.shape, t.dtype)

  # Orient the normal so that <w, t> >= b: the step then lowers <w, .>.
  sign = jnp.where(jnp.sum(w * t, axis=1) - b >= 0, 1.0, -1.0).astype(t.dtype)
  w = w * sign[:, None]
  b = b * sign
  neg = w < 0
  nonzero = w != 0
  # The step to the corner that lowers <w, .> most, and its L-inf length
  # per coordinate (the kinks of the piecewise linear change).
  d = jnp.where(nonzero, jnp.where(neg, hi, lo) - t, 0.0)
  p = jnp.where(neg, hi - t, t - lo)
  order = _argsort(p)[:, ::-1]  # Largest p first.
  b = b - jnp.sum(w * t, axis=1)  # The change of <w, .> needed (<= 0).
  b0 = jnp.sum(w * d, axis=1)  # The largest change the box allows.
  w_sorted = _take(w, order)
  p_sorted = _take(p, order)
  # With lambda between the (k+1)-th and k-th largest p, the change is
  # sb[k] - s[k] * lambda.
  s = jnp.cumsum(jnp.abs(w_sorted), axis=1)
  sb = jnp.cumsum(-w_sorted * _take(d, order), axis=1) + b0[:, None]

  change_at_min = sb[:, -1] - s[:, -1] * p_sorted[:, -1]
  below_all = b - change_at_min > 0  # Reached before any coordinate clips.
  between = (b - b0 > 0) & ~below_all

  def reached_before(k):
    k = k[:, None]
    change = _take(sb, k) - _take(s, k) * _take(p_sorted, k)
    return b - change[:, 0] > 0

  k = _bisect(reached_before, rows, dim)[:, None]
  lam_all = jnp.maximum((b - sb[:, -1]) / -s[:, -1], 0.0)[:, None]
  d_all = jnp.where(neg, 1.0, -1.0) * lam_all
  lam = jnp.maximum((b[:, None] - _take(sb, k)) / -_take(s, k), 0.0)
  d_between = jnp.where(neg, jnp.minimum(lam, d), jnp.maximum(-lam, d))
  d = jnp.where(
    below_all[:, None], d_all, jnp.where(between[:, None], d_between, d)
  )
  return jnp.where(nonzero, d, 0.0)


def projection_l2(
  points: jax.typing.ArrayLike,
  w: jax.typing.ArrayLike,
  b: jax.typing.ArrayLike,
  bounds: tuple[Any, Any] = (0.0, 1.0),
) -> jax.Array:
  """Smallest L2 step onto a hyperplane within the box, row by row.

  For each row, the step ``d`` of smallest L2 norm such that ``<w, points
  + d> = b`` and ``points + d`` stays in ``bounds`` (the step to the box
  point closest to the hyperplane where it cannot be reached). The step is
  ``-lambda w`` clipped at the box; the values of ``lambda`` at which the
  coordinates clip are sorted and the right interval found by a fixed
  number of bisection steps. Weights below 1e-8 in magnitude are treated as
  zero.

  Args:
    points: [rows, dim] points inside ``bounds``.
    w: [rows, dim] normals of the hyperplanes.
    b: [rows] offsets of the hyperplanes.
    bounds: (lo, hi) box; scalars or arrays broadcasting against [rows,
      dim].

  Returns:
    [rows, dim] steps ``d`` (at least float32).

  Raises:
    ValueError: for inconsistent shapes or bounds without lo < hi.

  Examples:
    >>> project = jax.jit(projection_l2)
    >>> d = project(jnp.array([[0.5, 0.2]]), jnp.array([[1.0, 2.0]]),
    ...             jnp.array([0.4]))
    >>> d.round(6).tolist()
    [[-0.1, -0.2]]
  """
  t, w, b = _check_rows(points, w, b)
  rows, dim = t.shape
  lo, hi = _box(bounds, t.shape, t.dtype)

  c = jnp.sum(w * t, axis=1) - b
  sign = jnp.where(c >= 0, 1.0, -1.0).astype(t.dtype)
  w = w * sign[:, None]
  c = c * sign  # >= 0: the step -lambda w lowers <w, .> by lambda |w|^2.
  small = jnp.abs(w) < 1e-8
  # The lambda at which each coordinate reaches the box.
  r = jnp.clip(jnp.maximum((t - lo) / w, (t - hi) / w), -_BIG, _BIG)
  r = jnp.where(small, _BIG, r)
  r = jnp.where(r == -_BIG, _BIG, r)
  order = _argsort(r)
  rs = _take(r, order)
  rs_next = jnp.concatenate([rs[:, 1:], jnp.zeros_like(rs[:, :1])], axis=1)
  rs = jnp.where(rs == _BIG, 0.0, rs)
  rs_next = jnp.where(rs_next == _BIG, 0.0, rs_next)
  w2 = _take(w**2, order)
  w2_total = jnp.sum(w2, axis=1, keepdims=True)
  w2_free = w2_total - jnp.cumsum(w2, axis=1)  # Not yet clipped.
  d = jnp.where(small, 0.0, -(r * w))  # Every coordinate clipped.
  # s[k]: the change of <w, .> at lambda = rs[k].
  s0 = -w2_total * rs[:, :1]
  s = jnp.concatenate(
    [s0, jnp.cumsum((rs - rs_next) * w2_free, axis=1) + s0], axis=1
  )

  before_all = s[:, 0] + c < 0  # Reached before any coordinate clips.
  unreachable = jnp.sum(d * w, axis=1) + c > 0
  between = ~(before_all | unreachable)

  def not_reached(k):
    return _take(s, k[:, None])[:, 0] + c > 0

  k = _bisect(not_reached, rows, dim)[:, None]
  d_before = -(c / w2_total[:, 0])[:, None] * w
  free_k = _take(w2_free, k)
  lam = (_take(s, k) + c[:, None]) / free_k + _take(rs, k)
  lam = jnp.where(free_k == 0, 0.0, lam)
  d_between = jnp.where(lam > r, d, -lam * w)
  d = jnp.where(
    before_all[:, None], d_before, jnp.where(between[:, None], d_between, d)
  )
  return jnp.where(small, 0.0, d)


_PROJECTIONS = {'linf': projection_linf, 'l2': projection_l2}


def _norm(x: jax.Array, norm: str) -> jax.Array:
  if norm == 'linf':
    return jnp.max(jnp.abs(x), axis=ball.reduce_axes(x))
  return ball.l2_norm(x)


def _dual_norm(g: jax.Array, norm: str) -> jax.Array:
  """L1 norm for L-inf, L2 for L2, over the last axis."""
  if norm == 'linf':
    return jnp.sum(jnp.abs(g), axis=-1)
  return jnp.sqrt(jnp.sum(jnp.square(g), axis=-1))


def _hyperplane(
  logits_fn: LogitsFn,
  x: jax.Array,
  labels: jax.Array,
  targets: jax.Array | None,
  norm: str,
) -> tuple[jax.Array, jax.Array]:
  """The linearised boundary at x: (w [batch, dim], f [batch]).

  Targeted: f is the logit of the target minus that of the label, w its
  gradient (one backward pass of their sum). Untargeted: the same for the
  class whose linearised boundary is closest in the norm (one backward
  pass per class).
  """
  batch = x.shape[0]
  if targets is not None:

    def diff(x):
      z = ball.check_logits(logits_fn(x), batch).astype(jnp.float32)
      zt = jnp.take_along_axis(z, targets[:, None], axis=1)[:, 0]
      zy = jnp.take_along_axis(z, labels[:, None], axis=1)[:, 0]
      return jnp.sum(zt - zy), zt - zy

    (_, f), g = jax.value_and_grad(diff, has_aux=True)(x)
    return g.reshape(batch, -1).astype(x.dtype), f.astype(x.dtype)

  z, vjp = jax.vjp(lambda x: logits_fn(x).astype(jnp.float32), x)
  ball.check_logits(z, batch)
  num_classes = z.shape[1]
  eye = jnp.eye(num_classes, dtype=z.dtype)
  (jac,) = jax.vmap(vjp)(
    jnp.broadcast_to(eye[:, None], (num_classes,) + z.shape)
  )
  jac = jnp.moveaxis(jac.reshape(num_classes, batch, -1), 0, 1)
  is_label = jax.nn.one_hot(labels, num_classes, dtype=bool)
  df = z - jnp.take_along_axis(z, labels[:, None], axis=1)
  dg = jac - jnp.take_along_axis(jac, labels[:, None, None], axis=1)
  df = jnp.where(is_label, _SELF, df)
  dist = jnp.abs(df) / (1e-12 + _dual_norm(dg, norm))
  closest = jnp.argmin(dist, axis=1)
  w = jnp.take_along_axis(dg, closest[:, None, None], axis=1)[:, 0]
  f = jnp.take_along_axis(df, closest[:, None], axis=1)[:, 0]
  return w.astype(x.dtype), f.astype(x.dtype)


def _single_run(
  logits_fn: LogitsFn,
  x0: jax.Array,
  labels: jax.Array,
  targets: jax.Array | None,
  x_start: jax.Array,
  *,
  norm: str,
  num_steps: jax.typing.ArrayLike,
  alpha_max: float,
  eta: float,
  beta: float,
  lo: jax.Array,
  hi: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One FAB run from x_start: (last iterate, best adversarial, its norm).

  The norm is +inf where no adversarial point was found (the best point is
  then x0).
  """
  batch = x0.shape[0]
  x0_flat = x0.reshape(batch, -1)
  lo_flat = lo.reshape(batch, -1)
  hi_flat = hi.reshape(batch, -1)
  project = _PROJECTIONS[norm]

  def body(_, state):
    x, best, best_norm = state
    w, f = _hyperplane(logits_fn, x, labels, targets, norm)
    x_flat = x.reshape(batch, -1)
    bias = -f + jnp.sum(w * x_flat, axis=1)
    bounds = (
      jnp.concatenate([lo_flat, lo_flat]),
      jnp.concatenate([hi_flat, hi_flat]),
    )
    d = project(
      jnp.concatenate([x_flat, x0_flat]),
      jnp.concatenate([w, w]),
      jnp.concatenate([bias, bias]),
      bounds,
    )
    size = jnp.maximum(_norm(d, norm), 1e-8)
    alpha = jnp.minimum(
      jnp.maximum(size[:batch] / (size[:batch] + size[batch:]), 0.0),
      alpha_max,
    )[:, None]
    x_flat = (x_flat + eta * d[:batch]) * (1 - alpha) + (
      x0_flat + eta * d[batch:]
    ) * alpha
    x = jnp.clip(x_flat, lo_flat, hi_flat).reshape(x0.shape)
    logits = ball.check_logits(logits_fn(x), batch)
    is_adv = jnp.argmax(logits, axis=1) != labels
    dist = _norm(x - x0, norm)
    better = is_adv & (dist < best_norm)
    best = jnp.where(ball.per_example(better, x), x, best)
    best_norm = jnp.where(better, dist, best_norm)
    x = jnp.where(ball.per_example(is_adv, x), x0 + (x - x0) * beta, x)
    return x, best, best_norm

  best_norm = jnp.full((batch,), jnp.inf, x0.dtype)
  return jax.lax.fori_loop(0, num_steps, body, (x_start, x0, best_norm))


def _random_start(
  keys: jax.Array, x0: jax.Array, radius: jax.Array, norm: str
) -> jax.Array:
  """x0 plus a random step of norm `radius` (scaled uniform or normal)."""
  shape = x0.shape[1:]
  if norm == 'linf':
    t = jax.vmap(lambda k: jax.random.uniform(k, shape, x0.dtype, -1.0, 1.0))(
      keys
    )
  else:
    t = jax.vmap(lambda k: jax.random.normal(k, shape, x0.dtype))(keys)
  return x0 + ball.per_example(radius / _norm(t, norm), t) * t


def _fab(
  logits_fn: LogitsFn,
  key: jax.Array | None,
  images: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  targeted: bool,
  epsilon: jax.typing.ArrayLike,
  norm: str,
  num_steps: jax.typing.ArrayLike,
  num_target_classes: int,
  num_restarts: int,
  alpha_max: float,
  eta: float,
  beta: float,
  bounds: tuple[Any, Any],
  example_ids: jax.typing.ArrayLike | None,
) -> tuple[jax.Array, jax.Array]:
  ball.check_norm(norm)
  images, labels, example_ids = ball.check_batch(images, labels, example_ids)
  if num_restarts < 1:
    raise ValueError(f'num_restarts must be >= 1, got {num_restarts}.')
  if key is None and num_restarts > 1:
    raise ValueError('restarts after the first need a key; got key=None.')
  batch = images.shape[0]
  dtype = jnp.promote_types(images.dtype, jnp.float32)
  x0 = images.astype(dtype)
  lo, hi = _box(bounds, x0.shape, dtype)
  epsilon = jnp.asarray(epsilon, dtype)

  clean = ball.check_logits(logits_fn(x0), batch)
  num_classes = clean.shape[1]
  if targeted:
    if not 1 <= num_target_classes < num_classes:
      raise ValueError(
        f'num_target_classes must be in [1, {num_classes - 1}] for '
        f'{num_classes} classes, got {num_target_classes}.'
      )
    ranked = jnp.argsort(clean, axis=1)  # Ascending.
    num_runs = num_target_classes * num_restarts
  else:
    num_runs = num_restarts
  robust = jnp.argmax(clean, axis=1) == labels
  keys = None if key is None else ball.example_keys(key, example_ids)

  def run(state):
    i, adv, robust = state
    restart = i % num_restarts
    targets = None
    if targeted:
      # The (i // num_restarts + 2)-th largest clean logit.
      rank = num_classes - 2 - i // num_restarts
      targets = jnp.take_along_axis(
        ranked, jnp.broadcast_to(rank, (batch, 1)), axis=1
      )[:, 0]
    x_start = x0
    if num_restarts > 1:
      run_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
      # The reference scales the start by min(best norm of this run, eps):
      # the run has found nothing yet, so eps.
      start = _random_start(
        run_keys, x0, jnp.broadcast_to(epsilon * 0.5, (batch,)), norm
      )
      x_start = jnp.where(restart > 0, jnp.clip(start, lo, hi), x0)
    _, best, best_norm = _single_run(
      logits_fn,
      x0,
      labels,
      targets,
      x_start,
      norm=norm,
      num_steps=num_steps,
      alpha_max=alpha_max,
      eta=eta,
      beta=beta,
      lo=lo,
      hi=hi,
    )
    found = ball.per_example(jnp.isfinite(best_norm), x0)
    candidate = jnp.where(found, best, x0)
    # Checked again as the reference does: misclassified and within eps.
    fooled = (
      robust
      & (jnp.argmax(logits_fn(candidate), axis=1) != labels)
      & (_norm(candidate - x0, norm) <= epsilon)
    )
    adv = jnp.where(ball.per_example(fooled, x0), candidate, adv)
    return i + 1, adv, robust & ~fooled

  # Examples already broken take no part in later runs, so once none is
  # left the remaining runs would change nothing.
  _, adv, robust = jax.lax.while_loop(
    lambda s: (s[0] < num_runs) & jnp.any(s[2]),
    run,
    (jnp.asarray(0, jnp.int32), x0, robust),
  )
  adv = jax.lax.stop_gradient(adv.astype(images.dtype))
  return adv, jax.lax.stop_gradient(~robust)


def fab_targeted(
  logits_fn: LogitsFn,
  key: jax.Array | None,
  images: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  epsilon: jax.typing.ArrayLike,
  norm: str = 'linf',
  num_steps: jax.typing.ArrayLike = 100,
  num_target_classes: int = 9,
  num_restarts: int = 1,
  alpha_max: float = 0.1,
  eta: float = 1.05,
  beta: float = 0.9,
  bounds: tuple[Any, Any] = (0.0, 1.0),
  example_ids: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  """FAB-T: targeted FAB as AutoAttack's standard version runs it.

  For each target rank k = 2, ..., num_target_classes + 1 (the class of the
  k-th largest clean logit) and each restart, runs ``num_steps`` FAB
  iterations on the boundary between the true class and the target, and
  marks an example broken when the smallest adversarial point found
  (misclassified as any class) lies within ``epsilon``. Later runs only
  change examples that are still robust. The first restart starts from the
  clean image, so with one restart the attack is deterministic; restart r
  > 0 of example i starts from a random point at L-inf or L2 distance
  ``epsilon / 2`` drawn with ``fold_in(fold_in(key, example_ids[i]), run)``.

  Args:
    logits_fn: maps a [batch, ...] image batch to [batch, num_classes]
      logits.
    key: PRNG key for the random starts; may be None with one restart.
    images: [batch, ...] clean float images inside ``bounds``.
    labels: [batch] integer true labels.
    epsilon: the radius within which a point counts (may be traced).
    norm: ``'linf'`` or ``'l2'``.
    num_steps: iterations per run (may be traced).
    num_target_classes: number of target classes (< num_classes).
    num_restarts: runs per target class.
    alpha_max: largest weight of the clean image's projection.
    eta: overshoot of the projections.
    beta: backward step towards the clean image after a success.
    bounds: (lo, hi) valid pixel range; scalars or arrays broadcasting
      against the images.
    example_ids: [batch] GLOBAL example ids for the random starts; default
      ``arange(batch)``.

  Returns:
    ``(adv, is_adv)``: [batch, ...] images of the dtype of ``images`` (the
    smallest adversarial point of the run that broke the example, or the
    clean image) and [batch] bools, true where ``adv`` is misclassified and
    within ``epsilon`` (including examples misclassified when clean, whose
    ``adv`` is the clean image).

  Raises:
    ValueError: for an unknown norm, bad shapes, num_target_classes out of
      range, num_restarts < 1, or restarts without a key.

  Examples:
    >>> w = jnp.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.3]])
    >>> logits_fn = lambda x: x.reshape(len(x), -1) @ w
    >>> x = jnp.array([[[0.6, 0.4]]])
    >>> adv, ok = fab_targeted(logits_fn, None, x, jnp.array([0]),
    ...                        epsilon=0.1, num_target_classes=2,
    ...                        num_steps=10)
    >>> ok.tolist(), bool(jnp.abs(adv - x).max() <= 0.1)
    ([True], True)
  """
  return _fab(
    logits_fn,
    key,
    images,
    labels,
    targeted=True,
    epsilon=epsilon,
    norm=norm,
    num_steps=num_steps,
    num_target_classes=num_target_classes,
    num_restarts=num_restarts,
    alpha_max=alpha_max,
    eta=eta,
    beta=beta,
    bounds=bounds,
    example_ids=example_ids,
  )


def fab(
  logits_fn: LogitsFn,
  key: jax.Array | None,
  images: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  epsilon: jax.typing.ArrayLike,
  norm: str = 'linf',
  num_steps: jax.typing.ArrayLike = 100,
  num_restarts: int = 5,
  alpha_max: float = 0.1,
  eta: float = 1.05,
  beta: float = 0.9,
  bounds: tuple[Any, Any] = (0.0, 1.0),
  example_ids: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Untargeted FAB, as AutoAttack's plus version runs it (5 restarts).

  As :func:`fab_targeted`, but each iteration linearises the boundary of
  the class whose linearised boundary is closest to the current point (one
  backward pass per class), and there is one run per restart.

  Args:
    logits_fn: maps images to [batch, num_classes] logits.
    key: PRNG key for the random starts; may be None with one restart.
    images: [batch, ...] clean float images inside ``bounds``.
    labels: [batch] integer true labels.
    epsilon: the radius within which a point counts (may be traced).
    norm: ``'linf'`` or ``'l2'``.
    num_steps: iterations per run (may be traced).
    num_restarts: runs; all but the first from a random start.
    alpha_max: largest weight of the clean image's projection.
    eta: overshoot of the projections.
    beta: backward step towards the clean image after a success.
    bounds: (lo, hi) valid pixel range.
    example_ids: [batch] GLOBAL example ids for the random starts.

  Returns:
    ``(adv, is_adv)`` as :func:`fab_targeted`.

  Raises:
    ValueError: as :func:`fab_targeted`.

  Examples:
    >>> w = jnp.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.3]])
    >>> logits_fn = lambda x: x.reshape(len(x), -1) @ w
    >>> x = jnp.array([[[0.6, 0.4]]])
    >>> adv, ok = fab(logits_fn, None, x, jnp.array([0]), epsilon=0.1,
    ...               num_steps=10, num_restarts=1)
    >>> ok.tolist(), bool(jnp.abs(adv - x).max() <= 0.1)
    ([True], True)
  """
  return _fab(
    logits_fn,
    key,
    images,
    labels,
    targeted=False,
    epsilon=epsilon,
    norm=norm,
    num_steps=num_steps,
    num_target_classes=0,
    num_restarts=num_restarts,
    alpha_max=alpha_max,
    eta=eta,
    beta=beta,
    bounds=bounds,
    example_ids=example_ids,
  )
