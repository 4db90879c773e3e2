"""Gradient attacks: projected gradient descent (PGD), FGSM, the losses.

All attacks work in pixel space: ``epsilon``, ``step_size`` and ``bounds``
are in the units of the images the model takes (fdjax models normalise
inside). They are pure functions of explicit keys and arrays; ``epsilon``,
``step_size`` and ``num_steps`` may be traced, so one compiled attack serves
a sweep over 10, 100, 1000 and 2000 steps or several epsilons. The loop is a
``jax.lax.fori_loop`` and never unrolls.

Conventions (the original code's, see docs/protocol.md):

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

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fdjax.attacks import ball
from fdjax.attacks.ball import LogitsFn

LOSSES = ('xent', 'margin')


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
  ball.check_norm(norm)
  if loss not in LOSSES:
    raise ValueError(f'unknown attack loss {loss!r}; valid: {LOSSES}.')
  lo, hi = ball.check_bounds(bounds)
  images, labels, example_ids = ball.check_batch(images, labels, example_ids)
  batch = images.shape[0]
  static_start = ball.is_static_bool(random_start)
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
    logits = ball.check_logits(logits_fn(x), batch)
    return jnp.sum(example_losses(logits, labels, loss))

  grad_fn = jax.grad(objective)

  def body(_, x):
    x = x + direction * step_size * ball.ascent_direction(grad_fn(x), norm)
    return ball.project(x, x0, epsilon, norm, lo, hi)

  if static_start and not random_start:
    x_start = x0
  else:
    delta = ball.random_start_delta(key, x0, epsilon, norm, example_ids)
    x_start = (
      x0 + delta if static_start else jnp.where(random_start, x0 + delta, x0)
    )
  x = jax.lax.fori_loop(0, num_steps, body, x_start)
  # With zero steps the (unclipped) start would be returned: project it.
  x = jnp.where(
    jnp.asarray(num_steps) > 0, x, ball.project(x, x0, epsilon, norm, lo, hi)
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
