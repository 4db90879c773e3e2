"""Projected gradient descent attacks (PGD, FGSM) and the paper's protocol.

All attacks work in pixel space: ``epsilon``, ``step_size`` and ``bounds``
are in the units of the images the model takes (fdjax models normalise
inside). They are pure functions of explicit keys and arrays; ``epsilon``,
``step_size`` and ``num_steps`` may be traced, so one compiled attack serves
a sweep over 10, 100, 1000 and 2000 steps or several epsilons. The loop is a
``jax.lax.fori_loop`` and never unrolls.

Conventions (the original code's, see SPEC.md section 4):

* The gradient is that of the SUM of per-example losses, so a step never
  depends on the batch size or on the other examples of the batch.
* Untargeted attacks ascend the loss of the true labels. Targeted attacks
  descend the loss of the targets: ``x <- x - step * sign(grad)``.
* L-inf projection clips to the epsilon ball intersected with ``bounds``.
  The random start ``x0 + U(-eps, eps)`` is not clipped to the bounds; the
  first step's projection does that. The last iterate is returned.
* Randomness is folded per example (``fold_in(key, example_id)``), so the
  attack of an example does not depend on how the batch is split over
  devices or hosts, provided the caller passes GLOBAL example ids.

BatchNorm and other train-time layers: during the attack the model must use
its moving statistics and update nothing, as in the original. For fdjax (and
any Flax) models::

  logits_fn = lambda x: model.apply(
      {'params': params, 'batch_stats': batch_stats}, x, train=False)

with no ``mutable`` argument (Flax then raises if anything tried to update a
collection). A model with dropout is likewise applied with its deterministic
flag set (``train=False``/``deterministic=True``) and no ``'dropout'`` rng.
The result passes through ``stop_gradient``: a training loss on the
adversarial batch differentiates only through the model applied to it, as
in the original (the attack may run inside or outside the differentiated
function; outside saves tracing it for the backward pass).

Data parallel (each device attacks its own shard, no communication, as the
original): pass the variables and the key replicated and the batch and the
global example ids split over devices::

  def attack(variables, key, images, labels, ids):
    logits_fn = lambda x: model.apply(variables, x, train=False)
    return pgd(logits_fn, key, images, labels, epsilon=eps,
               step_size=step, num_steps=steps, example_ids=ids)

  attack = jax.jit(parallel.data_parallel(
      attack, mesh=mesh,
      in_specs=(P(), P(), P('data'), P('data'), P('data')),
      out_specs=P('data')))
  adv = attack(variables, key, images, labels, jnp.arange(len(images)))

(To keep ``eps``/``steps`` traced there, pass them as further ``P()``
arguments.) The result is the same as on one device.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PAPER_EPSILON = 16 / 255
"""The paper's L-inf radius: 16 in 0..255 pixel units (images in [0, 1])."""

PAPER_STEP_SIZE = 1 / 255
"""The paper's nominal step: 1 in 0..255 pixel units (images in [0, 1])."""

NORMS = ('linf', 'l2')
LOSSES = ('xent', 'margin')

LogitsFn = Callable[[jax.Array], jax.Array]


def example_losses(
  logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, loss: str
) -> jax.Array:
  """Per-example attack loss in float32.

  ``'xent'`` is the softmax cross-entropy of ``labels``. ``'margin'`` is the
  Carlini-Wagner margin ``max_{j != y} z_j - z_y``: it is positive when some
  other class beats ``y``. Both grow when the example moves away from
  ``labels``, so an untargeted attack ascends them (``labels`` = true
  labels) and a targeted attack descends them (``labels`` = targets).

  Args:
    logits: [batch, num_classes] logits of any float dtype.
    labels: [batch] integer labels (true labels or targets).
    loss: ``'xent'`` or ``'margin'``.

  Returns:
    [batch] float32 losses.

  Raises:
    ValueError: for an unknown loss or logits that are not [batch, classes]
      with at least two classes.

  Examples:
    >>> z = jnp.array([[2.0, 0.5, 1.0]])
    >>> example_losses(z, jnp.array([0]), 'margin').tolist()
    [-1.0]
  """
  if loss not in LOSSES:
    raise ValueError(f'unknown attack loss {loss!r}; valid: {LOSSES}.')
  logits = jnp.asarray(logits).astype(jnp.float32)
  if logits.ndim != 2 or logits.shape[-1] < 2:
    raise ValueError(
      'logits must be [batch, num_classes] with num_classes >= 2, got '
      f'shape {logits.shape}.'
    )
  labels = jnp.asarray(labels)
  if loss == 'xent':
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  label_logit = jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)
  best_other = jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)
  return best_other - label_logit


