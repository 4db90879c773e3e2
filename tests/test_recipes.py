"""Tests of the training recipes: TRADES, fast and free AT, EMA, the guard."""

import importlib.util
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax import attacks
from fdjax import checkpoints
from fdjax import config_base
from fdjax import guard as guard_lib
from fdjax import parallel
from fdjax import recipes
from fdjax import train
from tests import test_train

ROOT = os.path.join(os.path.dirname(__file__), '..')


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_trades(clean, adv, targets, beta):
  """TRADES' loss in float64 numpy: CE(clean) + beta * KL(p_clean || p_adv)."""
  log_p, log_q = _np_log_softmax(clean), _np_log_softmax(adv)
  xent = -(targets * log_p).sum(-1).mean()
  kl = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()
  return xent + beta * kl, xent, kl


def test_trades_loss_matches_a_float64_reference_with_gradients():
  rng = np.random.default_rng(0)
  clean = rng.normal(0, 2, (6, 5))
  adv = clean + rng.normal(0, 1, (6, 5))
  labels = rng.integers(0, 5, 6)
  targets = np.eye(5)[labels] * 0.9 + 0.1 / 5  # Label-smoothed.
  beta = 6.0
  fn = jax.jit(recipes.trades_loss, static_argnums=3)
  loss, xent, kl = fn(
    jnp.float32(clean), jnp.float32(adv), jnp.float32(targets), beta
  )
  ref = _np_trades(clean, adv, targets, beta)
  np.testing.assert_allclose([loss, xent, kl], ref, rtol=1e-5)
  assert ref[2] > 0.05  # A real KL term, not a zero.

  # Gradients with respect to both logits against central differences of
  # the float64 reference.
  grad = jax.jit(
    jax.grad(lambda c, a: recipes.trades_loss(c, a, targets, beta)[0], (0, 1))
  )(jnp.float32(clean), jnp.float32(adv))
  h = 1e-6
  for which, g in enumerate(grad):
    num = np.zeros_like(clean)
    for idx in np.ndindex(clean.shape):
      args = [clean.copy(), adv.copy()]
      args[which][idx] += h
      up = _np_trades(*args, targets, beta)[0]
      args[which][idx] -= 2 * h
      down = _np_trades(*args, targets, beta)[0]
      num[idx] = (up - down) / (2 * h)
    np.testing.assert_allclose(g, num, atol=2e-5)


def _linear_logits_fn(seed=0, dim=12, classes=4):
  w = jax.random.normal(jax.random.key(seed), (dim, classes))
  return lambda x: x.reshape(len(x), -1) @ w


def test_trades_attack_ascends_the_kl_inside_the_ball_per_example():
  logits_fn = _linear_logits_fn()
  x = jax.random.uniform(jax.random.key(1), (6, 2, 2, 3))
  ids = jnp.arange(10, 16)
  attack = jax.jit(
    lambda x, ids: attacks.trades_pgd(
      logits_fn,
      jax.random.key(2),
      x,
      epsilon=0.1,
      step_size=0.03,
      num_steps=5,
      example_ids=ids,
    )
  )
  adv = attack(x, ids)
  assert float(jnp.max(jnp.abs(adv - x))) <= 0.1 + 1e-6
  assert float(adv.min()) >= 0 and float(adv.max()) <= 1
  kl = attacks.kl_divergence(logits_fn(x), logits_fn(adv))
  start = attacks.kl_divergence(logits_fn(x), logits_fn(x + 1e-3))
  assert bool(jnp.all(kl > 10 * jnp.abs(start))) and float(kl.min()) > 1e-3
  # An example's attack does not depend on the rest of its batch.
  np.testing.assert_allclose(attack(x[3:], ids[3:]), adv[3:], atol=1e-6)


