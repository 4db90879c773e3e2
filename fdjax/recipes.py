"""Training recipes beyond the paper's: TRADES, free AT, EMA, the guard.

The train step (`fdjax.train.train_step`) selects one recipe with
``config.train.recipe``:

* ``'pgd'``: the paper's (targeted PGD, cross-entropy on the adversarial
  batch).
* ``'fast'``: "Fast is better than free" (Wong et al. 2020): untargeted
  FGSM from a uniform random start, step 1.25 eps
  (`fdjax.attacks.training_attack`), cross-entropy on the result.
* ``'trades'``: TRADES (Zhang et al. 2019): `trades_loss` on the clean batch
  and the KL-ascent batch of `fdjax.attacks.trades`.
* ``'free'``: free adversarial training (Shafahi et al. 2019): each batch is
  replayed m times; every replay is one optimizer update, and the same
  backward pass gives the input gradient whose sign moves the perturbation
  (`free_perturbation_update`). The perturbation is carried across replays
  AND across batches (the original, not Wong's reset-per-batch variant); it
  lives in the train state (sharded over devices like the batch), so it is
  checkpointed and a resumed run continues exactly.

Independently of the recipe, ``config.train.ema_decay > 0`` keeps an
exponential moving average of the parameters and BatchNorm statistics
(`ema_update`) in the train state; evaluation uses it by default
(``config.eval.use_ema``).

The catastrophic-overfitting guard (`guard_accuracies`, `find_collapse`)
measures clean, FGSM and PGD accuracy on a fixed batch of training data
every ``train.guard_every_steps`` steps (Wong et al.'s early stopping).
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fdjax import attacks
from fdjax.attacks import ball

GUARD_ACTIONS = ('warn', 'stop', 'rollback')


def trades_loss(
  clean_logits: jax.Array,
  adv_logits: jax.Array,
  targets: jax.Array,
  beta: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """TRADES' outer loss: mean CE(clean) + beta * mean KL(clean || adv).

  Args:
    clean_logits: [batch, classes] logits of the clean images.
    adv_logits: [batch, classes] logits of the TRADES adversarial images.
    targets: [batch, classes] target distributions (one-hot, possibly
      label-smoothed) for the clean cross-entropy.
    beta: the weight of the KL term (the TRADES paper: 6).

  Returns:
    (loss, mean clean cross-entropy, mean KL), float32 scalars. The loss
    differentiates through both logits (the reference implementation).
  """
  xent = optax.softmax_cross_entropy(
    clean_logits.astype(jnp.float32), targets
  ).mean()
  kl = attacks.kl_divergence(clean_logits, adv_logits).mean()
  return xent + beta * kl, xent, kl


def free_perturbation_update(
  delta: jax.Array,
  input_grad: jax.Array,
  epsilon: jax.typing.ArrayLike,
  norm: str = 'linf',
) -> jax.Array:
  """Free AT's perturbation step: ascend by epsilon, project onto the ball.

  Args:
    delta: [batch, ...] the current perturbation.
    input_grad: [batch, ...] the training loss's gradient with respect to
      the perturbed input, from the same backward pass as the parameters'.
    epsilon: the ball's radius; also the step (Shafahi et al.).
    norm: ``'linf'`` (sign step, clip) or ``'l2'``.

  Returns:
    The new perturbation, inside the ball.
  """
  zero = jnp.zeros_like(delta)
  delta = delta + epsilon * ball.ascent_direction(input_grad, norm)
  return ball.project(delta, zero, epsilon, norm, -jnp.inf, jnp.inf)


def ema_update(
  ema: Any, new: Any, step: jax.Array, decay: float, start_step: int
) -> Any:
  """One step of the weights' exponential moving average.

  Before ``start_step`` the average is the current value itself; from it
  on, ``ema <- decay * ema + (1 - decay) * new``.

  Args:
    ema: a pytree of float arrays, the average so far.
    new: the same pytree after this step's update.
    step: the step just taken (0-based, a scalar).
    decay: in (0, 1).
    start_step: the first step that averages.

  Returns:
    The new average (same structure and dtypes as ``ema``).
  """
  rate = jnp.where(step >= start_step, decay, 0.0)
  return jax.tree.map(
    lambda e, n: (rate * e + (1.0 - rate) * n).astype(e.dtype), ema, new
  )


def guard_accuracies(
  logits_fn: attacks.LogitsFn,
  key: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  *,
  epsilon: float,
  pgd_steps: int,
  norm: str = 'linf',
) -> dict[str, jax.Array]:
  """Clean, FGSM and PGD accuracy of the guard's fixed batch.

  FGSM is untargeted, from the clean image, step epsilon; PGD is untargeted
  with ``pgd_steps`` steps of ``2.5 * epsilon / pgd_steps`` (Madry et al.)
  from a random start (``fold_in(key, i)`` per example, a fixed key so that
  every check attacks the same way).

  Returns:
    {'clean', 'fgsm', 'pgd'}: float32 accuracies in [0, 1].
  """
  ids = jnp.arange(images.shape[0])
  fgsm = attacks.fgsm(logits_fn, images, labels, epsilon=epsilon, norm=norm)
  pgd = attacks.pgd(
    logits_fn,
    key,
    images,
    labels,
    epsilon=epsilon,
    step_size=2.5 * epsilon / pgd_steps,
    num_steps=pgd_steps,
    norm=norm,
    example_ids=ids,
  )

  def accuracy(x):
    return jnp.mean(jnp.argmax(logits_fn(x), -1) == labels)

  return {
    'clean': accuracy(images),
    'fgsm': accuracy(fgsm),
    'pgd': accuracy(pgd),
  }


def find_collapse(
  history: list[dict[str, float]], max_drop: float
) -> dict[str, Any] | None:
  """The first guard check that shows catastrophic overfitting, in one of
  its two forms ('kind'):

  * ``'drop'``: PGD accuracy ``max_drop`` below its best earlier check
    while FGSM accuracy has not fallen as far (not ``max_drop`` below its
    value at that best check). Catastrophic overfitting takes PGD accuracy
    to about 0 within one epoch while FGSM accuracy holds or rises (Wong et
    al. 2020, whose early stopping stops on a 20-point drop). When FGSM
    accuracy falls with PGD's, the model lost its robustness to both
    attacks, a training instability (e.g. too high a learning rate early
    on) that training recovers from, not the single-step attack's blind
    spot: not a collapse (`find_instability`). A check without 'fgsm' is
    judged by PGD accuracy alone.
  * ``'masking'``: FGSM accuracy above clean accuracy and more than
    ``max_drop`` above PGD accuracy. A perturbation that helps the
    classifier means its input gradient no longer points to its errors
    (gradient masking, the "label leaking" of single-step training,
    Kurakin et al. 2017), and the multi-step attack still breaks it: a run
    that overfits catastrophically from its start never has robustness to
    lose, and only this form shows it. A healthy model's FGSM accuracy is
    below its clean accuracy. Checks without 'clean' and 'fgsm' skip it.

  The threshold is absolute: ordinary noise of a 128-example batch's
  accuracy is a few points (binomial, at most 4.4 points at accuracy 0.5),
  so the default 0.2 is several standard errors.

  Args:
    history: guard checks in step order, each with 'step' and 'pgd' (and
      'fgsm', 'clean').
    max_drop: the drop below the best earlier PGD accuracy, and the FGSM
      accuracy's excess over PGD's, that count as a collapse.

  Returns:
    The check at which the collapse shows, with 'kind', 'best_pgd' and
    'best_step' added (for 'masking', the best PGD check up to it), or
    None.

  Examples:
    >>> h = [dict(step=10, pgd=0.4, fgsm=0.5), dict(step=20, pgd=0.5,
    ...      fgsm=0.6), dict(step=30, pgd=0.05, fgsm=0.7)]
    >>> find_collapse(h, 0.2)['kind'], find_collapse(h[:2], 0.2)
    ('drop', None)
    >>> h[2]['fgsm'] = 0.1  # Both attacks' accuracy fell: an instability.
    >>> print(find_collapse(h, 0.2))
    None
    >>> find_collapse([dict(step=5, clean=0.3, fgsm=0.45, pgd=0.02)], 0.2)[
    ...     'kind']
    'masking'
  """
  best = None
  for check in history:
    kind = _judge(check, best, max_drop)
    if best is None or check['pgd'] >= best['pgd']:
      best = check
    if kind in ('drop', 'masking'):
      return dict(
        check, kind=kind, best_pgd=best['pgd'], best_step=best['step']
      )
  return None


def find_instability(
  history: list[dict[str, float]], max_drop: float
) -> dict[str, float] | None:
  """The last check, if its PGD and FGSM accuracies both fell ``max_drop``
  below those of the best earlier PGD check (a training instability, not
  `find_collapse`'s 'drop'), with 'best_pgd', 'best_fgsm' and 'best_step'
  added; else None."""
  if len(history) < 2:
    return None
  best = max(reversed(history[:-1]), key=lambda h: h['pgd'])  # The latest.
  last = history[-1]
  if _judge(last, best, max_drop) != 'instability':
    return None
  return dict(
    last, best_pgd=best['pgd'], best_fgsm=best['fgsm'], best_step=best['step']
  )


def _judge(check, best, max_drop) -> str | None:
  """A guard check against the best earlier PGD check (None if none):
  'drop' (PGD accuracy fell, FGSM's held), else 'masking', else
  'instability' (PGD and FGSM accuracy both fell), else None."""
  pgd_fell = best is not None and check['pgd'] < best['pgd'] - max_drop
  fgsm_fell = (
    pgd_fell
    and 'fgsm' in check
    and 'fgsm' in best
    and check['fgsm'] < best['fgsm'] - max_drop
  )
  if pgd_fell and not fgsm_fell:
    return 'drop'
  if (
    'fgsm' in check
    and 'clean' in check
    and check['fgsm'] > check['clean']
    and check['fgsm'] - check['pgd'] > max_drop
  ):
    return 'masking'
  return 'instability' if fgsm_fell else None
