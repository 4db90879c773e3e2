"""Writes tests/data/autoattack/square_reference.npz from the reference Square.

Run by hand with the venv that has the authors' code (torch, pyautoattack):

  /work/ref/venv/bin/python tests/reference/make_square_reference.py

It runs the reference Square attack (pyautoattack.square.SquareAttack) and
saves:

* the schedule: ``p_selection`` for every iteration at 5000, 1000 and 777
  queries, and the window side the attack uses at each of 5000 iterations
  on 8x8 images, L-inf and L2 (read from the arguments of the reference's
  own window draws, on an example that is never fooled);
* the L2 patterns ``eta(s)`` for s = 1..8 (untransposed);
* replays: on a random linear model of 3-channel 8x6 images, the
  reference's attack with every random draw recorded (window positions,
  signs, pattern transposes), 300 iterations, L-inf and L2, and its final
  best points, margins and query counts;
* AutoAttack's standard Square (margin loss, p_init 0.8, one run) on the
  297 test digits of tests/digits_mlp.py at L-inf eps 0.1 and L2 eps 1.0,
  with 5000 queries (seed 0) and 1000 queries (seeds 0 to 4): per-example
  robustness and queries, robust accuracy and wall time.
"""

import os
import sys
import time
import types

import numpy as np
from pyautoattack import square as square_module
from pyautoattack.square import SquareAttack
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
OUT = os.path.join(TESTS, 'data', 'autoattack', 'square_reference.npz')

# tests/digits_mlp.py imports jax.numpy at module level (for its logits_fn);
# this venv has no jax, and only data() and weights() are needed here.
sys.modules.setdefault('jax', types.ModuleType('jax'))
sys.modules.setdefault('jax.numpy', np)
sys.path.insert(0, TESTS)
import digits_mlp  # noqa: E402

EPS = {'linf': 0.1, 'l2': 1.0}
TORCH_NORM = {'linf': 'Linf', 'l2': 'L2'}
REPLAY_EPS = {'linf': 0.05, 'l2': 0.5}
REPLAY_SHAPE = (3, 8, 6)  # NCHW without the batch.
REPLAY_BATCH = 16
REPLAY_ITERS = 300


def digits_model():
  w = {k: torch.from_numpy(v) for k, v in digits_mlp.weights().items()}

  def predict(x):
    h = torch.relu(x.reshape(x.shape[0], -1) @ w['w1'] + w['b1'])
    return h @ w['w2'] + w['b2']

  return predict


class Recorder:
  """Replaces the reference's random draws by recorded numpy draws."""

  def __init__(self, attack, seed):
    self.rng = np.random.default_rng(seed)
    self.ints = []  # (high, value) per random_int call.
    self.choices = []  # arrays per random_choice call.
    self.transposes = []  # bools per eta call.
    attack.random_int = self.random_int
    attack.random_choice = self.random_choice

  def random_int(self, low=0, high=1, shape=(1,)):
    assert low == 0 and tuple(shape) == (1,)
    v = int(np.floor(high * self.rng.random()))
    self.ints.append((int(high), v))
    return torch.tensor([v], dtype=torch.long)

  def random_choice(self, shape):
    v = np.where(self.rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)
    self.choices.append(v)
    return torch.from_numpy(v)

  def rand(self, *shape, **kwargs):
    # Only eta() calls torch.rand once the methods above are replaced.
    u = float(self.rng.random())
    self.transposes.append(u > 0.5)
    return torch.tensor([u])


class TorchProxy(types.ModuleType):
  """The torch module with rand() redirected (for eta's transposes)."""

  def __init__(self, rand):
    super().__init__('torch_proxy')
    self._rand = rand

  def __getattr__(self, name):
    if name == 'rand':
      return self._rand
    return getattr(torch, name)


def run_recorded(attack, x, y, seed):
  rec = Recorder(attack, seed)
  square_module.torch = TorchProxy(rec.rand)
  try:
    n_queries, x_best = attack.attack_single_run(x, y)
  finally:
    square_module.torch = torch
  return rec, n_queries, x_best


def schedule(out):
  for nq in (5000, 1000, 777):
    a = SquareAttack(lambda x: x, n_queries=nq, eps=0.1)
    out[f'p_{nq}'] = np.asarray(
      [a.p_selection(i) for i in range(nq)], np.float64
    )
  # Window sides: an example with a huge margin is never fooled; the side is
  # h minus the `high` of each iteration's first window draw.
  x = torch.full((1, 1, 8, 8), 0.5)
  y = torch.zeros(1, dtype=torch.long)
  never = lambda z: torch.cat(
    [torch.full((z.shape[0], 1), 100.0), torch.zeros(z.shape[0], 9)], 1
  )
  for norm in ('linf', 'l2'):
    a = SquareAttack(never, norm=TORCH_NORM[norm], n_queries=5000, eps=0.1)
    a.init_hyperparam(x)
    rec, n_queries, _ = run_recorded(a, x, y, 0)
    assert int(n_queries[0]) == 5001
    per_iter = 2 if norm == 'linf' else 4
    highs = np.asarray([h for h, _ in rec.ints]).reshape(5000, per_iter)
    out[f'side_{norm}'] = (8 - highs[:, 0]).astype(np.int8)


