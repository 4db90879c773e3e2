"""Shared defaults of fdjax experiment configs (strings and numbers only).

Every config in configs/ starts from `base_config()` and overrides what it
needs; any field can be overridden on the command line, e.g.
`--config.attack.num_steps=10`.
"""

import ml_collections

PAPER_EPSILON = 16 / 255  # 16 on the 0..255 scale.
PAPER_STEP_SIZE = 1 / 255


def model_config() -> ml_collections.ConfigDict:
  """`fdjax.models.create_model` settings."""
  return ml_collections.ConfigDict(
    dict(
      arch='resnet',  # 'resnet' | 'resnext' (32x8d).
      depth=152,  # 50 | 101 | 152; 0 to use stage_sizes.
      stage_sizes=ml_collections.FieldReference(None, field_type=tuple),
      num_filters=64,
      stem='imagenet',  # 'imagenet' | 'cifar' (small images).
      normalization='tensorpack',  # 'tensorpack' (BGR, [-1,1]) | 'mean_std'.
      denoise_placement='none',  # 'none' | 'stage' (4 blocks) | 'all'.
      denoise_op='non_local',  # non_local|bilateral|mean|median|null.
      denoise_affinity='gaussian',  # 'gaussian' | 'dot_product'.
      denoise_embed=True,
      denoise_size=3,
      denoise_use_conv=True,
      denoise_residual=True,
      sync_batch_stats=False,  # False: per-device BN (the original).
      dtype='float32',  # compute dtype; 'bfloat16' on TPU.
      conv_impl='auto',  # 'auto' (matmul on CPU, XLA elsewhere)|'xla'|'matmul'.
    )
  )


def attack_config() -> ml_collections.ConfigDict:
  """The training attack: the paper's targeted L-inf PGD."""
  return ml_collections.ConfigDict(
    dict(
      num_steps=30,  # 0 trains without attacks (clean training).
      epsilon=PAPER_EPSILON,
      step_size=PAPER_STEP_SIZE,  # effective: max(step, eps / steps).
      targeted=True,  # random targets, as the paper.
      norm='linf',  # 'linf' | 'l2'.
      loss='xent',  # 'xent' | 'margin'.
      clean_start_prob=0.2,  # per device batch and step.
    )
  )


def train_config() -> ml_collections.ConfigDict:
  """Optimisation: the paper's recipe (SPEC.md section 5)."""
  return ml_collections.ConfigDict(
    dict(
      global_batch_size=4096,
      num_epochs=110.0,
      num_steps=-1,  # > 0 overrides num_epochs.
      base_lr=0.1,  # per 256 images: lr = base_lr * batch / 256.
      lr_schedule='step',  # 'step' | 'cosine'.
      warmup_epochs=5.0,
      warmup_start_lr=0.1,  # linear warmup from this (absolute).
      decay_epochs=(35.0, 70.0, 95.0),
      decay_factor=0.1,
      momentum=0.9,
      nesterov=True,
      weight_decay=1e-4,  # * sum(w^2) / 2 on conv and linear kernels.
      label_smoothing=0.1,
      adv_fraction=1.0,  # fraction of each batch that is adversarial.
      log_clean_accuracy=True,  # extra clean forward pass for metrics.
      parallel='shard_map',  # 'shard_map' | 'pmap'.
      log_every_steps=50,
      checkpoint_every_steps=1000,
      max_checkpoints=3,
    )
  )


def eval_config() -> ml_collections.ConfigDict:
  """Robustness evaluation (SPEC.md section 6; fields: fdjax/evaluate.py)."""
  return ml_collections.ConfigDict(
    dict(
      name='',  # results in workdir/eval/<name>/; '' = <dataset>_<split>.
      model_name='',  # the table's model column; '' = workdir basename.
      global_batch_size=256,
      num_examples=-1,  # -1: the whole eval split.
      # The paper's table: (10, 100, 1000, 2000).
      pgd_steps=(10, 100),
      targeted=True,  # pgd_steps: the paper's random-target PGD.
      epsilon=PAPER_EPSILON,
      step_size=PAPER_STEP_SIZE,  # effective: max(step, eps / steps).
      untargeted_steps=(),  # extra untargeted PGD attacks.
      untargeted_loss='xent',  # 'xent' | 'margin' (CW).
      restarts=1,  # robust only if every restart fails.
      seed=0,  # targets and random starts.
      figures=True,  # accuracy-vs-steps and feature-map PNGs.
      figure_channels=(),  # feature-map channels; () = channel mean.
      # Sanity checks against gradient masking (first N examples).
      sanity=True,
      sanity_num_examples=64,
      sanity_epsilon_multiples=(0.25, 0.5, 1.0, 2.0, 4.0),
      sanity_large_epsilon=0.5,  # accuracy must reach 0 here.
      sanity_steps=10,  # untargeted PGD steps of the epsilon sweep.
      sanity_tolerance=0.01,  # plus one example's worth of accuracy.
      sanity_max_zero_gradient_fraction=0.05,
    )
  )


def base_config() -> ml_collections.ConfigDict:
  """All sections with their defaults (an ImageNet ResNet-152)."""
  from fdjax import input_pipeline  # Imported lazily: configs are data.

  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config()
  config.data = input_pipeline.default_data_config('imagenet2012')
  config.attack = attack_config()
  config.train = train_config()
  config.eval = eval_config()
  return config


def make_smoke_run(config: ml_collections.ConfigDict) -> None:
  """Shrinks a config's run to a CPU smoke test (the `:small` variants).

  A few steps of 2-step PGD on batches of 16 and an evaluation of 32
  examples; the configs shrink the network themselves.
  """
  config.attack.num_steps = 2
  config.train.global_batch_size = 16
  config.train.num_steps = 4
  config.train.log_every_steps = 2
  config.train.checkpoint_every_steps = 2
  config.eval.global_batch_size = 16
  config.eval.num_examples = 32
  config.eval.pgd_steps = (2,)
