"""AutoAttack's ensemble driver: worst case, batch packing, no recompile."""

import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax import attacks
from fdjax.attacks import apgd as apgd_lib
from fdjax.attacks import ensemble as aa_lib
from fdjax.attacks import square as square_lib

sys.path.insert(0, __file__.rsplit('/', 1)[0])
import digits_mlp  # noqa: E402

EPS = 0.1
N = 48


@pytest.fixture(scope='module')
def digits():
  w = digits_mlp.weights()
  _, _, x, y = digits_mlp.data()
  return w, x[:N], y[:N]


def logits(w, x):
  return digits_mlp.logits_fn(w)(x)


def small_settings():
  return {
    'apgd-ce': {'num_steps': 20},
    'apgd-t': {'num_steps': 20, 'num_target_classes': 3},
    'fab-t': {'num_steps': 20, 'num_target_classes': 3},
    'square': {'num_queries': 200},
  }


def test_versions_and_names():
  assert aa_lib.resolve_attacks('standard') == (
    'apgd-ce',
    'apgd-t',
    'fab-t',
    'square',
  )
  assert aa_lib.resolve_attacks('plus')[:2] == ('apgd-ce', 'apgd-dlr')
  for bad in (('custom', None), ('custom', ['pgd']), ('fast', None)):
    with pytest.raises(ValueError, match='valid'):
      aa_lib.resolve_attacks(*bad)
  with pytest.raises(ValueError, match="version='custom'"):
    aa_lib.resolve_attacks('standard', ['square'])


def test_standard_is_the_worst_case_and_every_success_is_real(digits):
  w, x, y = digits
  aa = attacks.AutoAttack(
    logits, epsilon=EPS, batch_size=16, settings=small_settings()
  )
  r = aa(w, jax.random.key(0), x, y)
  # The reference's warnings, as checks: none for this normal model.
  assert set(r.checks) == set(aa_lib.CHECKS)
  assert all(c['status'] == 'ok' for c in r.checks.values()), r.checks
  clean = np.asarray(logits(w, x)).argmax(-1)
  np.testing.assert_array_equal(r.broken_by == 0, clean != y)
  # Each later row is at most the one before (cumulative), and the final
  # accuracy is the fraction never broken.
  accs = list(r.robust_accuracy.values())
  assert all(b <= a for a, b in zip(accs, accs[1:]))
  assert accs[-1] == pytest.approx(np.mean(r.broken_by == -1))
  assert accs[-1] < accs[0]  # The attacks break some points ...
  assert accs[-1] > 0  # ... but not all at this epsilon.
  # Every returned image: inside the ball and bounds; the broken ones are
  # misclassified, the others are the clean image.
  d = np.abs(r.adversarial - x).reshape(N, -1).max(1)
  assert d.max() <= EPS + 1e-6
  assert r.adversarial.min() >= 0 and r.adversarial.max() <= 1
  pred = np.asarray(logits(w, r.adversarial)).argmax(-1)
  broken = r.broken_by > 0
  assert np.all(pred[broken] != y[broken])
  np.testing.assert_array_equal(r.adversarial[~broken], x[~broken])
  # The ensemble is at least as strong as each attack alone.
  for k, name in enumerate(r.attacks, start=1):
    alone = attacks.AutoAttack(
      logits,
      epsilon=EPS,
      version='custom',
      attacks=[name],
      batch_size=16,
      settings=small_settings(),
    )(w, jax.random.key(0), x, y)
    assert np.all(alone.broken_by[r.broken_by == -1] <= 0), name
    # The first attack alone is the ensemble's first row.
    if k == 1:
      np.testing.assert_array_equal(alone.broken_by == 1, r.broken_by == 1)


def test_batch_packing_does_not_change_results(digits):
  w, x, y = digits
  custom = dict(epsilon=EPS, version='custom', attacks=['apgd-ce', 'square'])
  settings = {'apgd-ce': {'num_steps': 10}, 'square': {'num_queries': 100}}
  a = attacks.AutoAttack(logits, batch_size=7, settings=settings, **custom)
  b = attacks.AutoAttack(logits, batch_size=32, settings=settings, **custom)
  ra = a(w, jax.random.key(3), x, y)
  rb = b(w, jax.random.key(3), x, y)
  np.testing.assert_array_equal(ra.broken_by, rb.broken_by)
  np.testing.assert_allclose(ra.adversarial, rb.adversarial, atol=1e-6)


