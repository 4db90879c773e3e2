"""AutoAttack's versions: which attacks run, in what order, with what settings.

The reference's names and settings of each attack in each version
(`attack_settings`, `resolve_attacks`), the XLA:CPU options the attacks
compile with, and which settings the APGD attacks of one call may differ in
and still share one compiled program (`apgd_choice`, `apgd_shared`). The
driver that runs them is `fdjax.attacks.ensemble`, which re-exports these
names.
"""

from collections.abc import Sequence
from typing import Any

ATTACK_NAMES = ('apgd-ce', 'apgd-dlr', 'apgd-t', 'fab', 'fab-t', 'square')
"""The reference's attack names, in its canonical order."""

VERSIONS = ('standard', 'plus', 'rand', 'custom')

VERSION_ATTACKS = {
  'standard': ('apgd-ce', 'apgd-t', 'fab-t', 'square'),
  'plus': ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t'),
  'rand': ('apgd-ce', 'apgd-dlr'),
}

CPU_COMPILER_OPTIONS = {
  name: {'xla_cpu_use_fusion_emitters': False}
  for name in ('apgd-ce', 'apgd-dlr', 'apgd-t', 'fab', 'fab-t')
}
"""XLA:CPU options AutoAttack's attacks compile with by default: XLA's
older fusion emitters compile APGD and FAB in about 55% of the time at the
same speed on this project's CPU (docs/autoattack.md); Square, whose
5,000 small iterations run twice as long with them, keeps the defaults."""

APGD_ATTACKS = ('apgd-ce', 'apgd-dlr', 'apgd-t')
"""The APGD attacks: those that may share one program (`apgd_choice`)."""

RANDOMIZED_ATTACKS = APGD_ATTACKS
"""The attacks that can run on a randomised model (``randomized=True``)."""


def attack_settings(version: str, name: str) -> dict[str, Any]:
  """The reference's settings of one attack in one version.

  Args:
    version: 'standard', 'plus', 'rand' or 'custom' (custom uses the
      standard settings).
    name: one of `ATTACK_NAMES`.

  Returns:
    Keyword arguments for the attack function.

  Examples:
    >>> attack_settings('plus', 'apgd-ce')
    {'loss': 'ce', 'num_steps': 100, 'num_restarts': 5}
    >>> attack_settings('rand', 'apgd-dlr')
    {'loss': 'dlr', 'num_steps': 100, 'num_restarts': 1, 'eot_iter': 20}
  """
  restarts = 5 if version == 'plus' else 1
  if version == 'rand' and name in ('apgd-ce', 'apgd-dlr'):
    loss = name.split('-')[1]
    return dict(loss=loss, num_steps=100, num_restarts=1, eot_iter=20)
  return {
    'apgd-ce': dict(loss='ce', num_steps=100, num_restarts=restarts),
    'apgd-dlr': dict(loss='dlr', num_steps=100, num_restarts=restarts),
    'apgd-t': dict(
      loss='dlr-targeted', num_steps=100, num_target_classes=9, num_restarts=1
    ),
    'fab': dict(num_steps=100, num_restarts=restarts),
    'fab-t': dict(num_steps=100, num_target_classes=9, num_restarts=1),
    'square': dict(num_queries=5000, p_init=0.8, rescale_schedule=False),
  }[name]


def resolve_attacks(
  version: str = 'standard', attacks: Sequence[str] | None = None
) -> tuple[str, ...]:
  """The attack names a version runs, in order.

  Args:
    version: one of `VERSIONS`.
    attacks: with version 'custom', the names to run (`ATTACK_NAMES`).

  Returns:
    A tuple of names.

  Raises:
    ValueError: an unknown version or name, or `attacks` with another
      version than 'custom'.

  Examples:
    >>> resolve_attacks('standard')
    ('apgd-ce', 'apgd-t', 'fab-t', 'square')
    >>> resolve_attacks('custom', ['square'])
    ('square',)
  """
  if version not in VERSIONS:
    raise ValueError(
      f'autoattack version={version!r} is not valid; valid: {list(VERSIONS)}.'
    )
  if version != 'custom':
    if attacks is not None:
      raise ValueError(
        f"attacks={attacks!r} needs version='custom' (got {version!r})."
      )
    return VERSION_ATTACKS[version]
  names = tuple(attacks or ())
  bad = [n for n in names if n not in ATTACK_NAMES]
  if not names or bad or len(set(names)) != len(names):
    raise ValueError(
      f'autoattack attacks={list(names)!r} is not valid; valid: a non-empty '
      f'list of distinct names of {list(ATTACK_NAMES)}.'
    )
  return names


APGD_CHOICES = ('loss', 'num_restarts', 'num_target_classes')
"""The settings in which APGD attacks sharing one program may differ."""


def apgd_choice(kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
  """(loss, num_restarts, num_target_classes) of an APGD attack's settings
  (`attack_settings` with any overrides), a choice of `apgd.apgd_switch`.

  Examples:
    >>> apgd_choice(attack_settings('standard', 'apgd-t'))
    ('dlr-targeted', 1, 9)
  """
  return tuple(kwargs.get(k) for k in APGD_CHOICES)


def apgd_shared(kwargs: dict[str, Any]) -> dict[str, Any]:
  """The settings an APGD attack shares with the others of its program.

  Examples:
    >>> apgd_shared(attack_settings('rand', 'apgd-ce'))
    {'num_steps': 100, 'eot_iter': 20}
  """
  return {k: v for k, v in kwargs.items() if k not in APGD_CHOICES}
