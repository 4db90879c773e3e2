"""The losses of APGD (Croce & Hein, ICML 2020), as the reference computes them.

The cross-entropy, the difference of logits ratio (DLR, `dlr_loss`) and its
targeted version (`targeted_dlr_loss`), with the reference's epsilons in the
denominators. Their gradients follow torch's order of operations (custom
VJPs): the DLR gradient is exactly zero where the loss is flat, as the
reference's, and the cross-entropy keeps its float32 precision at
saturation. `LOSS_FNS` maps APGD's loss names to ``loss_fn(logits, labels,
targets) -> [batch]`` losses to ascend.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

LOSSES = ('ce', 'dlr')
TARGETED_LOSSES = ('dlr-targeted', 'ce-targeted')

# The epsilon of the reference's denominators.
_TINY = 1e-12

# loss_fn(logits, labels, targets) -> [batch] float32 losses to ascend.
LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def dlr_loss(
  logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> jax.Array:
  """Per-example difference of logits ratio (DLR) loss, in float32.

  ``-(z_y - max_{i != y} z_i) / (z_(1) - z_(3) + 1e-12)`` with ``z_(k)`` the
  k-th largest logit. It is invariant to shifts and positive rescalings of
  the logits and positive once the example is misclassified.

  Its gradient is computed in the order of the reference's automatic
  differentiation, so that it vanishes exactly where the loss is locally
  constant (the label's logit the 3rd largest: the loss is 1), as the
  reference's does; there the attack does not move.

  Args:
    logits: [batch, num_classes] logits, num_classes >= 3.
    labels: [batch] integer true labels.

  Returns:
    [batch] float32 losses.

  Raises:
    ValueError: logits not [batch, num_classes] with at least 3 classes.

  Examples:
    >>> z = jnp.array([[4.0, 3.0, 0.0], [1.0, 3.0, 2.0]])
    >>> dlr_loss(z, jnp.array([0, 0])).tolist()
    [-0.25, 1.0]
  """
  logits = _check_logits(logits, 3)
  return _dlr_loss(logits, jnp.asarray(labels))


def _dlr_parts(logits, labels):
  top, idx = _top_k(logits, 3)
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  # The best other logit: the 2nd largest if the label is the largest.
  is_top = idx[:, 0] == labels
  num = label_logit - jnp.where(is_top, top[:, 1], top[:, 0])
  den = top[:, 0] - top[:, 2] + _TINY
  return num, den, idx, is_top


@jax.custom_vjp
def _dlr_loss(logits, labels):
  num, den, _, _ = _dlr_parts(logits, labels)
  return -(num / den)


def _dlr_loss_fwd(logits, labels):
  num, den, idx, is_top = _dlr_parts(logits, labels)
  return -(num / den), (num, den, idx, is_top, labels, logits.shape[-1])


def _dlr_loss_bwd(res, g):
  num, den, idx, is_top, labels, num_classes = res
  g_num, g_den = _ratio_cotangents(num, den, g)
  is_top = is_top.astype(g.dtype)
  grad = (
    _scatter(labels, g_num, num_classes)
    + _scatter(idx[:, 0], g_den + (-g_num) * (1.0 - is_top), num_classes)
    + _scatter(idx[:, 1], (-g_num) * is_top, num_classes)
    + _scatter(idx[:, 2], -g_den, num_classes)
  )
  return grad, None


_dlr_loss.defvjp(_dlr_loss_fwd, _dlr_loss_bwd)


def _ratio_cotangents(num, den, g):
  """Cotangents of num and den for the loss -(num / den), in torch's order."""
  g_ratio = -g
  # The barrier keeps XLA from rewriting (num / den) / den as
  # num / (den * den), which breaks the exact cancellations.
  ratio = jax.lax.optimization_barrier(num / den)
  return g_ratio / den, -g_ratio * (ratio / den)


def _scatter(index, values, num_classes):
  """[batch, num_classes]: values at index, zeros elsewhere."""
  hot = jax.nn.one_hot(index, num_classes, dtype=bool)
  return jnp.where(hot, values[:, None], 0.0)


def targeted_dlr_loss(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
) -> jax.Array:
  """Per-example targeted DLR loss, in float32 (to be maximised).

  ``-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2 + 1e-12)`` with ``z_(k)`` the
  k-th largest logit, ``y`` the true label and ``t`` the target. Its
  gradient follows the reference's order of operations, as
  :func:`dlr_loss`'s.

  Args:
    logits: [batch, num_classes] logits, num_classes >= 4.
    labels: [batch] integer true labels.
    targets: [batch] integer target classes.

  Returns:
    [batch] float32 losses.

  Raises:
    ValueError: logits not [batch, num_classes] with at least 4 classes.

  Examples:
    >>> z = jnp.array([[4.0, 3.0, 1.0, 0.0]])
    >>> targeted_dlr_loss(z, jnp.array([0]), jnp.array([1])).tolist()
    [-0.28571...]
  """
  logits = _check_logits(logits, 4)
  return _targeted_dlr_loss(logits, jnp.asarray(labels), jnp.asarray(targets))


def _targeted_dlr_parts(logits, labels, targets):
  top, idx = _top_k(logits, 4)
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  target_logit = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
  num = label_logit - target_logit
  den = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _TINY
  return num, den, idx


@jax.custom_vjp
def _targeted_dlr_loss(logits, labels, targets):
  num, den, _ = _targeted_dlr_parts(logits, labels, targets)
  return -(num / den)


def _targeted_dlr_loss_fwd(logits, labels, targets):
  num, den, idx = _targeted_dlr_parts(logits, labels, targets)
  res = (num, den, idx, labels, targets, logits.shape[-1])
  return -(num / den), res


def _targeted_dlr_loss_bwd(res, g):
  num, den, idx, labels, targets, num_classes = res
  g_num, g_den = _ratio_cotangents(num, den, g)
  g_half = (-g_den) * 0.5
  grad = (
    _scatter(labels, g_num, num_classes)
    + _scatter(targets, -g_num, num_classes)
    + _scatter(idx[:, 0], g_den, num_classes)
    + _scatter(idx[:, 2], g_half, num_classes)
    + _scatter(idx[:, 3], g_half, num_classes)
  )
  return grad, None, None


_targeted_dlr_loss.defvjp(_targeted_dlr_loss_fwd, _targeted_dlr_loss_bwd)


def _top_k(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """[batch, k] largest logits and their classes, largest first.

  k rounds of max/argmax: on CPU several times faster than a sort of every
  row (``jax.lax.top_k``) for a few classes. Ties go to the lowest class.
  """
  num_classes = logits.shape[-1]
  values, indices = [], []
  rest = logits
  for _ in range(k):
    index = jnp.argmax(rest, axis=-1)
    values.append(jnp.max(rest, axis=-1))
    indices.append(index)
    hot = jax.nn.one_hot(index, num_classes, dtype=bool)
    rest = jnp.where(hot, -jnp.inf, rest)
  return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


def _check_logits(logits: jax.typing.ArrayLike, min_classes: int) -> jax.Array:
  logits = jnp.asarray(logits).astype(jnp.float32)
  if logits.ndim != 2 or logits.shape[-1] < min_classes:
    raise ValueError(
      f'logits must be [batch, num_classes] with num_classes >= '
      f'{min_classes}, got shape {logits.shape}.'
    )
  return logits


@jax.custom_vjp
def _cross_entropy(logits, labels):
  """Per-example softmax cross-entropy, computed as torch computes it."""
  return -_pick(_log_softmax(logits), labels)


def _log_softmax(logits):
  # Shift by the max and keep the log of the sum apart: at saturation the
  # loss keeps its float32 precision (log-sum-exp minus the label's logit
  # would round it to the ulp of the logits).
  shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
  return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def _pick(x, index):
  return jnp.take_along_axis(x, index[:, None], axis=1)[:, 0]


def _cross_entropy_fwd(logits, labels):
  out = _log_softmax(logits)
  return -_pick(out, labels), (out, labels)


def _cross_entropy_bwd(res, g):
  out, labels = res
  g_out = _scatter(labels, -g, out.shape[-1])
  total = jnp.sum(g_out, axis=-1, keepdims=True)
  return g_out - jnp.exp(out) * total, None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def _ce(logits, labels, targets):
  del targets
  return _cross_entropy(logits, labels)


def _dlr(logits, labels, targets):
  del targets
  return dlr_loss(logits, labels)


def _targeted_ce(logits, labels, targets):
  del labels
  return -_cross_entropy(logits, targets)


LOSS_FNS = {
  'ce': _ce,
  'dlr': _dlr,
  'dlr-targeted': targeted_dlr_loss,
  'ce-targeted': _targeted_ce,
}
