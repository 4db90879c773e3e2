"""Tests of fdjax.evaluate on 8 fake CPU devices with real digits.

Most tests use a linear softmax classifier fitted to scikit-learn's digits
(clean accuracy about 97%, and attacks that succeed on part of the
examples, so that the counts being compared are not trivially 0 or 1); the
checkpoint test uses a tiny ResNet with denoising blocks.
"""

import functools
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
from sklearn.linear_model import LogisticRegression

from fdjax import attacks
from fdjax import checkpoints
from fdjax import config_base
from fdjax import data
from fdjax import evaluate
from fdjax import models
from fdjax import parallel
from fdjax import predict
from fdjax import preprocess
from fdjax import results

NUM_EXAMPLES = 40
BATCH = 16  # 3 global batches of 16 (the last one padded) on 8 devices.
EPSILON = 0.2  # Digits in [0, 1]: attacks break about 30% of them.


class Linear(nn.Module):
  """Softmax regression on flattened images, optionally gradient-masked."""

  num_classes: int = 10
  mask: str = 'none'  # 'none' | 'round' (gradient masking)

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    if self.mask == 'round':
      x = jnp.round(x * 8.0) / 8.0  # Zero gradient almost everywhere.
    z = nn.Dense(self.num_classes, name='dense')(x.reshape(x.shape[0], -1))
    return z


def data_config():
  dc = data.default_data_config('digits')
  dc.num_workers = 0  # Build batches in the caller: deterministic access.
  dc.prefetch = 0
  return dc


@functools.cache
def digits():
  """(train images, train labels, test images, test labels), float32."""
  dc = data_config()
  tr = data.get_source(dc, 'train')
  te = data.get_source(dc, 'test')

  def arrays(src, n):
    images = np.stack([src[i]['image'] for i in range(n)])
    return images, np.array([src[i]['label'] for i in range(n)])

  return (*arrays(tr, len(tr)), *arrays(te, NUM_EXAMPLES))


@functools.cache
def linear_weights():
  """float64 (W [192, 10], b [10]) of a logistic regression on digits."""
  x, y, _, _ = digits()
  lr = LogisticRegression(C=1.0, max_iter=2000).fit(
    x[..., 0].reshape(len(x), -1), y
  )
  # The model sees 3 identical channels: split each weight over them.
  return np.repeat(lr.coef_.T, 3, axis=0) / 3.0, lr.intercept_


def linear_variables():
  w, b = linear_weights()
  return {
    'params': {
      'dense': {
        'kernel': jnp.asarray(w, jnp.float32),
        'bias': jnp.asarray(b, jnp.float32),
      }
    }
  }


def source():
  _, _, images, labels = digits()
  return data.ArraySource(images, labels)


def make_config(**eval_fields):
  fields = dict(
    global_batch_size=BATCH,
    pgd_steps=(2, 4),
    epsilon=EPSILON,
    step_size=0.05,
    sanity=False,  # Tests of the sanity checks turn them on.
    sanity_num_examples=16,
    sanity_steps=4,
    figures=False,
    model_name='linear',
  )
  fields.update(eval_fields)
  return ml_collections.ConfigDict(dict(data=data_config(), eval=fields))


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def without_run_fields(results):
  skip = ('elapsed_s', 'files', 'resumed_from')
  return {k: v for k, v in results.items() if k not in skip}


def reference_logits(images):
  """float64 numpy logits of the linear model (independent of JAX)."""
  w, b = linear_weights()
  return np.asarray(images, np.float64).reshape(len(images), -1) @ w + b


