"""Writes tests/data/autoattack/fab_reference.npz from the reference FAB.

Run by hand with the venv that has the authors' code (torch, pyautoattack):

  /work/ref/venv/bin/python tests/reference/make_fab_reference.py

It runs the reference FAB (pyautoattack.fab_pt.FABAttack_PT) on the digits MLP
of tests/digits_mlp.py, ported to torch with the same weights, and saves:

* the reference hyperplane-box projections (L-inf and L2) of random points
  onto random hyperplanes (points in [0, 1], w normal, offsets of several
  scales so that every branch of the projections is taken);
* the first iterates of FAB-T's first run (target: the 2nd-ranked clean
  logit; no random start, hence deterministic) on 16 test digits, L-inf and
  L2: the point each iteration differentiates at, and the best adversarial
  point found after those iterations;
* per-example results of FAB-T as AutoAttack's standard version runs it
  (9 target classes, 100 iterations, 1 restart) on all 297 test digits at
  L-inf eps 0.1 and L2 eps 0.5: robust or not, the norm of the returned
  perturbation, the robust accuracy and the wall time;
* the same for untargeted FAB with one restart (deterministic too), and
  its first iterates on 8 test digits.
"""

import os
import sys
import time
import types

import numpy as np
from pyautoattack.fab_projections import projection_l2
from pyautoattack.fab_projections import projection_linf
from pyautoattack.fab_pt import FABAttack_PT
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
OUT = os.path.join(TESTS, 'data', 'autoattack', 'fab_reference.npz')

# tests/digits_mlp.py imports jax.numpy at module level (for its logits_fn);
# this venv has no jax, and only data() and weights() are needed here.
sys.modules.setdefault('jax', types.ModuleType('jax'))
sys.modules.setdefault('jax.numpy', np)
sys.path.insert(0, TESTS)
import digits_mlp  # noqa: E402

EPS = {'linf': 0.1, 'l2': 0.5}
TORCH_NORM = {'linf': 'Linf', 'l2': 'L2'}
NUM_ITERATES = 8
NUM_ITERATE_EXAMPLES = 16
NUM_UNTARGETED_ITERATES = 6
NUM_UNTARGETED_EXAMPLES = 8


def torch_model(w):
  model = torch.nn.Sequential(
    torch.nn.Flatten(),
    torch.nn.Linear(64, w['w1'].shape[1]),
    torch.nn.ReLU(),
    torch.nn.Linear(w['w1'].shape[1], 10),
  )
  with torch.no_grad():
    model[1].weight.copy_(torch.from_numpy(w['w1'].T))
    model[1].bias.copy_(torch.from_numpy(w['b1']))
    model[3].weight.copy_(torch.from_numpy(w['w2'].T))
    model[3].bias.copy_(torch.from_numpy(w['b2']))
  return model.eval()


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x):
  return x.detach().numpy().transpose(0, 2, 3, 1)


def projections():
  rng = np.random.default_rng(1)
  n, dim = 48, 64
  t = rng.uniform(0.0, 1.0, (n, dim)).astype(np.float32)
  w = rng.normal(size=(n, dim)).astype(np.float32)
  scales = np.array([0.01, 0.1, 0.5, 1.0, 3.0, 10.0, 30.0, 100.0])
  offset = scales[np.arange(n) % len(scales)] * rng.normal(size=n)
  b = (np.sum(w * t, axis=1) + offset).astype(np.float32)
  tt, wt, bt = map(torch.from_numpy, (t, w, b))
  d_linf = projection_linf(tt, wt, bt).numpy()
  d_l2 = projection_l2(tt, wt, bt).numpy()
  return dict(proj_t=t, proj_w=w, proj_b=b, proj_linf=d_linf, proj_l2=d_l2)


