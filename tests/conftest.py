"""Test setup: 8 fake CPU devices, set before JAX initialises."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# Scripts run by hand in the reference implementations' own venvs.
collect_ignore_glob = ['reference/*']


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory):
  """(config, workdir, final host state) of a finished tiny run: 6 steps,
  checkpoints at 2, 4 and 6. Copy the workdir before changing it."""
  import jax

  from fdjax import train
  from tests.test_train import digits_source
  from tests.test_train import tiny_config

  def config():
    return tiny_config(
      **{
        'train.num_steps': 6,
        'train.checkpoint_every_steps': 2,
        'train.log_every_steps': 2,
        'train.max_checkpoints': 3,
        'attack.num_steps': 0,  # Clean training: a quicker compile.
      }
    )

  workdir = str(tmp_path_factory.mktemp('trained'))
  _, state, _, _ = train.train(config(), workdir, train_source=digits_source())
  return config(), workdir, jax.device_get(state)