def test_results_structure_json_and_table(tmp_path):
  config = make_config(untargeted_steps=(2,), sanity=True)
  r = evaluate.evaluate(
    Linear(), linear_variables(), config, workdir=str(tmp_path), source=source()
  )
  out = tmp_path / 'eval' / 'digits_test'
  with open(out / 'results.json') as f:
    assert json.load(f) == json.loads(json.dumps(r))
  assert r['num_examples'] == NUM_EXAMPLES
  assert list(r['attacks']) == [
    'targeted_pgd_2',
    'targeted_pgd_4',
    'untargeted_pgd_2',
  ]
  # Clean accuracy against a float64 numpy reference.
  _, _, images, labels = digits()
  ref = np.argmax(reference_logits(images), -1) == labels
  assert r['clean']['correct'] == ref.sum()
  assert r['clean']['accuracy'] == pytest.approx(ref.mean())
  # Per-example file: every example once, in order, all fields.
  rows = read_jsonl(out / 'per_example.jsonl')
  assert [row['index'] for row in rows] == list(range(NUM_EXAMPLES))
  assert [row['label'] for row in rows] == labels.tolist()
  assert {'targeted_pgd_4.target', 'untargeted_pgd_2.success'} <= set(rows[0])
  npz = np.load(out / 'per_example.npz')
  for name, a in r['attacks'].items():
    correct = npz[f'{name}.correct']
    assert a['correct'] == correct.sum()
    assert a['accuracy'] == pytest.approx(correct.mean())
    assert a['success'] == npz[f'{name}.success'].sum()
    assert 0.0 < a['accuracy'] < r['clean']['accuracy']  # Attacks bite.
  targeted = r['attacks']['targeted_pgd_2']
  assert targeted['step_size'] == pytest.approx(EPSILON / 2)  # max(step, e/n)
  assert r['attacks']['targeted_pgd_4']['step_size'] == pytest.approx(0.05)
  assert all(
    t != row['label']
    for row in rows
    for t in (row['targeted_pgd_2.target'], row['targeted_pgd_4.target'])
  )
  aon = r['all_or_nothing']
  robust = np.all([npz[f'{n}.correct'] for n in r['attacks']], axis=0)
  assert aon['correct'] == robust.sum()
  assert aon['accuracy'] <= min(a['accuracy'] for a in r['attacks'].values())
  assert r['sanity']['status'] == 'PASS', results.format_table(r)
  table = results.format_table(r)
  header = table.splitlines()[0]
  for title in (
    'model',
    'clean',
    '2-step PGD',
    '4-step PGD',
    'untargeted 2-step',
  ):
    assert title in header
  assert 'all-or-nothing' in header
  row = table.splitlines()[2]
  assert row.startswith(f'| linear | {100 * ref.mean():.1f} |')
  assert 'sanity checks of linear (first 16 examples): PASS' in table


def test_step_sweep_and_sanity_compile_once(monkeypatch):
  # Each per-device function may be traced once in all: a second step
  # sweep, other epsilons and a second evaluation reuse the compiled code.
  evaluate._compiled_cached.cache_clear()
  for name, n in (('_predict', 1), ('_input_grads', 1), ('_attack', 2)):
    fn = chex.assert_max_traces(getattr(evaluate, name), n=n)
    monkeypatch.setattr(evaluate, name, fn)
  config = make_config(
    pgd_steps=(1, 2, 3), untargeted_steps=(1, 3), restarts=2, sanity=True
  )
  evaluate.evaluate(Linear(), linear_variables(), config, source=source())
  config = make_config(
    pgd_steps=(5,), epsilon=0.1, untargeted_steps=(2,), sanity=True
  )
  evaluate.evaluate(Linear(), linear_variables(), config, source=source())
  evaluate._compiled_cached.cache_clear()


def linear_logits_fn(x):
  return Linear().apply(linear_variables(), x, train=False)


@functools.cache
def single_device_pgd(targeted):
  """fdjax.attacks.pgd on one device, steps traced (one compile)."""
  return jax.jit(
    lambda key, x, y, step, n: attacks.pgd(
      linear_logits_fn,
      key,
      x,
      y,
      epsilon=EPSILON,
      step_size=step,
      num_steps=n,
      targeted=targeted,
    )
  )