def etas(out):
  a = SquareAttack(lambda x: x, norm='L2', eps=1.0)
  a.device = 'cpu'
  square_module.torch = TorchProxy(lambda *s, **k: torch.zeros(1))
  try:
    for s in range(1, 9):
      out[f'eta_{s}'] = a.eta(s).numpy()
  finally:
    square_module.torch = torch


def replay(out):
  c, h, w = REPLAY_SHAPE
  rng = np.random.default_rng(1)
  wt = rng.normal(size=(c * h * w, 10)).astype(np.float32) / 4
  bias = rng.normal(size=(10,)).astype(np.float32)
  x = rng.uniform(size=(REPLAY_BATCH, c, h, w)).astype(np.float32)
  wt_t, bias_t = torch.from_numpy(wt), torch.from_numpy(bias)
  predict = lambda z: z.reshape(z.shape[0], -1) @ wt_t + bias_t
  y = predict(torch.from_numpy(x)).argmax(1)
  out['replay_w'] = wt
  out['replay_b'] = bias
  out['replay_x'] = x
  out['replay_y'] = y.numpy().astype(np.int32)
  for norm in ('linf', 'l2'):
    a = SquareAttack(
      predict,
      norm=TORCH_NORM[norm],
      n_queries=REPLAY_ITERS,
      eps=REPLAY_EPS[norm],
    )
    a.init_hyperparam(torch.from_numpy(x))
    rec, n_queries, x_best = run_recorded(a, torch.from_numpy(x), y, 2)
    iters = int(n_queries.max()) - 1
    per_iter = 2 if norm == 'linf' else 4
    ints = np.asarray([v for _, v in rec.ints], np.int8)
    out[f'replay_{norm}_ints'] = ints.reshape(iters, per_iter)
    if norm == 'linf':
      out['replay_linf_init'] = rec.choices[0][:, :, 0, :]  # [B, c, w]
      out['replay_linf_signs'] = np.stack(
        [v.reshape(c) for v in rec.choices[1:]]
      )
    else:
      grid = (h // (h // 5), w // (h // 5))
      n_init = grid[0] * grid[1]
      out['replay_l2_init_signs'] = np.stack(
        [v[:, :, 0, 0] for v in rec.choices[:n_init]], 1
      ).reshape(REPLAY_BATCH, *grid, c)
      out['replay_l2_init_transposes'] = np.asarray(
        rec.transposes[:n_init]
      ).reshape(grid)
      step = rec.choices[n_init:]
      out['replay_l2_counts'] = np.asarray([len(v) for v in step], np.int16)
      out['replay_l2_signs'] = np.concatenate([v[:, :, 0, 0] for v in step])
      out['replay_l2_transposes'] = np.asarray(rec.transposes[n_init:])
    logits = predict(x_best)
    margin = logits[torch.arange(REPLAY_BATCH), y].clone()
    logits[torch.arange(REPLAY_BATCH), y] = -float('inf')
    margin -= logits.max(1)[0]
    out[f'replay_{norm}_x_best'] = x_best.numpy()
    out[f'replay_{norm}_margin'] = margin.numpy()
    out[f'replay_{norm}_queries'] = n_queries.numpy().astype(np.int16)


def digits(out):
  _, _, x_test, y_test = digits_mlp.data()
  x = torch.from_numpy(x_test[:300].transpose(0, 3, 1, 2).copy())  # NCHW
  y = torch.from_numpy(y_test[:300].astype(np.int64))
  predict = digits_model()
  out['digits_clean_correct'] = (predict(x).argmax(1) == y).numpy()
  out['digits_w1_sum'] = np.float64(digits_mlp.weights()['w1'].sum())
  for norm in ('linf', 'l2'):
    for nq, seeds in ((5000, (0,)), (1000, (0, 1, 2, 3, 4))):
      for seed in seeds:
        a = SquareAttack(
          predict,
          norm=TORCH_NORM[norm],
          n_queries=nq,
          eps=EPS[norm],
          p_init=0.8,
          n_restarts=1,
          seed=seed,
          loss='margin',
        )
        queries = {}
        single_run = a.attack_single_run

        def recording(xs, ys, single_run=single_run, queries=queries):
          n, adv = single_run(xs, ys)
          queries['n'] = n
          return n, adv

        a.attack_single_run = recording
        t = time.time()
        adv = a.perturb(x, y)
        seconds = time.time() - t
        robust = (predict(adv).argmax(1) == y).numpy()
        n = np.zeros(len(y), np.int16)
        n[out['digits_clean_correct']] = queries['n'].numpy()
        delta = (adv - x).reshape(len(y), -1)
        dist = delta.abs().max(1)[0] if norm == 'linf' else delta.norm(dim=1)
        name = f'digits_{norm}_{nq}_seed{seed}'
        out[f'{name}_robust'] = robust
        out[f'{name}_queries'] = n
        out[f'{name}_seconds'] = np.float64(seconds)
        print(
          f'{name}: robust accuracy {robust.mean():.4f}, mean queries of '
          f'broken {n[~robust & out["digits_clean_correct"]].mean():.1f}, '
          f'max dist {float(dist.max()):.6f}, {seconds:.2f} s'
        )


def main():
  torch.set_num_threads(1)
  out = {}
  schedule(out)
  etas(out)
  replay(out)
  digits(out)
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  np.savez_compressed(OUT, **out)
  print(f'wrote {OUT}: {os.path.getsize(OUT)} bytes')


if __name__ == '__main__':
  main()
