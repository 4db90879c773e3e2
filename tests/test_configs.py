"""Every config file and variant loads and passes validation."""

import importlib.util
import os

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