def single_device_attack(kind, images, labels, num_steps, restart=0):
  """The same attack with fdjax.attacks on one device, whole set at once."""
  key = jax.random.key(0)  # eval.seed
  ids = jnp.arange(len(labels))
  if kind == 'targeted' and restart == 0:
    adv, targets = attacks.targeted_pgd(
      linear_logits_fn,
      key,
      images,
      labels,
      num_classes=10,
      epsilon=EPSILON,
      step_size=0.05,
      num_steps=num_steps,
      example_ids=ids,
    )
  else:
    target_key, start_key = jax.random.split(key)
    if restart:
      start_key = jax.random.fold_in(start_key, restart)
    targets = attacks.random_targets(target_key, labels, 10, ids)
    step = attacks.paper_step_size(
      np.float32(EPSILON), np.float32(0.05), np.int32(num_steps)
    )
    adv = single_device_pgd(kind == 'targeted')(
      start_key,
      images,
      targets if kind == 'targeted' else labels,
      step,
      num_steps,
    )
  pred = np.argmax(reference_logits(np.asarray(adv)), -1)
  return pred, np.asarray(targets)


def test_counts_equal_single_device_computation():
  config = make_config(pgd_steps=(4,), untargeted_steps=(2,), restarts=2)
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  r = evaluate.evaluate(
    Linear(), linear_variables(), config, source=source(), mesh=mesh
  )
  _, _, images, labels = digits()
  for kind, steps in (('targeted', 4), ('untargeted', 2)):
    p0, targets = single_device_attack(kind, images, labels, steps, 0)
    p1, _ = single_device_attack(kind, images, labels, steps, 1)
    correct = (p0 == labels) & (p1 == labels)
    if kind == 'targeted':
      success = (p0 == targets) | (p1 == targets)
    else:
      success = ~correct
    a = r['attacks'][f'{kind}_pgd_{steps}']
    assert a['correct'] == correct.sum(), kind
    assert a['success'] == success.sum(), kind
    assert 0 < a['correct'] < NUM_EXAMPLES


def test_restarts_never_increase_accuracy(tmp_path):
  results, cols = {}, {}
  for restarts in (1, 3):
    config = make_config(restarts=restarts, untargeted_steps=(2,))
    workdir = str(tmp_path / f'r{restarts}')
    results[restarts] = evaluate.evaluate(
      Linear(), linear_variables(), config, workdir=workdir, source=source()
    )
    cols[restarts] = np.load(results[restarts]['files']['per_example_npz'])
  strictly_lower = False
  for name in results[1]['attacks']:
    c1, c3 = cols[1][f'{name}.correct'], cols[3][f'{name}.correct']
    assert np.all(c3 <= c1), name  # Per example: never robust again.
    assert np.all(cols[3][f'{name}.success'] >= cols[1][f'{name}.success'])
    a1 = results[1]['attacks'][name]['accuracy']
    a3 = results[3]['attacks'][name]['accuracy']
    assert a3 <= a1
    strictly_lower |= a3 < a1
    # The targets do not change between restarts.
    if name.startswith('targeted'):
      np.testing.assert_array_equal(
        cols[1][f'{name}.target'], cols[3][f'{name}.target']
      )
  assert strictly_lower  # More restarts found more adversarial examples.
  for r in results.values():
    accs = [a['accuracy'] for a in r['attacks'].values()]
    assert r['all_or_nothing']['accuracy'] <= min(accs)


class RecordingSource(data.ArraySource):
  """Records the examples read; optionally fails at one index."""

  def __init__(self, fail_at=None):
    _, _, images, labels = digits()
    super().__init__(images, labels)
    self.read = []
    self.fail_at = fail_at

  def __getitem__(self, index):
    if index == self.fail_at:
      raise KeyboardInterrupt('simulated interruption')
    self.read.append(int(index))
    return super().__getitem__(index)


