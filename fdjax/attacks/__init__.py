"""Adversarial attacks in pixel space: pure functions of explicit keys.

- `pgd`, `fgsm`, `example_losses` (`fdjax.attacks.gradient`): PGD under L-inf or
  L2, targeted or untargeted, cross-entropy or CW-margin loss.
- The paper's protocol (`fdjax.attacks.paper`): `random_targets`,
  `paper_step_size`, `clean_start_coin`, `PGDAttack` and `targeted_pgd`.
- `from_config`, `training_attack` (`fdjax.attacks.factory`): the attack a
  config describes, and the one a training recipe runs.
- TRADES' KL ascent (`fdjax.attacks.trades`): `trades_pgd`, `kl_divergence`.
- AutoAttack (Croce & Hein 2020), one module per attack: `fdjax.attacks.apgd`
  (`apgd.apgd`, `apgd_targeted`, `dlr_loss`, `targeted_dlr_loss`),
  `fdjax.attacks.fab` (`fab.fab`, `fab_targeted`), `fdjax.attacks.square`
  (`square.square`), and the ensemble `AutoAttack` / `autoattack`
  (`fdjax.attacks.ensemble`; its versions in `fdjax.attacks.versions`).
- Transfer (black-box) attackers (`fdjax.attacks.transfer`):
  `transfer_attack` (MI-, DI-, TI-FGSM and their combinations),
  `TransferAttack`, and logit ensembles of source models
  (`ensemble_logits_fn`, `ensemble_apply`).
- The ball geometry every attack shares: `fdjax.attacks.ball`.
"""

from fdjax.attacks.apgd import apgd_targeted
from fdjax.attacks.apgd import dlr_loss
from fdjax.attacks.apgd import targeted_dlr_loss
from fdjax.attacks.ball import NORMS
from fdjax.attacks.ball import LogitsFn
from fdjax.attacks.ensemble import AutoAttack
from fdjax.attacks.ensemble import AutoAttackResult
from fdjax.attacks.ensemble import autoattack
from fdjax.attacks.fab import fab_targeted
from fdjax.attacks.factory import RECIPES
from fdjax.attacks.factory import from_config
from fdjax.attacks.factory import training_attack
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
from fdjax.attacks.trades import TradesAttack
from fdjax.attacks.trades import kl_divergence
from fdjax.attacks.trades import trades_pgd
from fdjax.attacks.transfer import TransferAttack
from fdjax.attacks.transfer import ensemble_apply
from fdjax.attacks.transfer import ensemble_logits_fn
from fdjax.attacks.transfer import transfer_attack

__all__ = (
  'AutoAttack',
  'AutoAttackResult',
  'apgd_targeted',
  'autoattack',
  'dlr_loss',
  'fab_targeted',
  'targeted_dlr_loss',
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
  'TransferAttack',
  'ensemble_apply',
  'ensemble_logits_fn',
  'transfer_attack',
  'RECIPES',
  'TradesAttack',
  'kl_divergence',
  'trades_pgd',
  'training_attack',
)
