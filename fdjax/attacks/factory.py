"""Attacks from configs: one factory for training, evaluation and tests.

Configs name attacks with strings and numbers (`config.attack`, the eval
sweep); `from_config` resolves them once into a static, hashable attack
callable ``attack(logits_fn, key, images, labels, *, example_ids, ...)``
that the jitted step functions close over.
"""

from collections.abc import Mapping
from typing import Any

from fdjax.attacks import paper

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