def test_resume_after_interruption(tmp_path):
  config = make_config(untargeted_steps=(2,))
  variables = linear_variables()
  full = evaluate.evaluate(
    Linear(), variables, config, workdir=str(tmp_path / 'a'), source=source()
  )
  workdir = str(tmp_path / 'b')
  # Interrupted while reading the second batch: the first one is saved.
  with pytest.raises(KeyboardInterrupt):
    evaluate.evaluate(
      Linear(),
      variables,
      config,
      workdir=workdir,
      source=RecordingSource(fail_at=BATCH + 3),
    )
  path = os.path.join(workdir, 'eval', 'digits_test', 'per_example.jsonl')
  assert len(read_jsonl(path)) == BATCH
  with open(path, 'a') as f:  # A line torn by the interruption.
    f.write('{"index": 16, "label"')
  src = RecordingSource()
  resumed = evaluate.evaluate(
    Linear(), variables, config, workdir=workdir, source=src
  )
  assert src.read == list(range(BATCH, NUM_EXAMPLES))  # Only the rest.
  assert resumed['resumed_from'] == BATCH
  assert without_run_fields(resumed) == without_run_fields(full)
  full_path = tmp_path / 'a' / 'eval' / 'digits_test' / 'per_example.jsonl'
  assert read_jsonl(path) == read_jsonl(full_path)
  # Done: a third call attacks nothing.
  src = RecordingSource()
  again = evaluate.evaluate(
    Linear(), variables, config, workdir=workdir, source=src
  )
  assert src.read == [] and again['resumed_from'] == NUM_EXAMPLES
  # Another model starts afresh (and keeps the old file).
  other = jax.tree.map(lambda x: x * 0.5, variables)
  src = RecordingSource()
  evaluate.evaluate(Linear(), other, config, workdir=workdir, source=src)
  assert src.read == list(range(NUM_EXAMPLES))
  assert os.path.exists(path + '.stale')


def test_growing_num_examples_resumes(tmp_path):
  config = make_config(pgd_steps=(2,), num_examples=BATCH)
  first = evaluate.evaluate(
    Linear(), linear_variables(), config, workdir=str(tmp_path), source=source()
  )
  assert first['num_examples'] == BATCH
  config.eval.num_examples = -1
  src = RecordingSource()
  r = evaluate.evaluate(
    Linear(), linear_variables(), config, workdir=str(tmp_path), source=src
  )
  assert src.read == list(range(BATCH, NUM_EXAMPLES))
  assert r['num_examples'] == NUM_EXAMPLES


def test_sanity_checks_flag_masked_model():
  config = make_config(pgd_steps=(2,), sanity=True)
  # Logits of rounded pixels: a zero input gradient, as in gradient masking.
  r = evaluate.evaluate(
    Linear(mask='round'), linear_variables(), config, source=source()
  )
  s = r['sanity']
  assert s['status'] == 'WARN'
  grads = s['checks']['input_gradients']
  assert grads['status'] == 'WARN'
  assert grads['zero_fraction'] == 1.0
  assert s['checks']['large_epsilon_breaks_model']['status'] == 'WARN'
  assert '[WARN] input_gradients' in results.format_table(r)


def test_sanity_checks_pass_normal_model_with_numbers():
  config = make_config(pgd_steps=(2, 4), untargeted_steps=(4,), sanity=True)
  r = evaluate.evaluate(Linear(), linear_variables(), config, source=source())
  checks = r['sanity']['checks']
  assert r['sanity']['status'] == 'PASS', checks
  assert {c['status'] for c in checks.values()} == {'PASS'}
  sweep = checks['accuracy_falls_with_epsilon']
  assert sweep['epsilons'] == pytest.approx([0.0, 0.05, 0.1, 0.2, 0.4, 0.8])
  assert sweep['accuracy'][-1] == 0.0
  # Clean accuracy of the sanity subset against the numpy reference.
  _, _, images, labels = digits()
  ref = np.argmax(reference_logits(images[:16]), -1) == labels[:16]
  assert sweep['accuracy'][0] == pytest.approx(ref.mean())
  assert checks['input_gradients']['zero_fraction'] == 0.0
  steps = checks['more_steps_never_help']
  assert steps['num_steps'] == [2, 4]
  consistency = checks['untargeted_not_weaker']
  assert consistency['untargeted_accuracy'] <= consistency['targeted_accuracy']


