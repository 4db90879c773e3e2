"""Adversarial attacks in pixel space: pure functions of explicit keys.

- `pgd`, `fgsm`, `example_losses` (`fdjax.attacks.gradient`): PGD under L-inf or
  L2, targeted or untargeted, cross-entropy or CW-margin loss.
- The paper's protocol (`fdjax.attacks.paper`): `random_targets`,
  `paper_step_size`, `clean_start_coin`, `PGDAttack` and `targeted_pgd`.
- `from_config` (`fdjax.attacks.factory`): the attack a config describes.
- The ball geometry every attack shares: `fdjax.attacks.ball`.
"""

from fdjax.attacks.ball import NORMS
from fdjax.attacks.ball import LogitsFn
from fdjax.attacks.factory import from_config
from fdjax.attacks.gradient import LOSSES
from fdjax.attacks.gradient import example_losses
from fdjax.attacks.gradient import fgsm
from fdjax.attacks.gradient import pgd
from fdjax.attacks.paper import PAPER_EPSILON
from fdjax.attacks.paper import PAPER_STEP_SIZE
from fdjax.attacks.paper import PGDAttack
from fdjax.attacks.paper import clean_start_coin
from fdjax.attacks.paper import paper_step_size
from fdjax.attacks.paper import random_targets
from fdjax.attacks.paper import targeted_pgd

__all__ = (
  'LOSSES',
  'NORMS',
  'PAPER_EPSILON',
  'PAPER_STEP_SIZE',
  'LogitsFn',
  'PGDAttack',
  'clean_start_coin',
  'example_losses',
  'fgsm',
  'from_config',
  'paper_step_size',
  'pgd',
  'random_targets',
  'targeted_pgd',
)
