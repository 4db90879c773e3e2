"""Tests of the adversarial train step, the training loop and resuming."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fdjax import checkpoints
from fdjax import config_base
from fdjax import data
from fdjax import input_pipeline
from fdjax import models
from fdjax import parallel
from fdjax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_small_config() -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(
    'default_config', os.path.join(ROOT, 'configs', 'default.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('small')


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """configs/default.py:small, smaller still, for in-process tests."""
  config = default_small_config()
  config.model.stage_sizes = (1, 1)
  config.model.num_filters = 4
  config.attack.epsilon = 0.1
  config.attack.step_size = 0.05
  config.attack.clean_start_prob = 0.0
  config.train.num_steps = 3
  config.train.base_lr = 0.4
  config.train.warmup_epochs = 0.0
  config.train.warmup_start_lr = 0.1
  config.train.weight_decay = 1e-4
  config.train.log_every_steps = 1
  config.eval.epsilon = config_base.PAPER_EPSILON
  config.eval.step_size = config_base.PAPER_STEP_SIZE
  config.eval.num_examples = 16
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


def digits_source(n=64, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 1, (n, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 10, n).astype(np.int32)
  return data.ArraySource(images, labels)


def run_steps(config, mesh, backend, num_steps=2, source=None):
  """A few train steps on fixed batches; returns the final host state."""
  info = data.dataset_info(config.data)
  model = models.from_config(config.model, info.num_classes)
  lr_fn = train.create_learning_rate_fn(config.train, 4)
  tx = train.create_optimizer(config.train, lr_fn)
  tc = config.train
  state = train.create_train_state(
    jax.random.key(0),
    model=model,
    image_shape=info.image_shape,
    tx=tx,
    ema=tc.ema_decay > 0,
    free_batch_size=tc.global_batch_size if tc.recipe == 'free' else 0,
  )
  step = train.make_train_step(
    mesh,
    backend,
    model=model,
    tx=tx,
    learning_rate_fn=lr_fn,
    num_classes=info.num_classes,
    **train.recipe_step_kwargs(config, info.num_classes),
    label_smoothing=config.train.label_smoothing,
    weight_decay=config.train.weight_decay,
  )
  it = input_pipeline.create_train_iter(
    config.data,
    global_batch_size=config.train.global_batch_size,
    seed=0,
    source=source or digits_source(),
    process_index=0,
    process_count=1,
  )
  metrics = []
  for _ in range(num_steps):
    batch = next(it)
    batch = {k: batch[k] for k in ('image', 'label', 'index')}
    state, m = step(state, batch)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def test_learning_rate_schedule_step_decay_and_warmup():
  tc = config_base.train_config()
  tc.global_batch_size = 512
  tc.warmup_epochs = 1.0
  tc.warmup_start_lr = 0.1
  tc.decay_epochs = (2.0, 3.0)
  tc.num_epochs = 4.0
  fn = train.create_learning_rate_fn(tc, steps_per_epoch=10)
  peak = 0.1 * 512 / 256
  np.testing.assert_allclose(fn(0), 0.1, rtol=1e-6)
  np.testing.assert_allclose(fn(5), 0.1 + (peak - 0.1) / 2, rtol=1e-6)
  np.testing.assert_allclose(fn(10), peak, rtol=1e-6)
  np.testing.assert_allclose(fn(19), peak, rtol=1e-6)
  np.testing.assert_allclose(fn(20), peak * 0.1, rtol=1e-6)
  np.testing.assert_allclose(fn(30), peak * 0.01, rtol=1e-6)
  tc.lr_schedule = 'cosine'
  fn = train.create_learning_rate_fn(tc, steps_per_epoch=10)
  np.testing.assert_allclose(fn(10), peak, rtol=1e-6)
  assert float(fn(39)) < 0.01 * peak
  tc.lr_schedule = 'linear'
  with pytest.raises(ValueError, match='cosine'):
    train.create_learning_rate_fn(tc, steps_per_epoch=10)


def test_weight_decay_only_on_kernels():
  params = {
    'conv0': {'kernel': jnp.full((1, 1, 2, 3), 2.0)},
    'conv0_bn': {'scale': jnp.full((3,), 5.0), 'bias': jnp.ones(3)},
    'linear': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2) * 7},
  }
  np.testing.assert_allclose(
    train.weight_decay_loss(params), 0.5 * (6 * 4.0 + 6 * 1.0)
  )


def _learning_config():
  return tiny_config(**{'train.base_lr': 6.4})  # lr 0.4 at batch 16.


@pytest.fixture(scope='module')
def shard_map_run():
  # The same 16 examples every step: the loss must fall.
  return run_steps(
    _learning_config(),
    parallel.make_mesh(),
    'shard_map',
    num_steps=3,
    source=digits_source(16),
  )


def test_train_step_reports_metrics(shard_map_run):
  state, metrics = shard_map_run
  config = _learning_config()
  lr_fn = train.create_learning_rate_fn(config.train, 4)
  assert int(state.step) == 3
  for step, m in enumerate(metrics):
    assert m['count'] == 16
    # A targeted success predicts the target, never the label.
    assert m['attack_success'] + m['adv_accuracy'] <= m['count']
    # The loss adds weight decay to the cross-entropy.
    assert m['loss'] > m['xent'] > 0
    np.testing.assert_allclose(m['learning_rate'], lr_fn(step), rtol=1e-6)
    assert np.isfinite(m['loss']) and m['grad_norm'] > 0
  # The same 16 examples every step: the loss falls.
  assert metrics[-1]['xent'] < metrics[0]['xent']
  np.testing.assert_allclose(
    metrics[-1]['param_norm'], optax.global_norm(state.params), rtol=1e-5
  )


def real_digits(n):
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = np.repeat(digits.images[:n, :, :, None] / 16.0, 3, axis=-1)
  return data.ArraySource(
    images.astype(np.float32), digits.target[:n].astype(np.int32)
  )


def test_train_step_descends_on_a_fixed_batch():
  # Clean training (no attack, no augmentation) on the same 16 digits: the
  # first update is a small gradient step, so the loss on the same examples
  # (seen again at step 2, in another order) must fall.
  config = tiny_config(**{
    'train.base_lr': 1.6, 'attack.num_steps': 0, 'data.augment': False,
  })  # fmt: skip
  _, metrics = run_steps(
    config,
    parallel.make_mesh(),
    'shard_map',
    num_steps=2,
    source=real_digits(16),
  )
  assert metrics[1]['loss'] < metrics[0]['loss']
  assert 'attack_success' not in metrics[0]


def test_shard_map_and_pmap_give_the_same_state(shard_map_run):
  a, ma = shard_map_run
  b, mb = run_steps(
    _learning_config(),
    parallel.make_mesh(),
    'pmap',
    num_steps=3,
    source=digits_source(16),
  )
  # The backends reduce in another order: after 3 steps the float rounding
  # differs by up to ~2e-5 on some CPU types (BatchNorm scales).
  chex.assert_trees_all_close(a.params, b.params, atol=5e-5, rtol=1e-4)
  chex.assert_trees_all_close(
    a.batch_stats, b.batch_stats, atol=5e-5, rtol=1e-4
  )
  np.testing.assert_allclose(ma[-1]['loss'], mb[-1]['loss'], rtol=1e-5)


def test_indivisible_batch_and_bad_config_fail_early(tmp_path):
  with pytest.raises(ValueError, match='multiple of 8'):
    train.train(
      tiny_config(**{'train.global_batch_size': 12}),
      str(tmp_path),
      train_source=digits_source(),
    )
  with pytest.raises(ValueError, match='shard_map'):
    config_base.validate(tiny_config(**{'train.parallel': 'vmap'}))
  with pytest.raises(ValueError, match='median'):
    config_base.validate(tiny_config(**{'model.denoise_op': 'gauss'}))
  with pytest.raises(ValueError, match='linf'):
    config_base.validate(tiny_config(**{'attack.norm': 'l1'}))
  with pytest.raises(ValueError, match='restarts'):
    config_base.validate(tiny_config(**{'eval.restarts': 0}))
  assert not os.path.exists(tmp_path / 'checkpoints')


class PoisonedSource(data.ArraySource):
  """Digits whose images turn to NaN after `clean_reads` reads."""

  def __init__(self, clean_reads, **kwargs):
    super().__init__(**kwargs)
    self.clean_reads, self.reads = clean_reads, 0

  def __getitem__(self, index):
    example = dict(super().__getitem__(index))
    self.reads += 1
    if self.reads > self.clean_reads:
      example['image'] = np.full_like(example['image'], np.nan)
    return example


def test_nan_stops_with_the_last_good_checkpoint(tmp_path):
  # Steps 0-2 see finite images, step 3 NaNs; a checkpoint is written after
  # step 1 (done=2). The data are read in order (no worker threads).
  config = tiny_config(
    **{'train.num_steps': 6, 'attack.num_steps': 0, 'data.num_workers': 0}
  )
  config.data.prefetch = 0
  clean = digits_source()
  source = PoisonedSource(
    3 * config.train.global_batch_size,
    images=np.stack([clean[i]['image'] for i in range(len(clean))]),
    labels=[clean[i]['label'] for i in range(len(clean))],
  )
  with pytest.raises(FloatingPointError) as e:
    train.train(config, str(tmp_path), train_source=source)
  message = str(e.value)
  assert 'non-finite loss, gradient or parameters at step 3' in message
  ckpt_dir = checkpoints.checkpoint_dir(str(tmp_path))
  assert f'The last good checkpoint is step 2 in {ckpt_dir}' in message
  # That checkpoint is finite and restores.
  variables, _, step = checkpoints.load_variables(str(tmp_path))
  assert step == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def _main_command(workdir, *extra):
  return [
      sys.executable, '-m', 'fdjax.main',
      '--config=configs/default.py:small', f'--workdir={workdir}',
      '--config.train.num_steps=8', '--config.train.log_every_steps=2',
      '--config.train.checkpoint_every_steps=2',
      '--config.eval.sanity=False', '--config.eval.figures=False', *extra,
  ]  # fmt: skip


def _env(num_devices=8, cache_dir=None):
  env = dict(os.environ)
  if cache_dir:  # Later runs of the same program skip XLA compilation.
    env['JAX_COMPILATION_CACHE_DIR'] = str(cache_dir)
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


# The paper's recipe; free AT (its perturbation carried in the state) with
# the weights' moving average (evaluated) and the overfitting guard.
# The paper's recipe resumes bit for bit in process after a damaged
# checkpoint (tests/test_checkpoints.py); the kill -9 here runs free AT
# (its perturbation carried in the sharded state), the moving average and
# the overfitting guard, the most state a run carries.
RESUME_CASES = {
  'free_ema_guard': (
    '--config.train.recipe=free', '--config.train.free_replays=2',
    '--config.train.ema_decay=0.5', '--config.train.ema_start_step=1',
    '--config.train.guard_every_steps=3',
    '--config.train.guard_num_examples=16',
    '--config.train.guard_pgd_steps=2',
  ),
}  # fmt: skip


@pytest.mark.parametrize('case', list(RESUME_CASES))
def test_sigkill_and_rerun_ends_like_an_uninterrupted_run(tmp_path, case):
  extra = RESUME_CASES[case]
  env = _env(cache_dir=tmp_path / 'xla_cache')
  straight = tmp_path / 'straight'
  subprocess.run(
    _main_command(straight, *extra),
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
    timeout=600,
  )
  killed = tmp_path / 'killed'
  proc = subprocess.Popen(
    _main_command(killed, *extra),
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 600
  while not (killed / 'checkpoints' / '4').exists():
    assert proc.poll() is None, 'training ended before it could be killed'
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / 'results.json').exists()
  rerun = subprocess.run(
    _main_command(killed, *extra),
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
    text=True,
    timeout=600,
  )
  # It resumed (from step 4 or later), rather than starting again.
  resumed = re.search(r'Resumed from step (\d+)', rerun.stderr)
  assert resumed and int(resumed[1]) >= 4, rerun.stderr[-3000:]
  a = json.loads((straight / 'results.json').read_text())
  b = json.loads((killed / 'results.json').read_text())
  for key in ('loss', 'adv_accuracy', 'grad_norm', 'param_norm'):
    assert a['train'][key] == pytest.approx(b['train'][key], rel=1e-6), key
  for results in (a['eval'], b['eval']):
    # Paths, the workdir's name and timings differ; the numbers must not.
    for key in ('files', 'model', 'elapsed_s'):
      results.pop(key, None)
  assert a['eval'] == b['eval']
  if case == 'free_ema_guard':
    assert 'Evaluating the averaged weights' in rerun.stderr
    guard = [(straight / 'guard.jsonl').read_text()]
    guard.append((killed / 'guard.jsonl').read_text())
    assert guard[0] == guard[1] and guard[0].count('\n') == 2  # Steps 3, 6.


def _final_log_line(text):
  """'step N/N  loss ..  adv_acc ..' of the last progress line (no speed)."""
  lines = re.findall(r'step (\d+)/(\d+)  loss (\S+)  adv_acc (\S+)', text)
  assert lines, text[-3000:]
  return lines[-1]


def test_local_launch_script_trains_two_processes_in_lockstep(tmp_path):
  """launch/local.sh: 2 processes x 2 CPU devices, joined by jax.distributed."""
  env = _env()
  env.pop('XLA_FLAGS')
  env.update(
    PYTHON=sys.executable, FDJAX_LOGDIR=str(tmp_path),
    FDJAX_DEVICES_PER_PROCESS='2',
  )  # fmt: skip
  workdir = tmp_path / 'workdir'
  # The evaluation runs AutoAttack over both processes too (its batches
  # split over the 4 devices, the results gathered).
  aa = [
    '--config.eval.autoattack=apgd-ce,apgd-t,square',
    '--config.eval.autoattack_steps=5',
    '--config.eval.autoattack_target_classes=2',
    '--config.eval.autoattack_queries=50',
  ]
  cmd = ['bash', 'launch/local.sh', '2', *_main_command(workdir, *aa)[3:]]
  result = subprocess.run(
    cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
  )
  assert result.returncode == 0, result.stderr[-3000:]
  first = _final_log_line(result.stderr)
  second = _final_log_line((tmp_path / 'fdjax_process_1.log').read_text())
  assert first == second
  assert first[0] == first[1] == '8'
  assert 'JAX process 1/2' in (tmp_path / 'fdjax_process_1.log').read_text()
  results = json.loads((workdir / 'results.json').read_text())
  assert results['train']['loss'] == pytest.approx(float(first[2]), abs=1e-4)
  # One process with 4 devices loads the 2-process checkpoint and gives
  # the same per-example results, AutoAttack's included.
  per_example = workdir / 'eval' / 'digits_test' / 'per_example.npz'
  with np.load(per_example) as f:
    two_processes = dict(f)
  shutil.rmtree(workdir / 'eval')
  one = subprocess.run(
    _main_command(workdir, '--mode=eval', *aa), cwd=ROOT, env=_env(4),
    capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert one.returncode == 0, one.stderr[-3000:]
  with np.load(per_example) as f:
    one_process = dict(f)
  assert 'autoattack.broken_by' in one_process
  assert set(one_process) == set(two_processes)
  for name, values in one_process.items():
    np.testing.assert_array_equal(values, two_processes[name], err_msg=name)