def test_invalid_configs_fail_clearly():
  with pytest.raises(ValueError, match='pgd_steps'):
    config_base.resolve_eval_config({'pgd_steps': (0, 10)})
  with pytest.raises(ValueError, match='unknown eval config field'):
    config_base.resolve_eval_config({'pgd_stpes': (10,)})
  with pytest.raises(ValueError, match='untargeted_loss'):
    config_base.resolve_eval_config({'untargeted_loss': 'hinge'})
  with pytest.raises(ValueError, match='eval.global_batch_size 12'):
    evaluate.evaluate(
      Linear(),
      linear_variables(),
      make_config(global_batch_size=12),
      source=source(),
    )
  with pytest.raises(ValueError, match='num_examples=50 exceeds'):
    evaluate.evaluate(
      Linear(),
      linear_variables(),
      make_config(num_examples=50),
      source=source(),
    )


def test_format_table_several_models():
  def result(name, accs):
    return {
      'model': name,
      'num_examples': 10,
      'epsilon_255': 16.0,
      'restarts': 1,
      'clean': {'accuracy': 0.9},
      'attacks': {
        f'targeted_pgd_{s}': {
          'label': f'{s}-step PGD',
          'accuracy': a,
          'success_rate': 0.05,
        }
        for s, a in accs.items()
      },
      'all_or_nothing': {'accuracy': min(accs.values())},
    }

  table = results.format_table(
    [result('a', {10: 0.5, 100: 0.4}), result('b', {10: 0.6})]
  )
  lines = table.splitlines()
  assert lines[0] == (
    '| model | clean | 10-step PGD | 100-step PGD | all-or-nothing |'
  )
  assert lines[2] == '| a | 90.0 | 50.0 (5.0) | 40.0 (5.0) | 40.0 |'
  assert lines[3] == '| b | 90.0 | 60.0 (5.0) | - | 60.0 |'


def write_pngs(directory, n=5):
  rng = np.random.default_rng(0)
  os.makedirs(directory, exist_ok=True)
  names = []
  for i in range(n):
    h, w = 10 + 3 * i, 14 + i
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    name = f'img{i}.png' if i % 2 else f'IMG{i}.JPG'
    Image.fromarray(arr).save(os.path.join(directory, name))
    names.append(name)
  with open(os.path.join(directory, 'notes.txt'), 'w') as f:
    f.write('not an image')
  return sorted(names)


def test_predict_directory_matches_direct_predictions(tmp_path):
  names = write_pngs(tmp_path / 'imgs')
  out_csv = tmp_path / 'out' / 'predictions.csv'
  pred = predict.predict_directory(
    Linear(),
    linear_variables(),
    str(tmp_path / 'imgs'),
    str(out_csv),
    image_size=8,
    batch_size=3,
  )
  dc = data.default_data_config('imagenet2012')
  dc.image_size = 8
  expected = {}
  for name in names:
    with Image.open(tmp_path / 'imgs' / name) as im:
      x = preprocess.preprocess_eval(dc, np.asarray(im.convert('RGB')))
    logits = reference_logits(x[None].astype(np.float64) / 255.0)
    expected[name] = int(np.argmax(logits))
  assert pred == expected
  with open(out_csv) as f:
    lines = f.read().splitlines()
  assert lines == [f'{n},{expected[n]}' for n in names]
  with pytest.raises(ValueError, match='no image files'):
    predict.predict_directory(
      Linear(), linear_variables(), str(tmp_path / 'out'), str(out_csv)
    )


def tiny_denoise_checkpoint(workdir):
  """A tiny ResNet with denoising blocks, saved as fdjax.convert would."""
  settings = dict(
    arch='resnet',
    depth=0,
    stage_sizes=[1],
    num_filters=4,
    stem='cifar',
    num_classes=10,
    denoise_placement='stage',
    dtype='float32',
  )
  model = models.create_model(**settings)
  # Random values of the variables' shapes (no `init` to compile), with
  # non-zero BN scales so that every residual branch and block is active.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda s: rng.uniform(0.2, 0.6, s.shape).astype(s.dtype),
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3))),
  )
  manager = checkpoints.create_manager(workdir, enable_async=False)
  checkpoints.save(manager, 7, variables, meta={'model': settings}, force=True)
  manager.wait_until_finished()
  manager.close()
  return model, variables