def test_fast_attack_is_one_random_start_fgsm_step_of_one_and_a_quarter_eps():
  config = config_base.attack_config()
  config.epsilon = 0.1
  attack = attacks.training_attack(config, 4, 'fast')
  assert (attack.num_steps, attack.targeted) == (1, False)
  logits_fn = _linear_logits_fn()
  x = jax.random.uniform(jax.random.key(1), (5, 12), minval=0.3, maxval=0.7)
  y = jnp.arange(5) % 4
  ids = jnp.arange(5)
  adv, _ = attack(
    logits_fn,
    jax.random.key(3),  # The start's key (the targets' is separate).
    x,
    y,
    example_ids=ids,
    target_key=jax.random.key(4),
  )
  # The reference: x + U(-eps, eps) per example, + 1.25 eps sign(grad),
  # clipped to the ball (the images are far from the bounds).
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(ids)
  u = jax.vmap(lambda k: jax.random.uniform(k, (12,), minval=-1.0))(keys)
  x0 = np.asarray(x, np.float64) + 0.1 * np.asarray(u, np.float64)
  w = np.asarray(logits_fn(jnp.eye(12)), np.float64)
  z = x0 @ w
  p = np.exp(_np_log_softmax(z))
  grad = (p - np.eye(4)[np.asarray(y)]) @ w.T  # d CE / d x.
  ref = np.clip(x0 + 0.125 * np.sign(grad), x - 0.1, x + 0.1)
  np.testing.assert_allclose(adv, ref, atol=1e-6)


def test_free_update_and_ema_match_numpy():
  rng = np.random.default_rng(0)
  delta = rng.uniform(-0.1, 0.1, (3, 4))
  g = rng.normal(size=(3, 4))
  new = recipes.free_perturbation_update(jnp.float32(delta), g, 0.1)
  np.testing.assert_allclose(
    new, np.clip(delta + 0.1 * np.sign(g), -0.1, 0.1), atol=1e-7
  )
  ema, w = rng.normal(size=3), rng.normal(size=3)
  for step, expected in ((1, w), (5, 0.9 * ema + 0.1 * w)):
    out = recipes.ema_update({'w': jnp.float32(ema)}, {'w': w}, step, 0.9, 3)
    np.testing.assert_allclose(out['w'], expected, rtol=1e-6)


def test_a_drop_of_both_attacks_accuracy_is_an_instability_not_a_collapse():
  # As in a real digits run of FGSM training from the clean image (eps
  # 0.1): PGD accuracy fell 0.23 below its best early on, FGSM accuracy
  # with it (clean accuracy too), and both recovered.
  history = [
    dict(step=80, clean=0.75, fgsm=0.461, pgd=0.367),
    dict(step=100, clean=0.875, fgsm=0.43, pgd=0.359),
    dict(step=110, clean=0.633, fgsm=0.156, pgd=0.141),
  ]
  assert recipes.find_collapse(history, 0.2) is None
  drop = recipes.find_instability(history, 0.2)
  assert (drop['step'], drop['best_step'], drop['best_fgsm']) == (
    110,
    80,
    0.461,
  )
  assert recipes.find_instability(history[:2], 0.2) is None
  # FGSM accuracy held (fell less than 0.2): a collapse.
  history[2]['fgsm'] = 0.3
  assert recipes.find_collapse(history, 0.2)['step'] == 110
  assert recipes.find_instability(history, 0.2) is None


def _recorded_guard(eps):
  """guard.jsonl of a real 30-epoch digits run of FGSM training from the
  clean image (no random start, step = epsilon; 2 CPU devices):

    python -m fdjax.main --config=configs/default.py --workdir=W \\
      --config.attack.num_steps=1 --config.attack.targeted=False \\
      --config.attack.clean_start_prob=1.0 --config.attack.step_size=EPS \\
      --config.attack.epsilon=EPS --config.train.guard_every_steps=10
  """
  path = os.path.join(
    ROOT, 'tests', 'data', f'guard_fgsm_from_clean_eps{eps}.jsonl'
  )
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_guard_on_real_runs_flags_the_masked_one_only():
  # Epsilon 0.2: overfit from the start. PGD accuracy never rose (at most
  # 0.055), so it had nothing to drop from; FGSM accuracy climbed above
  # clean accuracy (0.59 against 0.32 at the end): masked gradients.
  masked = recipes.find_collapse(_recorded_guard('0.2'), 0.2)
  assert masked['kind'] == 'masking' and masked['step'] == 80
  assert masked['fgsm'] > masked['clean'] and masked['pgd'] < 0.05
  # Epsilon 0.1: a healthy run (PGD accuracy 0.73 at the end) with an early
  # instability at steps 110-120 that a PGD-only rule called a collapse.
  healthy = _recorded_guard('0.1')
  assert recipes.find_collapse(healthy, 0.2) is None
  assert healthy[-1]['pgd'] > 0.7
  steps = [
    recipes.find_instability(healthy[:i], 0.2) for i in range(len(healthy) + 1)
  ]
  assert [d['step'] for d in steps if d] == [110, 120]