class RecordingFAB(FABAttack_PT):
  """The reference FAB, recording the points it differentiates at."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.iterates = []

  def get_diff_logits_grads_batch_targeted(self, imgs, la, la_target):
    self.iterates.append(imgs.detach().clone())
    return super().get_diff_logits_grads_batch_targeted(imgs, la, la_target)

  def get_diff_logits_grads_batch(self, imgs, la):
    self.iterates.append(imgs.detach().clone())
    return super().get_diff_logits_grads_batch(imgs, la)


def iterates(model, x, y, norm, targeted=True):
  with torch.no_grad():
    correct = model(x).argmax(1) == y
  num = NUM_ITERATE_EXAMPLES if targeted else NUM_UNTARGETED_EXAMPLES
  idx = np.flatnonzero(correct.numpy())[:num]
  fab = RecordingFAB(
    model,
    norm=TORCH_NORM[norm],
    n_restarts=1,
    n_iter=NUM_ITERATES if targeted else NUM_UNTARGETED_ITERATES,
    eps=EPS[norm],
    targeted=targeted,
    n_target_classes=1,
    device='cpu',
  )
  fab.target_class = 2
  best = fab.attack_single_run(x[idx], y[idx], is_targeted=targeted)
  # iterates[0] is the clean image; iterates[k] the point of iteration k.
  its = torch.stack(fab.iterates[1:] + [best], 0)
  return idx, np.stack([nhwc(i) for i in its], 0)


def robust(model, x, y, norm, targeted=True):
  fab = FABAttack_PT(
    model,
    norm=TORCH_NORM[norm],
    n_restarts=1,
    n_iter=100,
    eps=EPS[norm],
    seed=0,
    targeted=targeted,
    n_target_classes=9,
    device='cpu',
  )
  start = time.perf_counter()
  adv = fab.perturb(x, y)
  seconds = time.perf_counter() - start
  with torch.no_grad():
    ok = model(adv).argmax(1) == y
  delta = (adv - x).reshape(len(x), -1)
  if norm == 'linf':
    res = delta.abs().max(1)[0]
  else:
    res = delta.square().sum(1).sqrt()
  ok = ok | (res > EPS[norm] + 1e-6)
  return ok.numpy(), res.numpy(), seconds


def main():
  torch.manual_seed(0)
  _, _, x_test, y_test = digits_mlp.data()
  model = torch_model(digits_mlp.weights())
  x = nchw(x_test)
  y = torch.from_numpy(y_test.astype(np.int64))
  out = projections()
  with torch.no_grad():
    out['clean_correct'] = (model(x).argmax(1) == y).numpy()
  for norm in ('linf', 'l2'):
    idx, its = iterates(model, x, y, norm)
    out[f'iterates_idx_{norm}'] = idx
    out[f'iterates_{norm}'] = its
    ok, res, seconds = robust(model, x, y, norm)
    out[f'robust_{norm}'] = ok
    out[f'norm_{norm}'] = res
    out[f'eps_{norm}'] = np.float32(EPS[norm])
    out[f'seconds_{norm}'] = np.float64(seconds)
    print(
      f'{norm}: eps {EPS[norm]} clean {out["clean_correct"].mean():.4f} '
      f'robust {ok.mean():.4f} ({ok.sum()}/{len(ok)}) in {seconds:.1f} s'
    )
    idx, its = iterates(model, x, y, norm, targeted=False)
    out[f'untargeted_iterates_idx_{norm}'] = idx
    out[f'untargeted_iterates_{norm}'] = its
    ok, res, seconds = robust(model, x, y, norm, targeted=False)
    out[f'untargeted_robust_{norm}'] = ok
    out[f'untargeted_seconds_{norm}'] = np.float64(seconds)
    print(
      f'{norm} untargeted: robust {ok.mean():.4f} ({ok.sum()}/{len(ok)}) '
      f'in {seconds:.1f} s'
    )
  np.savez_compressed(OUT, **out)
  print(f'wrote {OUT} ({os.path.getsize(OUT)} bytes)')


if __name__ == '__main__':
  main()
