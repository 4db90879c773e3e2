r"""CIFAR-10: adversarial training of a ResNet with denoising blocks.

  python -m fdjax.main --config=configs/cifar10.py --workdir=DIR \
      --config.data.data_dir=TFDS_DIR

data_dir holds CIFAR-10 prepared for tfds in ArrayRecord format, or, with
--config.data.source=cifar_binary, the official binary archive
(cifar-10-binary.tar.gz or its cifar-10-batches-bin/; docs/data.md). The
attack is the usual CIFAR-10 setting, L-inf epsilon 8/255
(the paper's recipe is ImageNet-only; its users asked for a CIFAR-10 one):
10-step PGD with step 2/255, untargeted by default (`:targeted` uses the
paper's random-target protocol). A ResNet-50 with a cifar stem and 4
non-local Gaussian blocks; 110 epochs with the paper's step schedule scaled
to CIFAR-10. Expect roughly 80% clean / 45-50% PGD-10 accuracy (Madry-style
adversarial training of a ResNet of this size; not a result of the paper).

Variants: ':targeted', ':small' (a tiny network, a few steps, CPU).
"""

from fdjax import config_base
from fdjax import data


def get_config(arg: str | None = None):
  options = set((arg or '').split(',')) - {''}
  if not options <= {'small', 'targeted'}:
    raise ValueError(
      f'unknown config argument {arg!r} of configs/cifar10.py; valid: '
      "'', 'small', 'targeted' (comma-separated)"
    )
  config = config_base.base_config()
  config.model.depth = 50
  config.model.stem = 'cifar'
  config.model.denoise_placement = 'stage'
  config.data = data.default_data_config('cifar10')

  config.attack.epsilon = 8 / 255
  config.attack.step_size = 2 / 255
  config.attack.num_steps = 10
  config.attack.targeted = 'targeted' in options
  config.attack.clean_start_prob = 0.0

  config.train.global_batch_size = 256
  config.train.num_epochs = 110.0
  config.train.base_lr = 0.1
  config.train.warmup_epochs = 5.0
  config.train.warmup_start_lr = 0.01
  config.train.decay_epochs = (55.0, 80.0, 100.0)
  config.train.weight_decay = 5e-4

  config.eval.epsilon = 8 / 255
  config.eval.step_size = 2 / 255
  config.eval.pgd_steps = (10, 100)
  config.eval.targeted = 'targeted' in options

  if 'small' in options:
    config.model.depth = 0
    config.model.stage_sizes = (1, 1)
    config.model.num_filters = 8
    config_base.make_smoke_run(config)
  return config