def _reduce_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim))


def _per_example(v: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a [batch] array to broadcast against x [batch, ...]."""
  return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _l2_norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=_reduce_axes(x)))


def _example_keys(key: jax.Array, example_ids: jax.Array) -> jax.Array:
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids)


def _random_start_delta(
  key: jax.Array,
  x0: jax.Array,
  epsilon: jax.Array,
  norm: str,
  example_ids: jax.Array,
) -> jax.Array:
  """Uniform noise in the epsilon ball, one fold_in(key, id) per example."""
  keys = _example_keys(key, example_ids)
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


def _project(
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
    n = _l2_norm(delta)
    scale = jnp.where(
      n > epsilon, epsilon / jnp.where(n > 0, n, 1.0), jnp.ones_like(n)
    )
    x = x0 + delta * _per_example(scale, x)
  return jnp.clip(x, lo, hi)


def _ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
  """Steepest ascent direction of unit norm: sign (L-inf) or g/||g|| (L2)."""
  if norm == 'linf':
    return jnp.sign(grad)
  n = _l2_norm(grad)
  inv = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)
  return grad * _per_example(inv, grad)


def _is_static_bool(x: Any) -> bool:
  return isinstance(x, (bool, np.bool_))


def _check_bounds(bounds: Any) -> tuple[Any, Any]:
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


def pgd(
  logits_fn: LogitsFn,
  key: jax.Array | None,
  images: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  epsilon: jax.typing.ArrayLike,
  step_size: jax.typing.ArrayLike,
  num_steps: jax.typing.ArrayLike,
  targeted: bool = False,
  norm: str = 'linf',
  random_start: bool | jax.typing.ArrayLike = True,
  bounds: tuple[Any, Any] = (0.0, 1.0),
  loss: str = 'xent',
  example_ids: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Projected gradient descent (Madry et al.) under L-inf or L2.

  Each of the ``num_steps`` steps moves along the sign (L-inf) or the
  per-example L2-normalised direction (L2) of the gradient of the summed
  per-example loss -- up for untargeted attacks, down for targeted ones --
  then projects onto the epsilon ball around ``images`` and clips to
  ``bounds``.

  Args:
    logits_fn: maps a [batch, ...] image batch to [batch, num_classes]
      logits, e.g. ``lambda x: model.apply(variables, x, train=False)``.
    key: a PRNG key for the random start (typed or raw); may be None when
      ``random_start`` is the Python value False.
    images: [batch, ...] clean images, a float dtype, inside ``bounds``.
    labels: [batch] integer true labels (untargeted) or targets (targeted).
    epsilon: radius of the ball (may be traced).
    step_size: size of one step (may be traced).
    num_steps: number of steps (may be traced; a traced value gives a
      ``while_loop`` whose compile does not depend on its value).
    targeted: descend the loss of ``labels`` (targets) instead of ascending
      the loss of ``labels`` (true labels).
    norm: ``'linf'`` or ``'l2'``.
    random_start: start from a uniform point of the ball (L-inf: ``U(-eps,
      eps)`` per pixel, not clipped to ``bounds``; L2: uniform in the ball)
      instead of the clean image. A Python bool or a traced boolean scalar.
    bounds: (lo, hi) valid pixel range; scalars or arrays broadcasting
      against the images.
    loss: ``'xent'`` (softmax cross-entropy) or ``'margin'`` (CW margin, see
      :func:`example_losses`); computed in float32.
    example_ids: [batch] integer GLOBAL ids of the examples; the random
      start of example i uses ``fold_in(key, example_ids[i])``. Defaults to
      ``arange(batch)``.

  Returns:
    The adversarial images (last iterate), same shape and dtype as
    ``images``, through ``jax.lax.stop_gradient``.

  Raises:
    ValueError: for an unknown norm or loss, bounds without lo < hi, images
      of rank < 2 or not floating point, labels or example ids not of shape
      [batch], or a random start without a key.

  Examples:
    >>> w = jnp.array([[1.0, -1.0], [-2.0, 2.0]])
    >>> logits_fn = lambda x: x.reshape(len(x), -1) @ w
    >>> x = jnp.array([[[0.5, 0.5]]])
    >>> adv = pgd(logits_fn, jax.random.key(0), x, jnp.array([0]),
    ...           epsilon=0.1, step_size=0.05, num_steps=4,
    ...           random_start=False)
    >>> adv.round(6).tolist()
    [[[0.4, 0.6]]]
  """
  if norm not in NORMS:
    raise ValueError(f'unknown attack norm {norm!r}; valid: {NORMS}.')
  if loss not in LOSSES:
    raise ValueError(f'unknown attack loss {loss!r}; valid: {LOSSES}.')
  lo, hi = _check_bounds(bounds)
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
  static_start = _is_static_bool(random_start)
  if not static_start:
    random_start = jnp.asarray(random_start)
    if random_start.shape != ():
      raise ValueError(
        'random_start must be a bool or a boolean scalar, got shape '
        f'{random_start.shape}.'
      )
  if key is None and not (static_start and not random_start):
    raise ValueError('a random start needs a key; got key=None.')

  # Work in at least float32 so that the ball and bounds are exact enough.
  dtype = jnp.promote_types(images.dtype, jnp.float32)
  x0 = images.astype(dtype)
  epsilon = jnp.asarray(epsilon, dtype)
  step_size = jnp.asarray(step_size, dtype)
  lo = jnp.asarray(lo, dtype)
  hi = jnp.asarray(hi, dtype)
  # +1 ascends the loss (untargeted), -1 descends it (targeted).
  direction = -1.0 if targeted else 1.0

  def objective(x):
    logits = logits_fn(x)
    if logits.ndim != 2 or logits.shape[0] != batch:
      raise ValueError(
        f'logits_fn must return [{batch}, num_classes] logits, got shape '
        f'{logits.shape}.'
      )
    return jnp.sum(example_losses(logits, labels, loss))

  grad_fn = jax.grad(objective)

  def body(_, x):
    x = x + direction * step_size * _ascent_direction(grad_fn(x), norm)
    return _project(x, x0, epsilon, norm, lo, hi)

  if static_start and not random_start:
    x_start = x0
  else:
    delta = _random_start_delta(key, x0, epsilon, norm, example_ids)
    x_start = (
      x0 + delta if static_start else jnp.where(random_start, x0 + delta, x0)
    )
  x = jax.lax.fori_loop(0, num_steps, body, x_start)
  # With zero steps the (unclipped) start would be returned: project it.
  x = jnp.where(
    jnp.asarray(num_steps) > 0, x, _project(x, x0, epsilon, norm, lo, hi)
  )
  return jax.lax.stop_gradient(x.astype(images.dtype))


def fgsm(
  logits_fn: LogitsFn,
  images: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  epsilon: jax.typing.ArrayLike,
  targeted: bool = False,
  norm: str = 'linf',
  bounds: tuple[Any, Any] = (0.0, 1.0),
  loss: str = 'xent',
  key: jax.Array | None = None,
  random_start: bool | jax.typing.ArrayLike = False,
  example_ids: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Fast gradient (sign) method: one PGD step of size ``epsilon``.

  With ``random_start`` (and a ``key``) the step starts from a uniform
  point of the ball and is projected back onto it, like R+FGSM / "fast"
  adversarial training.

  Args:
    logits_fn: maps images to [batch, num_classes] logits.
    images: [batch, ...] clean float images.
    labels: [batch] true labels (untargeted) or targets (targeted).
    epsilon: radius of the ball and size of the step (may be traced).
    targeted: descend the loss of ``labels`` instead of ascending it.
    norm: ``'linf'`` (sign step) or ``'l2'`` (normalised gradient step).
    bounds: (lo, hi) valid pixel range.
    loss: ``'xent'`` or ``'margin'``.
    key: PRNG key, needed only with ``random_start``.
    random_start: Python bool or traced boolean scalar, as in :func:`pgd`.
    example_ids: [batch] global example ids for the random start.

  Returns:
    The adversarial images, same shape and dtype as ``images``.

  Raises:
    ValueError: as :func:`pgd`.

  Examples:
    >>> w = jnp.array([[1.0, -1.0], [-2.0, 2.0]])
    >>> logits_fn = lambda x: x @ w
    >>> fgsm(logits_fn, jnp.array([[0.5, 0.5]]), jnp.array([0]),
    ...      epsilon=0.1).round(6).tolist()
    [[0.4, 0.6]]
  """
  return pgd(
    logits_fn,
    key,
    images,
    labels,
    epsilon=epsilon,
    step_size=epsilon,
    num_steps=1,
    targeted=targeted,
    norm=norm,
    random_start=random_start,
    bounds=bounds,
    loss=loss,
    example_ids=example_ids,
  )


def random_targets(
  key: jax.Array,
  labels: jax.typing.ArrayLike,
  num_classes: int,
  example_ids: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """The original's random targets: ``(label + U{1..K-1}) mod K``.

  A target never equals its label and is uniform over the other classes.
  Example i draws from ``fold_in(key, example_ids[i])``, so its target does
  not depend on the batch split.

  Args:
    key: PRNG key.
    labels: [batch] integer labels in [0, num_classes).
    num_classes: K >= 2, a Python int.
    example_ids: [batch] global example ids; defaults to ``arange(batch)``.

  Returns:
    [batch] targets with the dtype of ``labels``.

  Raises:
    ValueError: if num_classes < 2 or the shapes disagree.

  Examples:
    >>> t = random_targets(jax.random.key(0), jnp.array([0, 1, 2]), 3)
    >>> bool((t != jnp.array([0, 1, 2])).all())
    True
  """
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
    raise ValueError(
      f'num_classes must be a Python int >= 2, got {num_classes!r}.'
    )
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be [batch], got shape {labels.shape}.')
  if example_ids is None:
    example_ids = jnp.arange(labels.shape[0])
  example_ids = jnp.asarray(example_ids)
  if example_ids.shape != labels.shape:
    raise ValueError(
      f'example_ids must have shape {labels.shape}, got {example_ids.shape}.'
    )
  keys = _example_keys(key, example_ids)
  offsets = jax.vmap(lambda k: jax.random.randint(k, (), 1, num_classes))(keys)
  return ((labels + offsets) % num_classes).astype(labels.dtype)


def paper_step_size(
  epsilon: jax.typing.ArrayLike,
  step_size: jax.typing.ArrayLike,
  num_steps: jax.typing.ArrayLike,
) -> jax.Array:
  """The original's effective step: ``max(step_size, epsilon / num_steps)``.

  So that even a short attack can cross the ball (1.6/255 for 10 steps at
  epsilon 16/255 and step 1/255). Works on traced values.

  Args:
    epsilon: ball radius.
    step_size: nominal step.
    num_steps: number of steps (> 0).

  Returns:
    The step size, a scalar array.

  Examples:
    >>> float(paper_step_size(16.0, 1.0, 10))
    1.6
    >>> float(paper_step_size(16.0, 1.0, 100))
    1.0
  """
  return jnp.maximum(
    jnp.asarray(step_size), jnp.asarray(epsilon) / jnp.asarray(num_steps)
  )


def clean_start_coin(
  key: jax.Array,
  prob: jax.typing.ArrayLike,
  device_index: jax.typing.ArrayLike,
) -> jax.Array:
  """One coin per device batch: True means "use a random start".

  The original starts a device's whole batch from the clean image with
  probability ``prob`` (0.2 in training, 0 in evaluation), one coin per
  device batch per step. Call it inside the per-device function with
  ``device_index = jax.lax.axis_index('data')`` and pass the result as
  :func:`pgd`'s ``random_start``. Use a key of its own (split from the
  step's key), not the attack's.

  Args:
    key: PRNG key, the same on all devices.
    prob: probability of a clean start (0 = always random start).
    device_index: the index of the device (batch shard).

  Returns:
    A boolean scalar, ``uniform(fold_in(key, device_index)) >= prob``.

  Examples:
    >>> bool(clean_start_coin(jax.random.key(0), 0.0, 3))
    True
    >>> bool(clean_start_coin(jax.random.key(0), 1.0, 3))
    False
  """
  u = jax.random.uniform(jax.random.fold_in(key, device_index))
  return u >= prob


def targeted_pgd(
  logits_fn: LogitsFn,
  key: jax.Array,
  images: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  num_classes: int,
  epsilon: jax.typing.ArrayLike = PAPER_EPSILON,
  step_size: jax.typing.ArrayLike = PAPER_STEP_SIZE,
  num_steps: jax.typing.ArrayLike,
  random_start: bool | jax.typing.ArrayLike = True,
  bounds: tuple[Any, Any] = (0.0, 1.0),
  example_ids: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The paper's attack: targeted L-inf PGD towards random targets.

  Targets are :func:`random_targets`; the step is
  :func:`paper_step_size` ``(epsilon, step_size, num_steps)``; the loss is
  the cross-entropy of the target, descended from a random start. The
  defaults are the paper's epsilon 16 and step 1 for images in [0, 1]; for
  0..255 pixels pass ``epsilon=16, step_size=1, bounds=(0, 255)``.

  Args:
    logits_fn: maps images to [batch, num_classes] logits (moving BN
      statistics, see the module docstring).
    key: PRNG key (split into a target key and a random-start key).
    images: [batch, ...] clean float images.
    labels: [batch] true labels.
    num_classes: number of classes, a Python int >= 2.
    epsilon: L-inf radius (may be traced).
    step_size: nominal step before ``max(step, eps / steps)``.
    num_steps: number of steps (may be traced).
    random_start: Python bool or traced boolean scalar (e.g.
      :func:`clean_start_coin`).
    bounds: (lo, hi) valid pixel range.
    example_ids: [batch] global example ids (targets and random starts).

  Returns:
    ``(adversarial_images, targets)``.

  Raises:
    ValueError: as :func:`pgd` and :func:`random_targets`.

  Examples:
    >>> w = jnp.eye(3)
    >>> adv, t = targeted_pgd(lambda x: x @ w, jax.random.key(1),
    ...                       jnp.full((4, 3), 0.5), jnp.zeros(4, int),
    ...                       num_classes=3, epsilon=0.4, num_steps=8)
    >>> bool((t != 0).all()), bool(((adv @ w).argmax(-1) == t).all())
    (True, True)
  """
  key_targets, key_start = jax.random.split(key)
  targets = random_targets(key_targets, labels, num_classes, example_ids)
  adv = pgd(
    logits_fn,
    key_start,
    images,
    targets,
    epsilon=epsilon,
    step_size=paper_step_size(epsilon, step_size, num_steps),
    num_steps=num_steps,
    targeted=True,
    norm='linf',
    random_start=random_start,
    bounds=bounds,
    loss='xent',
    example_ids=example_ids,
  )
  return adv, targets
