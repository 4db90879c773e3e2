"""fdjax: Feature Denoising for Improving Adversarial Robustness in JAX.

The public face (implementation details live in the submodules):

- `fdjax.denoise`: pure denoising ops (non-local means, bilateral, mean,
  median, null) and their registry.
- `fdjax.models`: `DenoisingBlock`, `ResNet`, `create_model`, `VARIANTS`.
- `fdjax.attacks`: `pgd`, `fgsm`, `targeted_pgd`, `PGDAttack`,
  `random_targets`, `from_config`; transfer attackers `transfer_attack`,
  `TransferAttack`, `ensemble_logits_fn`.
- `fdjax.convert`: `load_tensorpack` for the original released weights.
- `fdjax.parallel`: meshes and `data_parallel` (shard_map or pmap).
- The system around them: `fdjax.config_base` (defaults and checks),
  `fdjax.data`, `fdjax.preprocess`, `fdjax.input_pipeline`, `fdjax.train`,
  `fdjax.evaluate`, `fdjax.attack_set` (adversarial sets on disk),
  `fdjax.sanity`, `fdjax.results`, `fdjax.predict`,
  `fdjax.plots`, `fdjax.checkpoints`, `fdjax.main`.
"""

from fdjax import attacks
from fdjax import convert
from fdjax import denoise
from fdjax import models
from fdjax import parallel
from fdjax.attacks import PGDAttack
from fdjax.attacks import fgsm
from fdjax.attacks import pgd
from fdjax.attacks import random_targets
from fdjax.attacks import targeted_pgd
from fdjax.convert import load_tensorpack
from fdjax.models import VARIANTS
from fdjax.models import DenoisingBlock
from fdjax.models import ResNet
from fdjax.models import create_model

__version__ = '0.1.0'

__all__ = (
  'VARIANTS',
  'DenoisingBlock',
  'PGDAttack',
  'ResNet',
  'attacks',
  'convert',
  'create_model',
  'denoise',
  'fgsm',
  'load_tensorpack',
  'models',
  'parallel',
  'pgd',
  'random_targets',
  'targeted_pgd',
)