def test_run_on_checkpoint_writes_table_and_figures(tmp_path):
  workdir = str(tmp_path / 'tiny')
  model, variables = tiny_denoise_checkpoint(workdir)
  config = make_config(
    num_examples=BATCH,
    pgd_steps=(2,),
    figures=True,
    model_name='',
    sanity=False,
  )
  config.model = ml_collections.ConfigDict({'depth': 999})  # Meta wins.
  r = evaluate.run(config, workdir)
  printed = results.format_table(r)
  assert printed.splitlines()[0].startswith('| model | clean | 2-step PGD')
  assert '| tiny |' in printed
  assert r['checkpoint_step'] == 7
  assert r['model'] == 'tiny'
  for name in ('accuracy_vs_steps', 'feature_maps'):
    path = r['files'][name]
    assert os.path.dirname(path) == os.path.join(workdir, 'eval', 'digits_test')
    with Image.open(path) as im:
      assert im.format == 'PNG' and min(im.size) > 100
      assert np.asarray(im.convert('L')).std() > 5  # Not a blank image.
  with open(os.path.join(workdir, 'eval', 'digits_test', 'results.json')) as f:
    assert json.load(f)['checkpoint_step'] == 7
  # The restored model computes what the saved one did.
  dc = data_config()
  x = data.get_source(dc, 'test')[0]['image'][None]
  restored, restored_vars, _, _ = checkpoints.load_model(config, workdir)
  np.testing.assert_allclose(
    restored.apply(restored_vars, x), model.apply(variables, x), rtol=1e-5
  )
  # Directory mode from the same checkpoint.
  names = write_pngs(tmp_path / 'imgs', n=3)
  out = predict.run_predict(
    config, workdir, str(tmp_path / 'imgs'), str(tmp_path / 'p.csv')
  )
  assert sorted(out) == names
  assert all(0 <= v < 10 for v in out.values())


def autoattack_config(**fields):
  defaults = dict(
    num_examples=NUM_EXAMPLES,
    pgd_steps=(4,),
    autoattack='apgd-ce,apgd-t,square',
    autoattack_steps=10,
    autoattack_target_classes=2,
    autoattack_queries=50,
  )
  return make_config(**{**defaults, **fields})


def test_autoattack_rows_table_and_all_or_nothing(tmp_path):
  r = evaluate.evaluate(
    Linear(),
    linear_variables(),
    autoattack_config(),
    workdir=str(tmp_path),
    source=source(),
  )
  aa = r['autoattack']
  assert aa['attacks'] == ['apgd-ce', 'apgd-t', 'square']
  assert r['clean_acc'] == pytest.approx(r['clean']['accuracy'])
  rows = [aa['rows'][n] for n in aa['attacks']]
  assert all(b <= a for a, b in zip([r['clean_acc']] + rows, rows))
  assert r['autoattack_acc'] == rows[-1] < r['clean_acc']
  # AutoAttack is stronger than the paper's 4-step targeted PGD here, and
  # the all-or-nothing row counts both.
  assert r['autoattack_acc'] <= r['attacks']['targeted_pgd_4']['accuracy']
  assert r['all_or_nothing']['attacks'][-1] == 'autoattack'
  assert r['all_or_nothing']['accuracy'] <= r['autoattack_acc']
  table = results.format_table(r)
  assert 'AutoAttack checks of linear: ok' in table
  assert '[ok] square:' in table
  assert 'AA apgd-ce' in table.splitlines()[0]
  assert 'AutoAttack (custom)' in table.splitlines()[0]
  npz = np.load(r['files']['per_example_npz'])
  broken_by = npz['autoattack.broken_by']
  assert np.mean(broken_by == -1) == pytest.approx(r['autoattack_acc'])
  np.testing.assert_array_equal(broken_by == 0, ~npz['clean_correct'])


