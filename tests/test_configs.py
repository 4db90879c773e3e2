"""Every config file and variant loads and passes validation."""

import importlib.util
import os
import subprocess
import sys

import pytest

from fdjax import config_base
from fdjax import models

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs')


def load(name):
  spec = importlib.util.spec_from_file_location(
    name, os.path.join(CONFIGS, f'{name}.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _variants():
  imagenet = sorted(models.VARIANTS)
  yield 'default', None
  yield 'default', 'small'
  yield 'default', 'blackbox'
  for arg in (None, 'small', 'targeted', 'small,targeted'):
    yield 'cifar10', arg
  for variant in imagenet:
    yield 'imagenet', variant
    yield 'imagenet', variant + ',small'
  yield 'imagenet', 'r152_denoise,robustbench'
  yield 'imagenet', 'r152_denoise,small,robustbench'


@pytest.mark.parametrize('name,arg', list(_variants()))
def test_config_loads_and_validates(name, arg):
  config = load(name).get_config(arg)
  config_base.validate(config)
  config.to_json()  # Strings and numbers only: saved beside checkpoints.
  if arg and 'small' in arg:
    assert config.train.num_steps > 0 and config.train.global_batch_size <= 16


def test_imagenet_robustbench_variant_is_untargeted_at_4_255():
  ec = load('imagenet').get_config('r152_denoise,robustbench').eval
  assert ec.epsilon == pytest.approx(4 / 255) and ec.pgd_steps == ()
  assert ec.untargeted_steps == (10, 100) and ec.autoattack == 'standard'
  assert ec.num_examples == 5000


def test_imagenet_variants_select_the_papers_models():
  imagenet = load('imagenet')
  x101 = imagenet.get_config('x101_denoise_all').model
  assert (x101.arch, x101.depth, x101.denoise_placement) == (
    'resnext',
    101,
    'all',
  )
  assert x101.denoise_affinity == 'dot_product' and not x101.denoise_embed
  for op in ('bilateral', 'mean', 'median', 'null'):
    model = imagenet.get_config(f'r152_{op}').model
    assert (model.depth, model.denoise_op) == (152, op)
  assert imagenet.get_config('r152').model.denoise_placement == 'none'


@pytest.mark.parametrize(
  'name,arg', [('default', 'big'), ('cifar10', 'huge'), ('imagenet', 'r18')]
)
def test_unknown_variant_names_the_valid_ones(name, arg):
  with pytest.raises(ValueError, match='valid'):
    load(name).get_config(arg)


def _small(**fields):
  config = load('default').get_config('small')
  for key, value in fields.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


@pytest.mark.parametrize(
  'field,value',
  [
    ('train.num_epochs', 0.0),
    ('train.num_steps', -5),
    ('train.base_lr', 0.0),
    ('train.decay_factor', 0.0),
    ('train.momentum', 1.0),
    ('train.decay_epochs', (-1.0,)),
    ('attack.epsilon', 0.0),
    ('model.dtype', 'float64'),
    ('model.stage_sizes', ()),
    ('eval.num_examples', 0),
  ],
)
def test_values_that_empty_or_change_a_run_are_refused(field, value):
  with pytest.raises(config_base.ConfigError) as e:
    config_base.validate(_small(**{field: value}))
  assert str(e.value).startswith(f'{field}={value!r} is not valid; valid: ')


def test_checks_that_need_devices_and_split_sizes():
  check = config_base.check_run
  with pytest.raises(config_base.ConfigError, match='multiple of 8'):
    check(_small(**{'eval.global_batch_size': 12}), eval_devices=8)
  with pytest.raises(config_base.ConfigError, match='1..297'):
    check(_small(**{'eval.num_examples': 298}), eval_devices=1)
  few = _small(**{'train.num_steps': -1, 'train.num_epochs': 0.001})
  config_base.validate(few)
  with pytest.raises(config_base.ConfigError, match='at least one step'):
    check(few, eval_devices=1, train_devices=1)
  check(_small(), eval_devices=8, train_devices=8)


def test_main_prints_a_config_error_as_one_line(tmp_path):
  workdir = tmp_path / 'w'
  result = subprocess.run(
    [
      sys.executable, '-m', 'fdjax.main', '--config=configs/default.py:small',
      f'--workdir={workdir}', '--config.eval.num_examples=1000',
    ],
    cwd=os.path.dirname(CONFIGS),
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )  # fmt: skip
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
    'FATAL Config error: eval.num_examples=1000 is not valid; valid: -1 '
    '(all) or 1..297 (the examples of digits/test).'
  )
  assert not workdir.exists()
