"""fdjax configs: the defaults of every section, and every check of them.

Every config in configs/ starts from `base_config()` and overrides what it
needs; any field can be overridden on the command line, e.g.
`--config.attack.num_steps=10`. `validate(config)` checks every section
before any work starts; each error names the field, the value and what is
valid, in one phrasing: ``FIELD=VALUE is not valid; valid: ...`` (a
`ConfigError`, which `fdjax.main` prints as one line). `check_run` adds the
checks that need the devices and the split sizes (batch divisibility,
`eval.num_examples` within the split, at least one training step).
"""

from collections.abc import Mapping
import math
from typing import Any

import ml_collections
import numpy as np

from fdjax import attacks
from fdjax import data
from fdjax import denoise
from fdjax import layers
from fdjax import models
from fdjax import parallel
from fdjax import preprocess
from fdjax import recipes
from fdjax.attacks import ensemble as autoattack

PAPER_EPSILON = attacks.PAPER_EPSILON  # 16 on the 0..255 scale.
PAPER_STEP_SIZE = attacks.PAPER_STEP_SIZE
LR_SCHEDULES = ('step', 'cosine')
MODEL_DTYPES = ('float32', 'bfloat16', 'float16')


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
  """Optimisation: the paper's recipe (docs/protocol.md)."""
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
      # Recipes (fdjax/recipes.py): 'pgd' (the paper's, config.attack),
      # 'fast' (FGSM from a random start, Wong et al. 2020), 'free'
      # (Shafahi et al. 2019), 'trades' (Zhang et al. 2019).
      recipe='pgd',
      trades_beta=6.0,  # TRADES' KL weight.
      fast_step_multiple=1.25,  # fast: FGSM step = this * attack.epsilon.
      free_replays=4,  # free: m optimizer updates per batch.
      # Moving average of params and BN statistics; 0 = off. Evaluation
      # uses it (eval.use_ema).
      ema_decay=0.0,
      ema_start_step=0,  # before it the average copies the weights.
      # Catastrophic-overfitting guard: every N steps (0 = off), clean, FGSM
      # and PGD accuracy on the first guard_num_examples training examples;
      # a collapse is PGD accuracy guard_max_drop below its best.
      guard_every_steps=0,
      guard_num_examples=128,
      guard_pgd_steps=10,
      guard_max_drop=0.2,
      guard_action='warn',  # 'warn' | 'stop' | 'rollback' (and stop).
    )
  )


def eval_config() -> ml_collections.ConfigDict:
  """Robustness evaluation (docs/protocol.md; fields: fdjax/evaluate.py)."""
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
      # AutoAttack (fdjax.attacks.autoattack) after the PGD attacks, at
      # eval.epsilon: '' (off), 'standard', 'plus', 'rand' (APGD-CE and
      # APGD-DLR averaging 20 gradient samples, for randomised defences;
      # fdjax's models are deterministic), or attack names separated by
      # commas ('apgd-ce,square'). Resumable per batch.
      autoattack='',
      autoattack_norm='linf',  # 'linf' | 'l2'.
      autoattack_steps=100,  # APGD and FAB iterations (the reference: 100).
      autoattack_target_classes=9,  # APGD-T and FAB-T targets.
      autoattack_queries=5000,  # Square's queries.
      autoattack_seed=0,
      # Black-box scoring (fdjax.attack_set): directories of adversarial
      # sets (--mode=attack outputs, or PNGs + labels.csv from other tools)
      # of this eval split; accuracy per set and all-or-nothing with clean.
      use_ema=True,  # evaluate train.ema_decay's average when there is one.
      adversarial_sets=(),
    )
  )


def attack_set_config() -> ml_collections.ConfigDict:
  """`--mode=attack`: a transfer attack's adversarial set (fdjax.attack_set).

  MI-FGSM by default; DI with `diversity_prob` > 0, TI with
  `ti_kernel_size` > 1 (the papers: mu 1.0, p 0.5, kernel 15 at 299 px).
  """
  return ml_collections.ConfigDict(
    dict(
      out='',  # the set's directory (required).
      name='',  # the set's name in tables; '' = basename of out.
      sources=(),  # source workdirs; () = --workdir; several: logit ensemble.
      epsilon=PAPER_EPSILON,
      num_steps=10,  # step size epsilon / num_steps.
      momentum=1.0,  # MI's decay mu; 0 = no momentum.
      diversity_prob=0.0,  # DI's probability p; 0 = no DI.
      diversity_scale=attacks.transfer.DIVERSITY_SCALE,  # DI's canvas/size.
      ti_kernel_size=1,  # TI's odd kernel size; 1 = no TI.
      ti_sigma=0.0,  # TI's std in pixels; 0 = (size - 1) / 6 (the authors').
      targeted=False,  # random targets (never the true label).
      loss='xent',  # 'xent' | 'margin'.
      seed=0,  # targets and DI's draws.
      global_batch_size=256,
      num_examples=-1,  # -1: the whole eval split.
    )
  )


