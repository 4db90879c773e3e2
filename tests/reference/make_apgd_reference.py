"""Writes tests/data/autoattack/apgd_reference.npz from the reference APGD.

Run by hand with the venv that has the authors' code (torch, pyautoattack):

  /work/ref/venv/bin/python tests/reference/make_apgd_reference.py

It runs the reference APGD (pyautoattack.autopgd_base.APGDAttack and
APGDAttack_targeted) on the digits MLP of tests/digits_mlp.py, ported to
torch with the same weights, and saves:

* the weights of the MLP (training depends on the BLAS thread count);
* the reference DLR and targeted DLR losses of random logits;
* the checkpoint iterations (and window lengths) at which the reference
  checks its step size, recorded from its own loop for several numbers of
  iterations;
* single runs (``attack_single_run``) from a given start point (no random
  start, hence deterministic) on the first test digits, L-inf CE, DLR,
  targeted DLR and targeted CE (target: the 2nd-ranked clean logit) and L2
  CE: the loss at the start and at every iterate (from the logits the model
  returned), the returned best-loss point, best adversarial point, success
  and best loss;
* per-example robustness of APGD-CE, APGD-DLR and APGD-T (9 targets) as
  AutoAttack's standard version runs them (100 iterations, 1 restart) on
  all 297 test digits at L-inf eps 0.1 and L2 eps 1.0, for seeds 0..19 (the
  random start makes a single run's robust accuracy vary by up to 1.5
  points),
  with the wall time of each call (one torch thread: on a shared machine
  more threads only slow these small batches down).
"""

import os
import sys
import time
import types

import numpy as np
from pyautoattack.autopgd_base import APGDAttack
from pyautoattack.autopgd_base import APGDAttack_targeted
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
OUT = os.path.join(TESTS, 'data', 'autoattack', 'apgd_reference.npz')

# tests/digits_mlp.py imports jax.numpy at module level (for its logits_fn);
# this venv has no jax, and only data() and weights() are needed here.
sys.modules.setdefault('jax', types.ModuleType('jax'))
sys.modules.setdefault('jax.numpy', np)
sys.path.insert(0, TESTS)
import digits_mlp  # noqa: E402

EPS = {'linf': 0.1, 'l2': 1.0}
TORCH_NORM = {'linf': 'Linf', 'l2': 'L2'}
NUM_TRAJECTORY_EXAMPLES = 48
SEEDS = tuple(range(20))
CHECKPOINT_ITERS = (1, 2, 5, 10, 17, 37, 100, 250, 1000)
# (name, norm, loss) of the single runs from a given start point.
RUNS = (
  ('ce_linf', 'linf', 'ce'),
  ('dlr_linf', 'linf', 'dlr'),
  ('dlrt_linf', 'linf', 'dlr-targeted'),
  ('cet_linf', 'linf', 'ce-targeted'),
  ('ce_l2', 'l2', 'ce'),
)


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


class Recorder(torch.nn.Module):
  """The model, recording the logits of every call."""

  def __init__(self, model):
    super().__init__()
    self.model = model
    self.logits = []

  def forward(self, x):
    z = self.model(x)
    self.logits.append(z.detach().clone())
    return z


def dlr_losses():
  rng = np.random.default_rng(0)
  n = 64
  z = (rng.normal(size=(n, 10)) * rng.uniform(0.1, 10.0, (n, 1))).astype(
    np.float32
  )
  # Labels: the top class for a third of the rows, random otherwise.
  y = rng.integers(0, 10, n)
  y[::3] = np.argmax(z[::3], axis=1)
  t = (y + rng.integers(1, 10, n)) % 10
  zt = torch.from_numpy(z)
  yt = torch.from_numpy(y)
  att = APGDAttack_targeted(lambda x: x, eps=0.1, device='cpu')
  att.y_target = torch.from_numpy(t)
  return dict(
    dlr_logits=z,
    dlr_labels=y.astype(np.int32),
    dlr_targets=t.astype(np.int32),
    dlr=att.dlr_loss(zt, yt).numpy(),
    dlr_targeted=att.dlr_loss_targeted(zt, yt).numpy(),
  )


def checkpoints(model, x, y):
  """Iterations at which the reference checks its step size, per n_iter."""
  iters, checks, windows = [], [], []
  for n_iter in CHECKPOINT_ITERS:
    att = APGDAttack(model, n_iter=n_iter, eps=0.1, device='cpu')
    att.init_hyperparam(x)
    calls = []
    original = att.check_oscillation

    def record(loss_steps, j, k, loss_best, k3=0.75, calls=calls, f=original):
      calls.append((j, k))
      return f(loss_steps, j, k, loss_best, k3=k3)

    att.check_oscillation = record
    att.attack_single_run(x[:2], y[:2])
    for j, k in calls:
      iters.append(n_iter)
      checks.append(j)
      windows.append(k)
  return dict(
    checkpoint_num_steps=np.array(iters, np.int32),
    checkpoint_iters=np.array(checks, np.int32),
    checkpoint_windows=np.array(windows, np.int32),
  )