def test_find_collapse_uses_the_best_earlier_check():
  history = [
    dict(step=2, pgd=0.3),
    dict(step=4, pgd=0.55),
    dict(step=6, pgd=0.4),  # 0.15 below the best: noise, not a collapse.
    dict(step=8, pgd=0.3),
  ]
  found = recipes.find_collapse(history, 0.2)
  assert found['step'] == 8 and found['best_step'] == 4
  assert recipes.find_collapse(history[:3], 0.2) is None


def test_recipe_config_errors_name_the_valid_values():
  config = test_train.tiny_config(**{'train.recipe': 'madry'})
  with pytest.raises(ValueError, match=r"train.recipe='madry' is not valid"):
    config_base.validate(config)
  config = test_train.tiny_config(**{'train.guard_action': 'halt'})
  with pytest.raises(ValueError, match='rollback'):
    config_base.validate(config)
  config = test_train.tiny_config(**{'train.ema_decay': 1.0})
  with pytest.raises(ValueError, match=r'train.ema_decay=1.0 is not valid'):
    config_base.validate(config)


def _recipe_config(recipe):
  return test_train.tiny_config(**{
    'model.sync_batch_stats': True, 'train.recipe': recipe,
    'train.free_replays': 2, 'train.ema_decay': 0.5,
  })  # fmt: skip


def test_free_at_with_ema_does_not_depend_on_the_device_count():
  """The sharded free-AT perturbation and the EMA, on 1 and 8 devices.

  With synchronised BatchNorm statistics a train step must not depend on
  the device count; free AT's step holds the paper's (forward, backward,
  BN over 'data', update), so this also keeps that true.
  """
  config = _recipe_config('free')
  one = test_train.run_steps(
    config, parallel.make_mesh(jax.devices()[:1]), 'shard_map'
  )
  eight = test_train.run_steps(config, parallel.make_mesh(), 'shard_map')
  for a, b in zip(one, eight):
    chex.assert_trees_all_close(a, b, atol=2e-5, rtol=1e-4)
  state, metrics = eight
  delta = np.asarray(state.free_delta)
  assert delta.shape == (16, 8, 8, 3)
  assert 0 < np.abs(delta).max() <= config.attack.epsilon + 1e-6
  # Two replays a step: the logged rate is that of update 2 * step + 1.
  lr_fn = train.create_learning_rate_fn(config.train, 4)
  np.testing.assert_allclose(metrics[1]['learning_rate'], lr_fn(3), rtol=1e-6)
  # The average moved with the weights but is not them.
  assert state.has_ema
  diff = jax.tree.map(lambda e, p: np.abs(e - p).max(), state.ema_params,
                      state.params)  # fmt: skip
  assert 0 < max(jax.tree.leaves(diff))


def _inject_accuracies(monkeypatch, pgd, fgsm):
  """Measures for real, then reports the given PGD and FGSM accuracies in
  turn."""
  real, pgd, fgsm = guard_lib.CollapseGuard.measure, iter(pgd), iter(fgsm)

  def measure(self, state):
    acc = real(self, state)
    assert set(acc) == {'clean', 'fgsm', 'pgd'}
    return dict(acc, pgd=next(pgd), fgsm=next(fgsm))

  monkeypatch.setattr(guard_lib.CollapseGuard, 'measure', measure)


