r"""ImageNet: the paper's models (Xie et al., CVPR 2019), one variant each.

  python -m fdjax.main --config=configs/imagenet.py:VARIANT \
      --workdir=DIR --config.data.data_dir=TFDS_DIR

VARIANT (the paper's result it targets: clean / 10-step / 100-step targeted
PGD top-1 at epsilon 16, docs/protocol.md):

  r152              ResNet-152 baseline           62.3 / 52.5 / 41.7
  r152_denoise      + 4 non-local Gaussian blocks 65.3 / 55.7 / 45.5
                    (= r152_nonlocal_gaussian; the released R152-Denoise)
  r152_nonlocal_dot + 4 non-local dot product     Table 1 of the paper
  r152_bilateral    + 4 bilateral (3x3) blocks    Table 1
  r152_mean         + 4 mean-filter (3x3) blocks  Table 1
  r152_median       + 4 median-filter (3x3) blocks Table 1
  r152_null         + 4 "1x1 only" blocks         Table 1
  r152_denoise_all  non-local Gaussian after every residual block
  x101_denoise_all  ResNeXt-101 32x8d, dot product after every block,
                    the CAAD 2018 winner          68.4 / 56.0 / 44.4

Any other name of `fdjax.models.VARIANTS` works too (r50, r101_denoise,
x101, ...). Append ',small' (e.g. `imagenet.py:r152_denoise,small`) for a
CPU smoke test with a tiny network at 32x32 and a few steps (still the real
pipeline).

Append ',robustbench' for RobustBench's ImageNet L-inf protocol beside the
paper's: the evaluation then measures untargeted robustness at epsilon
4/255 (step 1/255) with 10- and 100-step untargeted PGD and the standard
AutoAttack on the first 5,000 validation images (RobustBench's subset
size), instead of the paper's targeted PGD at 16/255. Training is the
paper's recipe either way.

The paper trained with 30-step PGD on 128 V100s (batch 4096) for 110 epochs:
about 52 h for R152 and 90 h for R152-Denoise. --config.data.data_dir holds
ImageNet prepared for tfds in ArrayRecord format, or, with
--config.data.source=folder, the JPEG tree train/WNID/*.JPEG, val/WNID/*
(docs/data.md). Evaluation resizes with OpenCV's bicubic as the original
(data.eval_resize='cv2', the released models' preprocessing).
"""

from fdjax import config_base
from fdjax import data
from fdjax import models


def get_config(arg: str | None = None):
  """`arg`: 'VARIANT' optionally followed by ',small' and ',robustbench'."""
  parts = (arg or 'r152_denoise').split(',')
  variant, options = parts[0], set(parts[1:])
  if variant not in models.VARIANTS or not options <= {'small', 'robustbench'}:
    raise ValueError(
      f'unknown config argument {arg!r} of configs/imagenet.py; valid: '
      f'one of {sorted(models.VARIANTS)}, optionally followed by ",small" '
      'and/or ",robustbench"'
    )
  config = config_base.base_config()
  config.model.update(models.variant(variant))
  config.data = data.default_data_config('imagenet2012')

  # The paper's recipe (docs/protocol.md).
  config.attack.num_steps = 30
  config.train.global_batch_size = 4096
  config.train.num_epochs = 110.0
  config.train.base_lr = 0.1
  config.train.warmup_epochs = 5.0
  config.train.decay_epochs = (35.0, 70.0, 95.0)
  config.eval.pgd_steps = (10, 100, 1000, 2000)
  if 'robustbench' in options:
    config.eval.pgd_steps = ()
    config.eval.epsilon = 4.0 / 255.0
    config.eval.step_size = 1.0 / 255.0
    config.eval.untargeted_steps = (10, 100)
    config.eval.autoattack = 'standard'
    config.eval.num_examples = 5000

  if 'small' in options:
    config.model.depth = 0
    config.model.stage_sizes = (1, 1, 1, 1)
    config.model.num_filters = 8
    config.model.stem = 'cifar'
    config.data.image_size = 32
    config.data.num_workers = 2
    config_base.make_smoke_run(config)
    if 'robustbench' in options:
      config.eval.untargeted_steps = (2, 4)
      config.eval.autoattack_steps = 2
      config.eval.autoattack_target_classes = 2
      config.eval.autoattack_queries = 10
    else:
      config.eval.pgd_steps = (2, 4)
  return config