def base_config() -> ml_collections.ConfigDict:
  """All sections with their defaults (an ImageNet ResNet-152)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config()
  config.data = data.default_data_config('imagenet2012')
  config.attack = attack_config()
  config.train = train_config()
  config.eval = eval_config()
  config.attack_set = attack_set_config()
  return config


EVAL_DEFAULTS = eval_config().to_dict()
"""The `config.eval` fields and their defaults; a missing field takes its."""


# ---------------------------------------------------------------------------
# Checks: one phrasing for every field.


class ConfigError(ValueError):
  """An invalid setting: its field, its value and what is valid (one line)."""


def _fail(field: str, value: Any, valid: str) -> None:
  raise ConfigError(f'{field}={value!r} is not valid; valid: {valid}.')


def check_choice(field: str, value: Any, valid: Any) -> None:
  valid = list(valid)
  if value not in valid:
    _fail(field, value, str(valid))


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _int(field: str, value: Any, low: int) -> None:
  if not _is_int(value) or value < low:
    words = {0: 'a non-negative integer', 1: 'a positive integer'}
    _fail(field, value, words.get(low, f'an integer >= {low}'))


def _number(
  field: str,
  value: Any,
  low: float,
  high: float = math.inf,
  *,
  low_open: bool = False,
  high_open: bool = False,
) -> None:
  ok = (
    isinstance(value, (int, float, np.integer, np.floating))
    and not isinstance(value, bool)
    and math.isfinite(value)
    or (high == math.inf and value == math.inf)
  )
  if ok:
    ok = (value > low if low_open else value >= low) and (
      value < high if high_open else value <= high
    )
  if not ok:
    if high == math.inf:
      _fail(field, value, f'a number {">" if low_open else ">="} {low:g}')
    lo = '(' if low_open else '['
    hi = ')' if high_open else ']'
    _fail(field, value, f'a number in {lo}{low:g}, {high:g}{hi}')


def validate_data(dc: ml_collections.ConfigDict) -> None:
  """Checks `config.data`.

  Raises:
    ValueError: the first invalid field, its value and what is valid.
  """
  check_choice('data.name', dc.name, data.DATASETS)
  check_choice('data.source', data.source_kind(dc), data.SOURCES[dc.name])
  check_choice(
    'data.corrupt_images',
    dc.get('corrupt_images', 'raise'),
    data.CORRUPT_IMAGES,
  )
  check_choice(
    'data.eval_resize', dc.get('eval_resize', 'pil'), preprocess.EVAL_RESIZES
  )
  _int('data.worker_processes', dc.get('worker_processes', 0), 0)
  check_choice('data.image_dtype', dc.image_dtype, data.IMAGE_DTYPES)
  check_choice(
    'data.resize_method', dc.resize_method, preprocess.RESIZE_METHODS
  )
  if dc.name == 'digits':
    for field in ('train_split', 'eval_split'):
      check_choice(f'data.{field}', dc[field], data.split_names('digits'))
  _int('data.image_size', dc.image_size, 1)
  for field in ('crop_padding', 'num_workers', 'prefetch'):
    _int(f'data.{field}', dc[field], 0)
  for field in ('min_crop_area', 'eval_crop_fraction'):
    _number(f'data.{field}', dc[field], 0.0, 1.0, low_open=True)
  for field in ('color_jitter', 'lighting_std'):
    _number(f'data.{field}', dc[field], 0.0)
  if dc.name == 'imagenet2012':
    # The jitter factors are 1 +- U(0, color_jitter).
    _number('data.color_jitter', dc.color_jitter, 0.0, 1.0, high_open=True)


def validate_model(mc: ml_collections.ConfigDict) -> None:
  """Checks `config.model` (and that it builds a network)."""
  check_choice('model.arch', mc.arch, models.ARCHS)
  if mc.get('stage_sizes') is None:
    valid = [d for d, s in models.STAGE_SIZES.items() if s is not None]
    check_choice('model.depth', mc.depth, valid)
  else:
    sizes = tuple(mc.stage_sizes)
    if not sizes or not all(_is_int(s) and s >= 1 for s in sizes):
      _fail('model.stage_sizes', sizes, 'a non-empty tuple of integers >= 1')
  _int('model.num_filters', mc.num_filters, 1)
  check_choice('model.stem', mc.stem, models.STEMS)
  check_choice('model.normalization', mc.normalization, models.NORMALIZATIONS)
  check_choice(
    'model.denoise_placement', mc.denoise_placement, models.DENOISE_PLACEMENTS
  )
  check_choice('model.denoise_op', mc.denoise_op, sorted(denoise.DENOISE_OPS))
  check_choice(
    'model.denoise_affinity', mc.denoise_affinity, denoise.AFFINITIES
  )
  if (
    not _is_int(mc.denoise_size)
    or mc.denoise_size < 1
    or not mc.denoise_size % 2
  ):
    _fail('model.denoise_size', mc.denoise_size, 'an odd integer >= 1')
  check_choice('model.dtype', mc.dtype, MODEL_DTYPES)
  check_choice('model.conv_impl', mc.conv_impl, layers.CONV_IMPLS)
  models.from_config(mc, num_classes=2)  # Unknown fields.


def validate_attack(ac: ml_collections.ConfigDict, field: str = 'attack'):
  """Checks an attack section (`config.attack`)."""
  _int(f'{field}.num_steps', ac.num_steps, 0)
  _number(f'{field}.epsilon', ac.epsilon, 0.0)
  _number(f'{field}.step_size', ac.step_size, 0.0)
  check_choice(f'{field}.norm', ac.norm, attacks.NORMS)
  check_choice(f'{field}.loss', ac.loss, attacks.LOSSES)
  _number(f'{field}.clean_start_prob', ac.clean_start_prob, 0.0, 1.0)
  if ac.num_steps > 0:  # An attack of size 0 would be clean training.
    for name in ('epsilon', 'step_size'):
      _number(f'{field}.{name}', ac[name], 0.0, low_open=True)


def validate_train(tc: ml_collections.ConfigDict) -> None:
  """Checks `config.train`."""
  check_choice('train.parallel', tc.parallel, parallel.BACKENDS)
  check_choice('train.lr_schedule', tc.lr_schedule, LR_SCHEDULES)
  for name in (
    'global_batch_size',
    'log_every_steps',
    'checkpoint_every_steps',
    'max_checkpoints',
  ):
    _int(f'train.{name}', tc[name], 1)
  if tc.num_steps != -1 and (not _is_int(tc.num_steps) or tc.num_steps < 1):
    _fail(
      'train.num_steps',
      tc.num_steps,
      'a positive integer, or -1 (use train.num_epochs)',
    )
  _number('train.num_epochs', tc.num_epochs, 0.0, low_open=True)
  _number('train.base_lr', tc.base_lr, 0.0, low_open=True)  # 0: no training.
  _number('train.warmup_start_lr', tc.warmup_start_lr, 0.0)
  _number('train.decay_factor', tc.decay_factor, 0.0, 1.0, low_open=True)
  _number('train.momentum', tc.momentum, 0.0, 1.0, high_open=True)
  epochs = tuple(tc.decay_epochs)
  if not all(
    isinstance(e, (int, float)) and not isinstance(e, bool) and e >= 0
    for e in epochs
  ):
    _fail('train.decay_epochs', epochs, 'a tuple of numbers >= 0')
  _number('train.adv_fraction', tc.adv_fraction, 0.0, 1.0)
  _number('train.label_smoothing', tc.label_smoothing, 0.0, 1.0)
  _number('train.weight_decay', tc.weight_decay, 0.0)
  _number('train.warmup_epochs', tc.warmup_epochs, 0.0)
  check_choice('train.recipe', tc.recipe, attacks.RECIPES)
  _number('train.trades_beta', tc.trades_beta, 0.0)
  _number('train.fast_step_multiple', tc.fast_step_multiple, 0.0, low_open=True)
  _int('train.free_replays', tc.free_replays, 1)
  _number('train.ema_decay', tc.ema_decay, 0.0, 1.0, high_open=True)
  _int('train.ema_start_step', tc.ema_start_step, 0)
  _int('train.guard_every_steps', tc.guard_every_steps, 0)
  for name in ('guard_num_examples', 'guard_pgd_steps'):
    _int(f'train.{name}', tc[name], 1)
  _number('train.guard_max_drop', tc.guard_max_drop, 0.0, 1.0, low_open=True)
  check_choice('train.guard_action', tc.guard_action, recipes.GUARD_ACTIONS)


def validate_attack_set(c: ml_collections.ConfigDict) -> None:
  """Checks `config.attack_set` (the output directory is checked by
  `--mode=attack`, which needs it)."""
  f = 'attack_set'
  sources = c.sources
  if isinstance(sources, str) or not all(
    isinstance(d, str) and d for d in tuple(sources or ())
  ):
    _fail(f'{f}.sources', sources, 'a tuple of workdirs')
  # The uint8 grid must meet every ball: 2 * 255 * epsilon >= 1.
  _number(f'{f}.epsilon', c.epsilon, 0.5 / 255, 1.0)
  _int(f'{f}.num_steps', c.num_steps, 1)
  _number(f'{f}.momentum', c.momentum, 0.0)
  _number(f'{f}.diversity_prob', c.diversity_prob, 0.0, 1.0)
  _number(f'{f}.diversity_scale', c.diversity_scale, 1.0, low_open=True)
  k = c.ti_kernel_size
  if not _is_int(k) or k < 1 or k % 2 == 0:
    _fail(f'{f}.ti_kernel_size', k, 'an odd integer >= 1')
  _number(f'{f}.ti_sigma', c.ti_sigma, 0.0)
  check_choice(f'{f}.loss', c.loss, attacks.LOSSES)
  _int(f'{f}.seed', c.seed, 0)
  _int(f'{f}.global_batch_size', c.global_batch_size, 1)
  if c.num_examples != -1:
    _int(f'{f}.num_examples', c.num_examples, 1)  # -1: the whole split.


def check_steps(field: str, steps: Any) -> tuple[int, ...]:
  steps = tuple(steps or ())
  if not all(_is_int(s) and s >= 1 for s in steps):
    _fail(field, steps, 'a tuple of integers >= 1')
  return tuple(int(s) for s in steps)


def resolve_eval_config(
  eval_config: ml_collections.ConfigDict | Mapping[str, Any] | None,
) -> ml_collections.ConfigDict:
  """`config.eval` with defaults (`EVAL_DEFAULTS`) filled in, checked.

  Args:
    eval_config: `config.eval`; missing fields take their defaults.

  Returns:
    A new `ConfigDict` with every field of `EVAL_DEFAULTS`.

  Raises:
    ValueError: an unknown field, or the first invalid one, with what is
      valid.

  Examples:
    >>> ec = resolve_eval_config({'pgd_steps': (10,)})
    >>> ec.pgd_steps, ec.restarts
    ((10,), 1)
    >>> resolve_eval_config({'restarts': 0})
    Traceback (most recent call last):
    ...
    fdjax.config_base.ConfigError: eval.restarts=0 is not valid; valid: a
    positive integer.
  """
  given = eval_config or {}
  if isinstance(given, ml_collections.ConfigDict):
    given = given.to_dict()
  unknown = sorted(set(given) - set(EVAL_DEFAULTS))
  if unknown:
    raise ValueError(
      f'unknown eval config field(s) {unknown}; valid: {sorted(EVAL_DEFAULTS)}.'
    )
  c = ml_collections.ConfigDict(dict(EVAL_DEFAULTS, **given))
  check_steps('eval.pgd_steps', c.pgd_steps)
  check_steps('eval.untargeted_steps', c.untargeted_steps)
  for field in (
    'global_batch_size',
    'restarts',
    'sanity_num_examples',
    'sanity_steps',
  ):
    _int(f'eval.{field}', c[field], 1)
  if c.num_examples != -1 and (
    not _is_int(c.num_examples) or c.num_examples < 1
  ):
    _fail(
      'eval.num_examples', c.num_examples, 'a positive integer, or -1 (all)'
    )
  for field in ('epsilon', 'step_size', 'sanity_large_epsilon'):
    _number(f'eval.{field}', c[field], 0.0, low_open=True)
  multiples = tuple(c.sanity_epsilon_multiples)
  if not multiples or any(not m > 0 for m in multiples):
    _fail(
      'eval.sanity_epsilon_multiples',
      multiples,
      'a non-empty tuple of numbers > 0',
    )
  for field in ('sanity_tolerance', 'sanity_max_zero_gradient_fraction'):
    _number(f'eval.{field}', c[field], 0.0, 1.0)
  check_choice('eval.untargeted_loss', c.untargeted_loss, attacks.LOSSES)
  autoattack_names(c.autoattack)
  check_choice('eval.autoattack_norm', c.autoattack_norm, attacks.NORMS)
  for field in ('autoattack_steps', 'autoattack_target_classes'):
    _int(f'eval.{field}', c[field], 1)
  _int('eval.autoattack_queries', c.autoattack_queries, 1)
  sets = c.adversarial_sets
  if isinstance(sets, str) or not all(
    isinstance(d, str) and d for d in tuple(sets or ())
  ):
    _fail('eval.adversarial_sets', sets, 'a tuple of directories')
  check_choice('eval.use_ema', c.use_ema, (True, False))
  channels = tuple(c.figure_channels)
  if not all(_is_int(ch) and ch >= 0 for ch in channels):
    _fail(
      'eval.figure_channels',
      channels,
      'channel indices >= 0 (empty: the channel mean)',
    )
  return c


def autoattack_names(value: str) -> tuple[str, tuple[str, ...]] | None:
  """`eval.autoattack` as (version, attack names); None when it is ''.

  Examples:
    >>> autoattack_names('apgd-ce,square')
    ('custom', ('apgd-ce', 'square'))
  """
  if not isinstance(value, str):
    _fail('eval.autoattack', value, "'', 'standard', 'plus', 'rand' or names")
  value = value.strip()
  if not value:
    return None
  if value in autoattack.VERSION_ATTACKS:
    return value, autoattack.VERSION_ATTACKS[value]
  names = tuple(n.strip() for n in value.split(','))
  valid = list(autoattack.ATTACK_NAMES)
  if not all(n in valid for n in names) or len(set(names)) != len(names):
    _fail(
      'eval.autoattack',
      value,
      f"'', 'standard', 'plus', 'rand' or distinct names of {valid} "
      "joined by ','",
    )
  return 'custom', names


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every section of a config before any work starts.

  Args:
    config: an fdjax config (`base_config()` and its overrides).

  Raises:
    ValueError: the first invalid field, its value and what is valid.

  Examples:
    >>> config = base_config()
    >>> validate(config)
    >>> config.attack.norm = 'l1'
    >>> validate(config)
    Traceback (most recent call last):
    ...
    fdjax.config_base.ConfigError: attack.norm='l1' is not valid; valid:
    ['linf', 'l2'].
  """
  _int('seed', config.seed, 0)
  validate_model(config.model)
  validate_attack(config.attack)
  validate_train(config.train)
  validate_eval(config)