def test_second_call_does_not_recompile(digits, monkeypatch):
  w, x, y = digits
  original = aa_lib._FUNCTIONS['apgd-ce']
  traced = chex.assert_max_traces(original, n=1)
  monkeypatch.setitem(aa_lib._FUNCTIONS, 'apgd-ce', traced)
  aa = attacks.AutoAttack(
    logits,
    epsilon=EPS,
    version='custom',
    attacks=['apgd-ce'],
    batch_size=16,
    settings={'apgd-ce': {'num_steps': 5}},
  )
  aa(w, jax.random.key(0), x[:16], y[:16])  # One full batch.
  w2 = jax.tree.map(lambda a: a * 1.01, w)  # New weights, same model.
  aa(w2, jax.random.key(1), x[16:32], y[16:32])  # Other points, same batch.
  # A last batch of fewer points is padded to a smaller power of two, a
  # program compiled once for that size.
  sizes = []
  monkeypatch.setattr(
    aa, '_tail_size', lambda m, f=aa._tail_size: sizes.append(f(m)) or f(m)
  )
  chex.clear_trace_counter()
  traced = chex.assert_max_traces(original, n=2)
  monkeypatch.setitem(aa_lib._FUNCTIONS, 'apgd-ce', traced)
  aa._compiled.clear()
  aa._ahead.clear()
  aa(w2, jax.random.key(1), x[:20], y[:20])  # 16 + 4 (padded to 4).
  aa(w2, jax.random.key(1), x[:19], y[:19])  # 16 + 3 (padded to 4).
  assert set(sizes) == {4}


def test_apgd_attacks_share_one_program(digits, monkeypatch):
  # APGD-CE and APGD-T differ only in loss, restarts and targets: one
  # compiled program runs both (the model's passes compile once).
  w, x, y = digits
  traced = chex.assert_max_traces(apgd_lib.apgd_switch, n=1)
  monkeypatch.setattr(apgd_lib, 'apgd_switch', traced)
  settings = {'apgd-ce': {'num_steps': 20}, 'apgd-t': {'num_steps': 20}}
  kwargs = dict(epsilon=EPS, version='custom', batch_size=16)
  aa = attacks.AutoAttack(
    logits,
    attacks=['apgd-ce', 'apgd-t'],
    settings=settings,
    tail_buckets=False,
    **kwargs,
  )
  result = aa(w, jax.random.key(0), x[:16], y[:16])
  assert len(aa._compiled) == 1
  assert 0 < np.sum(result.broken_by == 2)  # APGD-T ran, and broke some.
  # The same points attack by attack, each in a program of its own.
  alone = {}
  for name in ('apgd-ce', 'apgd-t'):
    alone[name] = attacks.AutoAttack(
      logits, attacks=[name], settings=settings, **kwargs
    )
  first = alone['apgd-ce'](w, jax.random.key(0), x[:16], y[:16]).broken_by
  np.testing.assert_array_equal(first == 0, result.broken_by == 0)
  np.testing.assert_array_equal(first == 1, result.broken_by == 1)
  left = np.flatnonzero(first == -1)
  second = alone['apgd-t'](
    w, jax.random.key(0), x[left], y[left], example_ids=left
  ).broken_by
  np.testing.assert_array_equal(second == 1, result.broken_by[left] == 2)
  # On CPU the gradient attacks compile with XLA's older fusion emitters;
  # attacks given other compiler options no longer share a program.
  assert aa.xla_options('apgd-t') == {'xla_cpu_use_fusion_emitters': False}
  assert aa.xla_options('square') == {}
  other = attacks.AutoAttack(
    logits,
    attacks=['apgd-ce', 'apgd-t'],
    compiler_options={'apgd-ce': {'xla_backend_optimization_level': 1}},
    **kwargs,
  )
  assert other.xla_options('apgd-t') == {}
  assert other._program('apgd-ce')[0] != other._program('apgd-t')[0]
  assert aa._program('apgd-ce')[0] == aa._program('apgd-t')[0]


def test_functional_form_and_bad_settings(digits):
  w, x, y = digits
  fn = digits_mlp.logits_fn(w)
  adv, broken_by = attacks.autoattack(
    fn,
    jax.random.key(0),
    jnp.asarray(x[:8]),
    y[:8],
    epsilon=EPS,
    version='custom',
    attacks=['apgd-ce'],
    batch_size=8,
  )
  assert adv.shape == x[:8].shape and broken_by.shape == (8,)
  with pytest.raises(ValueError, match='batch_size'):
    attacks.AutoAttack(logits, epsilon=EPS, batch_size=0)
  with pytest.raises(ValueError, match='settings'):
    attacks.AutoAttack(logits, epsilon=EPS, settings={'pgd': {}})
  with pytest.raises(ValueError, match='norm'):
    attacks.AutoAttack(logits, epsilon=EPS, norm='l1')


def test_standard_square_schedule_is_not_rescaled_as_the_reference():
  # AutoAttack runs Square with resc_schedule=False: the reference's p at
  # every iteration of its 5,000 queries.
  ref = np.load(
    __file__.rsplit('/', 1)[0]
    + '/data/autoattack/square_schedule_reference.npz'
  )['p']
  kw = aa_lib.attack_settings('standard', 'square')
  assert kw == {'num_queries': 5000, 'p_init': 0.8, 'rescale_schedule': False}
  p = square_lib.p_selection(
    0.8, jnp.arange(5000), 5000, rescale_schedule=False
  )
  np.testing.assert_allclose(p, ref, rtol=1e-7)


