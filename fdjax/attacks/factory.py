"""Attacks from configs: one factory for training, evaluation and tests.

Configs name attacks with strings and numbers (`config.attack`, the eval
sweep); `from_config` resolves them once into a static, hashable attack
callable ``attack(logits_fn, key, images, labels, *, example_ids, ...)``
that the jitted step functions close over.
"""

from collections.abc import Mapping
from typing import Any

from fdjax.attacks import paper
from fdjax.attacks import trades

RECIPES = ('pgd', 'fast', 'free', 'trades')
"""Training recipes (`config.train.recipe`); see `training_attack`."""

ATTACK_FIELDS = (
  'num_steps',
  'epsilon',
  'step_size',
  'targeted',
  'norm',
  'loss',
)


def from_config(
  attack_config: Mapping[str, Any], num_classes: int
) -> paper.PGDAttack | None:
  """The attack a config section describes (`config.attack`).

  Args:
    attack_config: a mapping with `num_steps`, `epsilon`, `step_size`,
      `targeted`, `norm` and `loss` (see `fdjax/config_base.py`).
    num_classes: the classifier's number of classes (random targets).

  Returns:
    A `fdjax.attacks.PGDAttack`, or None when `num_steps` is 0 (no attack:
    clean training).

  Examples:
    >>> attack = from_config(dict(num_steps=10, epsilon=16 / 255,
    ...     step_size=1 / 255, targeted=True, norm='linf', loss='xent'), 10)
    >>> attack.num_steps, attack.targeted
    (10, True)
  """
  c = {k: attack_config[k] for k in ATTACK_FIELDS}
  if int(c['num_steps']) == 0:
    return None
  return paper.PGDAttack(
    epsilon=float(c['epsilon']),
    step_size=float(c['step_size']),
    num_steps=int(c['num_steps']),
    targeted=bool(c['targeted']),
    norm=str(c['norm']),
    loss=str(c['loss']),
    num_classes=int(num_classes),
  )


def training_attack(
  attack_config: Mapping[str, Any],
  num_classes: int,
  recipe: str = 'pgd',
  *,
  fast_step_multiple: float = 1.25,
) -> paper.PGDAttack | trades.TradesAttack | None:
  """The attack a training recipe runs on every batch.

  * ``'pgd'``: the paper's, `from_config(attack_config)`.
  * ``'fast'`` (Wong et al. 2020): untargeted FGSM from a uniform random
    start in the ball, one step of ``fast_step_multiple * epsilon`` (1.25),
    projected back onto the ball.
  * ``'trades'``: TRADES' KL ascent (`fdjax.attacks.trades`) with the
    config's ``epsilon``, ``step_size``, ``num_steps`` and ``norm``.
  * ``'free'``: None; free training (Shafahi et al. 2019) perturbs with the
    gradient of its own training passes (`fdjax.train`).

  Raises:
    ValueError: an unknown recipe.
  """
  if recipe not in RECIPES:
    raise ValueError(f'train.recipe={recipe!r} is not valid; valid: {RECIPES}.')
  if recipe == 'pgd':
    return from_config(attack_config, num_classes)
  if recipe == 'free':
    return None
  epsilon = float(attack_config['epsilon'])
  if recipe == 'fast':
    return paper.PGDAttack(
      epsilon=epsilon,
      step_size=float(fast_step_multiple) * epsilon,
      num_steps=1,
      targeted=False,
      norm=str(attack_config['norm']),
      loss='xent',
      num_classes=int(num_classes),
    )
  return trades.TradesAttack(
    epsilon=epsilon,
    step_size=float(attack_config['step_size']),
    num_steps=int(attack_config['num_steps']),
    norm=str(attack_config['norm']),
  )