def test_collapse_guard_rolls_back_and_stops(tmp_path, monkeypatch):
  action = 'rollback'  # ('stop' is the same path without the restore.)
  # TRADES (its train step runs here); the guard checks every step and sees
  # PGD accuracy collapse at step 3 (0.6 -> 0.05, beyond the 0.2 allowed)
  # while FGSM accuracy rises, as in catastrophic overfitting.
  _inject_accuracies(
    monkeypatch, [0.5, 0.6, 0.05, 0.0, 0.0], [0.6, 0.7, 0.8, 0.9, 0.9]
  )
  config = test_train.tiny_config(**{
    'train.recipe': 'trades', 'train.num_steps': 5,
    'train.guard_every_steps': 1, 'train.guard_num_examples': 8,
    'train.guard_pgd_steps': 2, 'train.guard_action': action,
    'train.checkpoint_every_steps': 10,
  })  # fmt: skip
  workdir = str(tmp_path)
  source = test_train.digits_source()
  _, state, _, last = train.train(config, workdir, train_source=source)
  # TRADES' terms: untargeted (no attack success), a positive KL.
  assert last['kl'] > 0 and 'attack_success' not in last
  assert last['loss'] > last['xent'] + config.train.trades_beta * last['kl']
  collapse = json.loads((tmp_path / 'guard_collapse.json').read_text())
  assert (collapse['step'], collapse['best_step']) == (3, 2)
  checks = [json.loads(line) for line in open(tmp_path / 'guard.jsonl')]
  assert [c['step'] for c in checks] == [1, 2, 3]
  manager = checkpoints.create_manager(workdir)
  # Rollback: to the check before the collapse (a checkpoint at every
  # check), the later ones deleted; stop: the collapsed state, saved.
  expected = 2 if action == 'rollback' else 3
  assert manager.latest_step() == expected == int(state.step)
  assert collapse.get('rolled_back_to', expected) == expected
  manager.close()
  # Rerunning the command does not train on.
  _, again, _, _ = train.train(config, workdir, train_source=source)
  assert int(again.step) == expected
  chex.assert_trees_all_equal(again.params, jax.device_get(state.params))
  assert os.path.exists(tmp_path / 'guard_collapse.json')


def _recipes_benchmark():
  path = os.path.join(ROOT, 'benchmarks', 'recipes.py')
  spec = importlib.util.spec_from_file_location('recipes_benchmark', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_recipes_benchmark_rows_resolve_to_valid_configs():
  bench = _recipes_benchmark()
  base = bench.load_config(os.path.join(ROOT, 'configs', 'default.py'))
  eps = base.attack.epsilon
  rows = {name: bench.row_config(base, name, 3) for name in bench.ROWS}
  for name, config in rows.items():
    config_base.validate(config)
    assert config.seed == 3, name
  # The paper's own attack: 30 steps of epsilon / 16.
  assert rows['paper-30'].attack.num_steps == 30
  assert rows['paper-30'].attack.step_size == pytest.approx(eps / 16)
  assert rows['paper-30'].train.recipe == 'pgd'
  assert rows['trades-1'].attack.step_size == pytest.approx(eps)
  assert rows['trades-2'].attack.step_size == pytest.approx(eps / 2)
  assert rows['trades-1'].train.label_smoothing == 0.0
  # The average covers the run's last two thirds.
  tc = rows['paper+ema'].train
  steps_per_epoch = 1500 // tc.global_batch_size  # Digits' training split.
  total = train.total_steps(tc, steps_per_epoch)
  assert tc.ema_start_step == total // 3 > 0
  # Free AT: num_epochs / m.
  free = rows['free'].train
  assert free.num_epochs == pytest.approx(
    base.train.num_epochs / free.free_replays
  )
  # The base config is left as it was.
  assert base.attack.num_steps == 5 and base.train.ema_decay == 0.0
  with pytest.raises(SystemExit, match='attack.num_steps=10'):
    bench.set_field(base, 'attack.num_stepz=3')
  bench.set_field(base, 'attack.num_steps=7')
  assert base.attack.num_steps == 7


def test_recipes_benchmark_rejects_bad_rows_before_training(monkeypatch):
  bench = _recipes_benchmark()
  for argv, message in (
    (['--rows=paper,bogus'], r"--rows: \['bogus'\] not valid"),
    (['--rows=paper,fast', '--baseline=paper-30'], 'one of --rows'),
  ):
    config = '--config=' + os.path.join(ROOT, 'configs', 'default.py')
    monkeypatch.setattr('sys.argv', ['recipes.py', config, *argv])
    monkeypatch.setattr(bench.train, 'train', None)  # Never reached.
    with pytest.raises(SystemExit, match=message):
      bench.main()