def validate_eval(config: ml_collections.ConfigDict) -> None:
  """Checks what evaluation and prediction use: `data` and `eval`."""
  validate_data(config.data)
  resolve_eval_config(config.eval)
  if 'attack_set' in config:
    validate_attack_set(config.attack_set)


def check_run(
  config: ml_collections.ConfigDict,
  *,
  eval_devices: int,
  train_devices: int | None = None,
  num_train: int | None = None,
) -> None:
  """The checks that need the devices and the split sizes, before any work.

  Args:
    config: a validated config.
    eval_devices: the devices evaluation divides its batches among.
    train_devices: those of training; None checks evaluation only.
    num_train: training examples (default: the config's train split).

  Raises:
    ConfigError: a batch that does not divide among the devices,
      `eval.num_examples` beyond the eval split, or a run of zero steps.

  Examples:
    >>> config = base_config()
    >>> config.data = data.default_data_config('digits')
    >>> config.eval.num_examples = 300
    >>> check_run(config, eval_devices=1)
    Traceback (most recent call last):
    ...
    fdjax.config_base.ConfigError: eval.num_examples=300 is not valid; valid:
    -1 (all) or 1..297 (the examples of digits/test).
  """
  ec = resolve_eval_config(config.eval)
  dc = config.data
  for field, batch, devices in (
    ('eval.global_batch_size', ec.global_batch_size, eval_devices),
    ('train.global_batch_size', config.train.global_batch_size, train_devices),
  ):
    if devices is not None and batch % devices:
      _fail(field, batch, f'a multiple of {devices} (split among the devices)')
  info = data.dataset_info(dc)
  if ec.num_examples > info.num_eval:
    _fail(
      'eval.num_examples',
      ec.num_examples,
      f'-1 (all) or 1..{info.num_eval} (the examples of '
      f'{dc.name}/{dc.eval_split})',
    )
  if train_devices is None:
    return
  tc = config.train
  num_train = info.num_train if num_train is None else num_train
  steps_per_epoch = max(num_train // tc.global_batch_size, 1)
  if tc.num_steps == -1 and round(tc.num_epochs * steps_per_epoch) < 1:
    _fail(
      'train.num_epochs',
      tc.num_epochs,
      f'at least one step: > {0.5 / steps_per_epoch:.3g} at '
      f'{steps_per_epoch} steps per epoch',
    )


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