def start_points(x, norm, eps):
  rng = np.random.default_rng(1 if norm == 'linf' else 2)
  x = x.numpy()
  if norm == 'linf':
    d = eps * rng.uniform(-1.0, 1.0, x.shape)
  else:
    d = rng.normal(size=x.shape)
    d /= np.sqrt(np.sum(d**2, axis=(1, 2, 3), keepdims=True))
    d *= eps * rng.uniform(0.2, 1.0, (len(x), 1, 1, 1))
  return torch.from_numpy(np.clip(x + d, 0.0, 1.0).astype(np.float32))


def single_runs(model, x, y):
  n = NUM_TRAJECTORY_EXAMPLES
  x, y = x[:n], y[:n]
  with torch.no_grad():
    target = model(x).sort(dim=1)[1][:, -2]
  out = dict(trajectory_targets=target.numpy().astype(np.int32))
  starts = {}
  for norm in ('linf', 'l2'):
    starts[norm] = start_points(x, norm, EPS[norm])
    out[f'trajectory_start_{norm}'] = nhwc(starts[norm])
  for name, norm, loss in RUNS:
    rec = Recorder(model)
    if 'targeted' in loss:
      att = APGDAttack_targeted(
        rec, n_iter=100, norm=TORCH_NORM[norm], eps=EPS[norm], device='cpu'
      )
      att.loss = loss
      att.y_target = target
    else:
      att = APGDAttack(
        rec,
        n_iter=100,
        norm=TORCH_NORM[norm],
        eps=EPS[norm],
        loss=loss,
        device='cpu',
      )
    att.init_hyperparam(x)
    x_best, acc, loss_best, x_best_adv = att.attack_single_run(
      x, y, x_init=starts[norm]
    )
    with torch.no_grad():
      criterion = {
        'ce': lambda z, y: torch.nn.functional.cross_entropy(
          z, y, reduction='none'
        ),
        'dlr': att.dlr_loss,
        'dlr-targeted': getattr(att, 'dlr_loss_targeted', None),
        'ce-targeted': getattr(att, 'ce_loss_targeted', None),
      }[loss]
      losses = torch.stack([criterion(z, y) for z in rec.logits], 0)
    assert len(rec.logits) == 101, len(rec.logits)
    out[f'{name}_losses'] = losses.numpy()
    out[f'{name}_x_best'] = nhwc(x_best)
    out[f'{name}_x_best_adv'] = nhwc(x_best_adv)
    out[f'{name}_is_adv'] = (acc == 0).numpy()
    out[f'{name}_loss_best'] = loss_best.detach().numpy()
  return out


def robust(model, x, y, norm, attack, seed=0):
  kwargs = dict(n_iter=100, norm=TORCH_NORM[norm], n_restarts=1, eps=EPS[norm])
  kwargs.update(seed=seed, device='cpu')
  if attack == 'apgd-t':
    att = APGDAttack_targeted(model, n_target_classes=9, **kwargs)
  else:
    att = APGDAttack(model, loss=attack.split('-')[1], **kwargs)
  start = time.perf_counter()
  adv = att.perturb(x, y)
  seconds = time.perf_counter() - start
  with torch.no_grad():
    ok = model(adv).argmax(1) == y
  delta = (adv - x).reshape(len(x), -1)
  if norm == 'linf':
    res = delta.abs().max(1)[0]
  else:
    res = delta.square().sum(1).sqrt()
  ok = ok | (res > EPS[norm] * (1 + 1e-5))
  return ok.numpy(), seconds


def main():
  torch.set_num_threads(1)
  torch.manual_seed(0)
  _, _, x_test, y_test = digits_mlp.data()
  weights = digits_mlp.weights()
  model = torch_model(weights)
  x = nchw(x_test)
  y = torch.from_numpy(y_test.astype(np.int64))
  out = dlr_losses()
  # The weights themselves: scikit-learn's L-BFGS result depends on the
  # number of BLAS threads, so the tests must not retrain them.
  out.update({f'mlp_{k}': v for k, v in weights.items()})
  out.update(checkpoints(model, x, y))
  out.update(single_runs(model, x, y))
  with torch.no_grad():
    out['clean_correct'] = (model(x).argmax(1) == y).numpy()
  print(f'clean accuracy {out["clean_correct"].mean():.4f}')
  for norm in ('linf', 'l2'):
    out[f'eps_{norm}'] = np.float32(EPS[norm])
    for attack in ('apgd-ce', 'apgd-dlr', 'apgd-t'):
      name = f'{attack.replace("-", "_")}_{norm}'
      oks, times = [], []
      for seed in SEEDS:
        ok, seconds = robust(model, x, y, norm, attack, seed)
        oks.append(ok)
        times.append(seconds)
      out[f'robust_{name}'] = np.stack(oks)
      out[f'seconds_{name}'] = np.array(times)
      counts = [int(ok.sum()) for ok in oks]
      print(
        f'{attack} {norm} eps {EPS[norm]}: robust {np.mean(counts):.1f} '
        f'of {len(x)} (seeds {counts}), {np.median(times):.2f} s a call'
      )
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  np.savez_compressed(OUT, **out)
  print(f'wrote {OUT} ({os.path.getsize(OUT)} bytes)')


if __name__ == '__main__':
  main()
