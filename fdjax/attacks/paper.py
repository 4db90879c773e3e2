"""The paper's attack: targeted L-inf PGD towards random targets.

The original's protocol (docs/protocol.md): a random target per example
that is never the true label, the effective step ``max(step, eps / steps)``
so that a short attack can still cross the ball, the cross-entropy of the
target descended from a random start, and in training a clean start with
probability 0.2 per device batch. Every piece folds its randomness per
global example id (or per device index for the coin), so results do not
depend on how a batch is split.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdjax.attacks import ball
from fdjax.attacks import gradient
from fdjax.attacks.ball import LogitsFn

PAPER_EPSILON = 16 / 255
"""The paper's L-inf radius: 16 in 0..255 pixel units (images in [0, 1])."""

PAPER_STEP_SIZE = 1 / 255
"""The paper's nominal step: 1 in 0..255 pixel units (images in [0, 1])."""


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
  keys = ball.example_keys(key, example_ids)
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


@dataclasses.dataclass(frozen=True)
class PGDAttack:
  """PGD as the paper runs it: one composition for training and evaluation.

  Targeted (the paper): targets are :func:`random_targets` of the labels,
  the loss of the target is descended. Untargeted: the loss of the true
  label is ascended. Either way the step is :func:`paper_step_size`
  ``(epsilon, step_size, num_steps)`` and the start is random unless
  ``random_start`` says otherwise.

  Keys: ``target_key, start_key = jax.random.split(key)``; restart ``r > 0``
  starts from ``fold_in(start_key, r)`` with the same targets. So restart 0
  of ``PGDAttack(...)(logits_fn, key, ...)`` is :func:`targeted_pgd` with
  the same key.

  The instance is static configuration (hashable: bind it in a closure
  before ``jax.jit``); the call's ``epsilon``, ``step_size`` and
  ``num_steps`` override the instance's and may be traced, so one compiled
  attack serves a sweep of step counts or epsilons.

  Attributes:
    epsilon: ball radius in pixel units (images in [0, 1]).
    step_size: nominal step before ``max(step, eps / steps)``.
    num_steps: PGD iterations.
    targeted: random-target (True) or untargeted (False) PGD.
    norm: ``'linf'`` or ``'l2'``.
    loss: ``'xent'`` or ``'margin'``.
    num_classes: the classifier's number of classes (targeted only).
    bounds: (lo, hi) valid pixel range.

  Examples:
    >>> attack = PGDAttack(epsilon=0.4, step_size=0.1, num_steps=8,
    ...                    num_classes=3)
    >>> w = jnp.eye(3)
    >>> adv, targets = attack(lambda x: x @ w, jax.random.key(1),
    ...                       jnp.full((4, 3), 0.5), jnp.zeros(4, int))
    >>> bool(((adv @ w).argmax(-1) == targets).all())
    True
  """

  epsilon: float | None = None
  step_size: float | None = None
  num_steps: int | None = None
  targeted: bool = True
  norm: str = 'linf'
  loss: str = 'xent'
  num_classes: int | None = None
  bounds: tuple[Any, Any] = (0.0, 1.0)

  def __call__(
    self,
    logits_fn: LogitsFn,
    key: jax.Array,
    images: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    example_ids: jax.typing.ArrayLike | None = None,
    random_start: bool | jax.typing.ArrayLike = True,
    restart: int | jax.typing.ArrayLike = 0,
    epsilon: jax.typing.ArrayLike | None = None,
    step_size: jax.typing.ArrayLike | None = None,
    num_steps: jax.typing.ArrayLike | None = None,
    target_key: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """Attacks a batch.

    Args:
      logits_fn: maps images to [batch, num_classes] logits (moving BN
        statistics, see `fdjax.attacks.gradient`).
      key: PRNG key (targets and random starts).
      images: [batch, ...] clean float images.
      labels: [batch] true labels.
      example_ids: [batch] global example ids; default ``arange(batch)``.
      random_start: Python bool or traced boolean scalar (e.g.
        :func:`clean_start_coin`).
      restart: the restart index (may be traced): restarts draw new random
        starts and keep the targets.
      epsilon: overrides ``self.epsilon`` (may be traced).
      step_size: overrides ``self.step_size`` (may be traced).
      num_steps: overrides ``self.num_steps`` (may be traced).
      target_key: the targets' key; then ``key`` is the start key itself
        and is not split (the train step derives both from its step key).

    Returns:
      ``(adversarial_images, attack_labels)``: the targets (targeted) or the
      labels (untargeted).

    Raises:
      ValueError: a missing epsilon/step/steps or ``num_classes``, or as
        :func:`fdjax.attacks.pgd`.
    """
    epsilon = self.epsilon if epsilon is None else epsilon
    step_size = self.step_size if step_size is None else step_size
    num_steps = self.num_steps if num_steps is None else num_steps
    if epsilon is None or step_size is None or num_steps is None:
      raise ValueError('PGDAttack needs epsilon, step_size and num_steps.')
    if target_key is None:
      target_key, start_key = jax.random.split(key)
    else:
      start_key = key
    if not (isinstance(restart, (int, np.integer)) and restart == 0):
      folded = jax.random.key_data(jax.random.fold_in(start_key, restart))
      start_key = jax.random.wrap_key_data(
        jnp.where(
          jnp.asarray(restart) == 0, jax.random.key_data(start_key), folded
        )
      )
    labels = jnp.asarray(labels)
    if self.targeted:
      if self.num_classes is None:
        raise ValueError('a targeted PGDAttack needs num_classes.')
      attack_labels = random_targets(
        target_key, labels, self.num_classes, example_ids
      )
    else:
      attack_labels = labels
    adv = gradient.pgd(
      logits_fn,
      start_key,
      images,
      attack_labels,
      epsilon=epsilon,
      step_size=paper_step_size(epsilon, step_size, num_steps),
      num_steps=num_steps,
      targeted=self.targeted,
      norm=self.norm,
      random_start=random_start,
      bounds=self.bounds,
      loss=self.loss,
      example_ids=example_ids,
    )
    return adv, attack_labels


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
  attack = PGDAttack(num_classes=num_classes, bounds=tuple(bounds))
  return attack(
    logits_fn,
    key,
    images,
    labels,
    example_ids=example_ids,
    random_start=random_start,
    epsilon=epsilon,
    step_size=step_size,
    num_steps=num_steps,
  )