class _LazyImages:
  """Images read batch by batch, as the evaluation passes them."""

  def __init__(self, x):
    self.x, self.reads = x, 0

  def __len__(self):
    return len(self.x)

  def __getitem__(self, idx):
    self.reads += 1
    return self.x[np.asarray(idx)]


def test_one_and_eight_devices_agree_and_images_load_lazily(digits):
  from fdjax import parallel

  w, x, y = digits
  x, y = x[:24], y[:24]
  settings = {
    'apgd-ce': {'num_steps': 10},
    'fab-t': {'num_steps': 10, 'num_target_classes': 2},
    'square': {'num_queries': 100},
  }
  custom = dict(
    epsilon=EPS,
    version='custom',
    attacks=['apgd-ce', 'fab-t', 'square'],
    batch_size=8,
    settings=settings,
  )
  one = attacks.AutoAttack(
    logits, mesh=parallel.make_mesh(jax.devices()[:1]), **custom
  )(w, jax.random.key(5), x, y)
  assert jax.device_count() == 8
  lazy = _LazyImages(x)
  eight = attacks.AutoAttack(logits, mesh=parallel.make_mesh(), **custom)
  r = eight(w, jax.random.key(5), lazy, y, return_adversarial=False)
  np.testing.assert_array_equal(r.broken_by, one.broken_by)
  assert r.adversarial is None and lazy.reads >= 3
  assert 0 < np.sum(one.broken_by > 0) < len(y)
  with pytest.raises(ValueError, match='batch_size 12 does not divide'):
    attacks.AutoAttack(
      logits, mesh=parallel.make_mesh(), epsilon=EPS, batch_size=12
    )


def test_rand_version_attacks_a_randomized_model(digits):
  w, x, y = digits
  x, y = x[:16], y[:16]

  def noisy(p, z, key):
    return logits(p, z + 0.05 * jax.random.normal(key, z.shape, z.dtype))

  small = {'num_steps': 3, 'eot_iter': 2}
  aa = attacks.AutoAttack(
    noisy,
    epsilon=EPS,
    version='rand',
    batch_size=8,
    randomized=True,
    settings={'apgd-ce': small, 'apgd-dlr': small},
  )
  assert aa.kwargs('apgd-ce') == {
    'loss': 'ce',
    'num_steps': 3,
    'num_restarts': 1,
    'eot_iter': 2,
  }
  r = aa(w, jax.random.key(0), x, y)
  assert r.attacks == ('apgd-ce', 'apgd-dlr')
  assert r.checks['randomness']['status'] == 'ok'
  broken = r.broken_by > 0
  assert broken.any()
  # Success is judged on the fixed draw jax.random.key(0), batch by batch.
  pred = np.concatenate(
    [
      np.asarray(
        noisy(w, jnp.asarray(r.adversarial[i : i + 8]), jax.random.key(0))
      )
      for i in (0, 8)
    ]
  )
  assert np.all(pred.argmax(-1)[broken] != y[broken])
  assert np.abs(r.adversarial - x).max() <= EPS + 1e-6
  with pytest.raises(ValueError, match='cannot run on a randomized model'):
    attacks.AutoAttack(noisy, epsilon=EPS, randomized=True)


def test_the_reference_warnings_as_checks(digits):
  w, x, y = digits
  x, y = x[:16], y[:16]
  settings = {
    'apgd-ce': {'num_steps': 5},
    'fab-t': {'num_steps': 2},
    'square': {'num_queries': 150},
  }
  custom = dict(
    epsilon=EPS,
    version='custom',
    attacks=['apgd-ce', 'square'],
    batch_size=8,
    settings=settings,
  )

  def masked(p, z):  # Zero gradient almost everywhere.
    return logits(p, jnp.round(z * 4) / 4 + 0 * z)

  r = attacks.AutoAttack(masked, **custom)(w, jax.random.key(0), x, y)
  assert r.checks['zero_gradients']['status'] == 'warn'
  assert r.checks['square']['status'] == 'warn', r.robust_accuracy
  probs = attacks.AutoAttack(
    lambda p, z: jax.nn.softmax(logits(p, z)),
    **{**custom, 'attacks': ['apgd-ce']},
  )(w, jax.random.key(0), x, y)
  assert probs.checks['logits']['status'] == 'warn'
  # A 3-class model: the 9 targets of FAB-T are capped at 2, with a warning.
  three = attacks.AutoAttack(
    lambda p, z: logits(p, z)[:, :3],
    epsilon=EPS,
    version='custom',
    attacks=['fab-t'],
    batch_size=8,
    settings=settings,
  )
  r3 = three(w, jax.random.key(0), x, y % 3)
  assert r3.checks['classes']['status'] == 'warn'
  assert three.kwargs('fab-t')['num_target_classes'] == 2
