"""Adversarial sets on disk (fdjax.attack_set) and their scoring in evaluate.

A softmax regression fitted to digits is the source model and the defender
(8 fake CPU devices, 24 test digits, global batches of 8).
"""

import csv
import functools
import json
import os

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
from sklearn.linear_model import LogisticRegression

from fdjax import attack_set
from fdjax import config_base
from fdjax import data
from fdjax import evaluate
from fdjax import parallel
from fdjax import results

N, BATCH, EPS = 24, 8, 0.1


class Linear(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return nn.Dense(10, name='dense')(x.reshape(x.shape[0], -1))


def data_config():
  dc = data.default_data_config('digits')
  dc.num_workers = 0
  dc.prefetch = 0
  return dc


@functools.cache
def digits():
  dc = data_config()
  tr, te = data.get_source(dc, 'train'), data.get_source(dc, 'test')
  x = np.stack([tr[i]['image'] for i in range(600)])
  y = np.array([tr[i]['label'] for i in range(600)])
  lr = LogisticRegression(C=1.0, max_iter=300).fit(x.reshape(600, -1), y)
  variables = {
    'params': {
      'dense': {
        'kernel': jnp.asarray(lr.coef_.T, jnp.float32),
        'bias': jnp.asarray(lr.intercept_, jnp.float32),
      }
    }
  }
  xt = np.stack([te[i]['image'] for i in range(N)])
  yt = np.array([te[i]['label'] for i in range(N)])
  return variables, xt, yt


def source():
  _, x, y = digits()
  return data.ArraySource(x, y)


def make_config(out, **fields):
  config = ml_collections.ConfigDict(
    dict(
      data=data_config(),
      attack_set=config_base.attack_set_config(),
      eval=dict(
        global_batch_size=BATCH,
        pgd_steps=(),
        epsilon=EPS,
        sanity=False,
        figures=False,
        model_name='linear',
      ),
    )
  )
  a = config.attack_set
  a.out, a.epsilon, a.num_steps, a.global_batch_size = str(out), EPS, 3, BATCH
  a.diversity_prob, a.diversity_scale, a.ti_kernel_size = 0.5, 1.25, 3
  a.targeted = True
  for k, v in fields.items():
    a[k] = v
  return config


def make(out, **fields):
  variables, _, _ = digits()
  return attack_set.make_set(
    make_config(out, **fields),
    None,
    members=[(Linear(), variables, {'name': 'linear'})],
    source=source(),
    mesh=parallel.make_mesh(),
  )


def pngs(directory):
  return {
    f: (directory / f).read_bytes()
    for f in sorted(os.listdir(directory))
    if f.endswith('.png')
  }


def test_quantize_stays_in_ball_off_the_uint8_grid():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, 5000)  # Not on the uint8 grid.
  eps = rng.uniform(0.5 / 255, 0.05, 5000)
  a = np.clip(x + rng.uniform(-1.5, 1.5, 5000) * eps, 0, 1)  # Some outside.
  q = np.stack([attack_set.quantize(a[i], x[i], eps[i]) for i in range(5000)])
  assert q.dtype == np.uint8
  assert np.all(np.abs(q / 255.0 - x) <= eps + 1e-12)
  # Inside the ball, plain rounding; outside, the nearest grid point in it.
  inside = np.abs(np.round(a * 255) / 255 - x) <= eps
  np.testing.assert_array_equal(q[inside], np.round(a[inside] * 255))
  assert not inside.all()


