"""TRADES (Zhang et al. 2019): the KL divergence and its inner attack.

TRADES trains on ``CE(f(x), y) + beta * KL(p(x) || p(x'))`` where ``x'``
maximises the KL divergence in the epsilon ball. The inner attack starts at
``x + 0.001 * N(0, 1)`` (one ``fold_in(key, example_id)`` per example, as
every fdjax attack) and takes ``num_steps`` sign-gradient (L-inf) or
normalised-gradient (L2) ascent steps of the summed per-example KL against
the clean probabilities, projecting onto the ball and the bounds after each
step (the reference implementation's ``trades.py``). The clean probabilities
are held fixed during the attack; the outer loss (`fdjax.recipes`)
differentiates through both.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fdjax.attacks import ball
from fdjax.attacks.ball import LogitsFn

START_STD = 0.001
"""The standard deviation of TRADES' Gaussian start (the reference's)."""


def kl_divergence(
  clean_logits: jax.typing.ArrayLike, adv_logits: jax.typing.ArrayLike
) -> jax.Array:
  """Per-example KL(p_clean || p_adv) of softmax probabilities, in float32.

  Args:
    clean_logits: [batch, num_classes] logits of the clean images.
    adv_logits: [batch, num_classes] logits of the perturbed images.

  Returns:
    [batch] float32 divergences ``sum_k p_k (log p_k - log q_k)``.

  Examples:
    >>> z = jnp.array([[1.0, 2.0, 0.5]])
    >>> float(kl_divergence(z, z)[0])
    0.0
  """
  log_p = jax.nn.log_softmax(jnp.asarray(clean_logits, jnp.float32), -1)
  log_q = jax.nn.log_softmax(jnp.asarray(adv_logits, jnp.float32), -1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def trades_pgd(
  logits_fn: LogitsFn,
  key: jax.Array,
  images: jax.typing.ArrayLike,
  *,
  epsilon: jax.typing.ArrayLike,
  step_size: jax.typing.ArrayLike,
  num_steps: jax.typing.ArrayLike,
  norm: str = 'linf',
  bounds: tuple[Any, Any] = (0.0, 1.0),
  example_ids: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """TRADES' inner maximisation of KL(p(x) || p(x')) over the ball.

  Args:
    logits_fn: maps [batch, ...] images to [batch, num_classes] logits (the
      model in inference mode, see `fdjax.attacks.gradient`).
    key: PRNG key of the Gaussian start.
    images: [batch, ...] clean float images inside ``bounds``.
    epsilon: radius of the ball (may be traced).
    step_size: size of one step (may be traced).
    num_steps: ascent steps (may be traced; a ``lax.fori_loop``).
    norm: ``'linf'`` or ``'l2'``.
    bounds: (lo, hi) valid pixel range.
    example_ids: [batch] GLOBAL example ids; example i starts from
      ``fold_in(key, example_ids[i])``. Default ``arange(batch)``.

  Returns:
    The perturbed images, same shape and dtype as ``images``, through
    ``stop_gradient``.

  Raises:
    ValueError: an unknown norm, bad bounds or a bad batch.
  """
  ball.check_norm(norm)
  lo, hi = ball.check_bounds(bounds)
  labels = jnp.zeros(jnp.shape(images)[:1], jnp.int32)
  images, _, example_ids = ball.check_batch(images, labels, example_ids)
  batch = images.shape[0]
  dtype = jnp.promote_types(images.dtype, jnp.float32)
  x0 = images.astype(dtype)
  epsilon = jnp.asarray(epsilon, dtype)
  step_size = jnp.asarray(step_size, dtype)
  lo, hi = jnp.asarray(lo, dtype), jnp.asarray(hi, dtype)
  clean_logits = jax.lax.stop_gradient(ball.check_logits(logits_fn(x0), batch))

  def objective(x):
    logits = ball.check_logits(logits_fn(x), batch)
    return jnp.sum(kl_divergence(clean_logits, logits))

  grad_fn = jax.grad(objective)

  def body(_, x):
    x = x + step_size * ball.ascent_direction(grad_fn(x), norm)
    return ball.project(x, x0, epsilon, norm, lo, hi)

  keys = ball.example_keys(key, example_ids)
  noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], dtype))(keys)
  x = jax.lax.fori_loop(0, num_steps, body, x0 + START_STD * noise)
  x = ball.project(x, x0, epsilon, norm, lo, hi)  # Also for 0 steps.
  return jax.lax.stop_gradient(x.astype(images.dtype))


@dataclasses.dataclass(frozen=True)
class TradesAttack:
  """TRADES' inner attack with the training attack's call signature.

  The train step calls every training attack as `fdjax.attacks.PGDAttack`:
  ``attack(logits_fn, key, images, labels, *, example_ids, random_start,
  target_key)``. TRADES is untargeted and always starts from its Gaussian
  noise, so ``labels``, ``random_start`` and ``target_key`` are unused and
  the labels are returned as the attack labels.
  """

  epsilon: float
  step_size: float
  num_steps: int
  norm: str = 'linf'
  bounds: tuple[Any, Any] = (0.0, 1.0)
  targeted: bool = False

  def __call__(
    self,
    logits_fn: LogitsFn,
    key: jax.Array,
    images: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    example_ids: jax.typing.ArrayLike | None = None,
    random_start: Any = True,
    target_key: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    del random_start, target_key
    adv = trades_pgd(
      logits_fn,
      key,
      images,
      epsilon=self.epsilon,
      step_size=self.step_size,
      num_steps=self.num_steps,
      norm=self.norm,
      bounds=self.bounds,
      example_ids=example_ids,
    )
    return adv, jnp.asarray(labels)