def test_autoattack_resumes_after_the_last_finished_batch(tmp_path):
  config = autoattack_config(global_batch_size=8)
  straight = evaluate.evaluate(
    Linear(),
    linear_variables(),
    config,
    workdir=str(tmp_path / 'a'),
    source=source(),
  )
  # An interruption: keep the first three finished batches, and a torn
  # line (the batch in flight when the process died).
  workdir = tmp_path / 'b'
  evaluate.evaluate(
    Linear(),
    linear_variables(),
    config,
    workdir=str(workdir),
    source=source(),
  )
  log = workdir / 'eval' / 'digits_test' / 'autoattack.jsonl'
  lines = log.read_text().splitlines(keepends=True)
  assert len(lines) > 3
  log.write_text(''.join(lines[:3]) + lines[3][:10])
  resumed = evaluate.evaluate(
    Linear(),
    linear_variables(),
    config,
    workdir=str(workdir),
    source=source(),
  )
  assert resumed['autoattack']['resumed_batches'] == 3
  for key in ('rows', 'autoattack_acc', 'clean_acc'):
    assert resumed['autoattack'][key] == straight['autoattack'][key]
  np.testing.assert_array_equal(
    np.load(resumed['files']['per_example_npz'])['autoattack.broken_by'],
    np.load(straight['files']['per_example_npz'])['autoattack.broken_by'],
  )
  # The log holds each batch once.
  rows = [json.loads(x) for x in log.read_text().splitlines()]
  keys = [(row['attack'], row['batch']) for row in rows]
  assert len(keys) == len(set(keys))


_KILLED_EVAL = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
import test_evaluate as t
w = np.load({weights!r})
t.linear_weights = lambda: (w['w'], w['b'])
t.evaluate.evaluate(t.Linear(), t.linear_variables(),
                    t.autoattack_config(**{fields!r}), workdir={workdir!r},
                    source=t.source())
"""


def test_autoattack_sigkill_in_square_resumes_to_the_same_results(tmp_path):
  # A real kill -9 while Square runs, then the same command again: it
  # resumes after Square's last finished batch and ends as a run that was
  # never interrupted.
  import signal
  import subprocess
  import sys
  import time

  fields = dict(
    autoattack='apgd-ce,square',
    autoattack_queries=1000,
    global_batch_size=8,
    epsilon=0.08,
  )
  w, b = linear_weights()
  np.savez(tmp_path / 'w.npz', w=w, b=b)
  workdir = tmp_path / 'killed'
  script = _KILLED_EVAL.format(
    tests=os.path.dirname(__file__),
    weights=str(tmp_path / 'w.npz'),
    fields=fields,
    workdir=str(workdir),
  )
  log = workdir / 'eval' / 'digits_test' / 'autoattack.jsonl'

  def square_rows():
    if not log.exists():
      return []
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    return [r for r in rows if r['attack'] == 'square']

  proc = subprocess.Popen([sys.executable, '-c', script])
  deadline = time.time() + 300
  while not square_rows() and time.time() < deadline:
    assert proc.poll() is None, 'the evaluation ended before Square'
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len(square_rows())
  assert done >= 1
  subprocess.run([sys.executable, '-c', script], check=True)
  resumed = json.loads(
    (workdir / 'eval' / 'digits_test' / 'results.json').read_text()
  )
  straight = evaluate.evaluate(
    Linear(),
    linear_variables(),
    autoattack_config(**fields),
    workdir=str(tmp_path / 'straight'),
    source=source(),
  )
  square_batches = len(square_rows())
  assert done < square_batches, 'the kill came after Square had ended'
  assert resumed['autoattack']['resumed_batches'] >= 1 + done
  for key in ('rows', 'autoattack_acc', 'clean_acc'):
    assert resumed['autoattack'][key] == straight['autoattack'][key]
  npz = np.load(workdir / 'eval' / 'digits_test' / 'per_example.npz')
  np.testing.assert_array_equal(
    npz['autoattack.broken_by'],
    np.load(straight['files']['per_example_npz'])['autoattack.broken_by'],
  )