def test_make_set_layout_ball_and_kill_resume_byte_identical(
  tmp_path, monkeypatch
):
  straight = make(tmp_path / 'a')
  assert straight['written'] == N and straight['method'] == 'MI-DI-TI-FGSM'
  a = pngs(tmp_path / 'a')
  assert sorted(a) == [attack_set.file_name(i) for i in range(N)]
  # Layout: labels.csv and provenance.json.
  with open(tmp_path / 'a' / 'labels.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  _, x, y = digits()
  assert [int(r['true_label']) for r in rows] == y.tolist()
  targets = np.array([int(r['target_label']) for r in rows])
  assert np.all((targets >= 0) & (targets != y))
  prov = json.loads((tmp_path / 'a' / 'provenance.json').read_text())
  assert prov['attack']['epsilon'] == EPS and prov['method'] == 'MI-DI-TI-FGSM'
  assert prov['sources'][0]['name'] == 'linear'
  # Every image is in the eps ball around the clean one, and moved.
  adv = np.stack(
    [np.asarray(Image.open(tmp_path / 'a' / f)) for f in sorted(a)]
  )
  dist = np.abs(adv / 255.0 - x)
  assert dist.max() <= EPS + 1e-9 and dist.max() > EPS / 2

  # A run killed in the middle: the 11th file fails mid-write (its temp
  # file is left behind), 10 images exist.
  calls = []
  original = attack_set.write_png

  def failing(path, image):
    if len(calls) == 10:
      with open(f'{path}.tmp999', 'wb') as f:
        f.write(b'\x89PNG half')
      raise KeyboardInterrupt('killed')
    calls.append(path)
    original(path, image)

  monkeypatch.setattr(attack_set, 'write_png', failing)
  with pytest.raises(KeyboardInterrupt):
    make(tmp_path / 'b')
  monkeypatch.setattr(attack_set, 'write_png', original)
  assert len(pngs(tmp_path / 'b')) == 10
  assert not (tmp_path / 'b' / 'labels.csv').exists()  # Incomplete.
  misses = attack_set._compiled_cached.cache_info().misses
  resumed = make(tmp_path / 'b')
  # The same attack, models and mesh: the compiled attack is reused.
  assert attack_set._compiled_cached.cache_info().misses == misses
  fn = attack_set.compiled(
    attack_set.attack_of(make_config('x').attack_set, 10),
    (Linear(),),
    parallel.make_mesh(),
  )
  assert fn._cache_size() == 1  # Traced once for all the batches of both.
  assert resumed['written'] == N - 10 and resumed['skipped'] == 10
  assert pngs(tmp_path / 'b') == a  # Byte-identical.
  assert not [f for f in os.listdir(tmp_path / 'b') if '.tmp' in f]
  assert (tmp_path / 'b' / 'labels.csv').read_bytes() == (
    tmp_path / 'a' / 'labels.csv'
  ).read_bytes()
  # Other settings into the same directory are refused, naming them.
  with pytest.raises(ValueError, match=r'other settings \(attack:'):
    make(tmp_path / 'b', epsilon=0.05)


def test_scoring_rows_all_or_nothing_and_other_tools_sets(tmp_path):
  make(tmp_path / 'mi')
  make(
    tmp_path / 'di',
    momentum=0.0,
    ti_kernel_size=1,
    targeted=False,
    name='di_set',
  )
  # A set from another tool: the clean images, no provenance.
  _, x, y = digits()
  other = tmp_path / 'other'
  other.mkdir()
  lines = ['filename,true_label,target_label']
  for i in range(N):
    name = f'{i:06d}.png'
    image = np.round(x[i] * 255).astype(np.uint8)
    Image.fromarray(image).save(other / name)
    lines.append(f'{name},{y[i]},')
  (other / 'labels.csv').write_text('\n'.join(lines) + '\n')

  variables, _, _ = digits()
  config = make_config(tmp_path / 'unused')
  config.eval.adversarial_sets = tuple(
    str(tmp_path / d) for d in ('mi', 'di', 'other')
  )
  r = evaluate.evaluate(
    Linear(), variables, config, source=source(), workdir=str(tmp_path / 'w')
  )
  names = ['set.mi', 'set.di_set', 'set.other']
  assert list(r['attacks']) == names
  npz = np.load(r['files']['per_example_npz'])
  model = Linear()
  for name, d in zip(names, ('mi', 'di', 'other')):
    images = np.stack(
      [
        np.asarray(Image.open(tmp_path / d / f'{i:06d}.png'), np.float32)
        for i in range(N)
      ]
    )
    pred = np.argmax(model.apply(variables, images / 255.0), -1)
    np.testing.assert_array_equal(npz[f'{name}.pred'], pred)
    assert r['attacks'][name]['correct'] == int(np.sum(pred == y))
  assert r['attacks']['set.mi']['targeted']
  assert r['attacks']['set.mi']['success'] == int(
    np.sum(npz['set.mi.pred'] == npz['set.mi.target'])
  )
  # The transfer (here: white-box) sets hurt; the clean copy does not.
  clean = r['clean']['accuracy']
  assert r['attacks']['set.di_set']['accuracy'] < clean - 0.1
  assert r['attacks']['set.other']['accuracy'] == pytest.approx(clean, abs=0.05)
  robust = npz['clean_correct'] & np.all(
    [npz[f'{n}.correct'] for n in names], 0
  )
  aon = r['all_or_nothing']
  assert aon['attacks'] == ['clean'] + names
  assert (
    aon['correct']
    == robust.sum()
    == r['adversarial_sets']['all_or_nothing']['correct']
  )
  table = results.format_table(r)
  assert table.splitlines()[0] == (
    '| model | clean | mi | di_set | other | all-or-nothing |'
  )


def test_mismatching_sets_are_refused_with_what_differs(tmp_path):
  make(tmp_path / 's')
  _, _, y = digits()
  sizes = (8, ('name', 'digits'))
  with pytest.raises(ValueError, match=r'24 images, the eval split 20'):
    attack_set.read_set(str(tmp_path / 's'), y[:20], sizes[0])
  with pytest.raises(ValueError, match=r'true labels differ'):
    attack_set.read_set(str(tmp_path / 's'), (y + 1) % 10, 8)
  with pytest.raises(ValueError, match=r'size 8x8 .* take 16x16'):
    attack_set.read_set(str(tmp_path / 's'), y, 16)
  with pytest.raises(ValueError, match=r"data.eval_split is 'test'"):
    attack_set.read_set(str(tmp_path / 's'), y, 8, {'eval_split': 'train'})
  os.remove(tmp_path / 's' / '000003.png')
  with pytest.raises(ValueError, match=r'1 files missing'):
    attack_set.read_set(str(tmp_path / 's'), y, 8)
  csv_path = tmp_path / 's' / 'labels.csv'
  lines = csv_path.read_text().splitlines()
  csv_path.write_text('\n'.join(lines[:5] + lines[6:]) + '\n')
  with pytest.raises(ValueError, match=r'missing \[4\]'):
    attack_set.read_set(str(tmp_path / 's'), y, 8)
  # The whole evaluation refuses before any work.
  config = make_config(tmp_path / 'x')
  config.eval.adversarial_sets = (str(tmp_path / 's'),)
  with pytest.raises(ValueError, match='does not match the eval split'):
    evaluate.evaluate(Linear(), digits()[0], config, source=source())
  bad = make_config(tmp_path / 'y', ti_kernel_size=2)
  with pytest.raises(ValueError, match='attack_set.ti_kernel_size=2 is not'):
    config_base.validate_attack_set(bad.attack_set)
  with pytest.raises(ValueError, match='attack_set.epsilon=0.001 is not'):
    config_base.validate_attack_set(make_config('z', epsilon=0.001).attack_set)
