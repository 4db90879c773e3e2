"""The reference AutoAttack (PyTorch) on the digits MLP: the peer script.

Run from the reference's own virtual environment (never a dependency of
fdjax)::

  python3 -m venv /tmp/aa_ref && /tmp/aa_ref/bin/pip install pyautoattack \
      torch scikit-learn
  /tmp/aa_ref/bin/python benchmarks/autoattack_reference.py --out ref.json

It trains nothing itself: the weights come from tests/digits_mlp.py or
tests/digits_cnn.py (``--model``; committed, the same fdjax uses), so both
run the same model on the same examples. Prints and writes JSON: per-attack
robust accuracy (cumulative, as AutoAttack runs them), the time of each
attack, the total, and which attack broke each example.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from pyautoattack import AutoAttack
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
import digits_cnn  # noqa: E402
import digits_mlp  # noqa: E402


class MLP(torch.nn.Module):
  def __init__(self, w):
    super().__init__()
    self.w = {k: torch.tensor(v) for k, v in w.items()}

  def forward(self, x):
    h = torch.relu(x.reshape(len(x), -1) @ self.w['w1'] + self.w['b1'])
    return h @ self.w['w2'] + self.w['b2']


class CNN(torch.nn.Module):
  """tests/digits_cnn.py in torch: HWIO kernels as OIHW, HWC flattening."""

  def __init__(self, w):
    super().__init__()
    t = {k: torch.tensor(v) for k, v in w.items()}
    self.c1, self.c2 = (
      t[k].permute(3, 2, 0, 1).contiguous() for k in ('c1', 'c2')
    )
    self.b1, self.b2, self.w3, self.b3 = t['b1'], t['b2'], t['w3'], t['b3']

  def forward(self, x):
    f = torch.nn.functional
    h = f.avg_pool2d(torch.relu(f.conv2d(x, self.c1, self.b1, padding=1)), 2)
    h = f.avg_pool2d(torch.relu(f.conv2d(h, self.c2, self.b2, padding=1)), 2)
    return h.permute(0, 2, 3, 1).reshape(len(x), -1) @ self.w3 + self.b3


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--epsilon', type=float, default=0.1)
  parser.add_argument('--norm', default='Linf')
  parser.add_argument('--num_examples', type=int, default=297)
  parser.add_argument('--out', default=None)
  parser.add_argument('--model', default='mlp', choices=['mlp', 'cnn'])
  args = parser.parse_args()
  torch.set_num_threads(2)
  if args.model == 'mlp':
    model = MLP(digits_mlp.weights()).eval()
  else:
    model = CNN(digits_cnn.weights()).eval()
  _, _, x, y = digits_mlp.data()
  x, y = x[: args.num_examples], y[: args.num_examples]
  xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous()  # NCHW, 1 channel.
  yt = torch.tensor(y).long()
  adversary = AutoAttack(
    model, norm=args.norm, eps=args.epsilon, version='standard', seed=0
  )
  adversary.verbose = False
  with torch.no_grad():
    robust = model(xt).argmax(1) == yt
  rows = {'clean': float(robust.float().mean())}
  broken_by = np.where(robust.numpy(), -1, 0)
  times = {}
  start_all = time.perf_counter()
  names = list(adversary.attacks_to_run)
  for k, name in enumerate(names, start=1):
    idx = torch.nonzero(robust).flatten()
    start = time.perf_counter()
    if len(idx):
      # The standard version's settings (set at construction), one attack
      # at a time so that each is timed; the loop is the reference's own.
      adversary.attacks_to_run = [name]
      x_adv, _ = adversary.run_standard_evaluation(
        xt[idx], yt[idx], batch_size=len(idx)
      )
      with torch.no_grad():
        ok = model(x_adv).argmax(1) != yt[idx]
      robust[idx[ok]] = False
      broken_by[idx[ok].numpy()] = k
    times[name] = time.perf_counter() - start
    rows[name] = float(robust.float().mean())
  result = dict(
    attacks=names,
    robust_accuracy=rows,
    seconds=times,
    total_seconds=time.perf_counter() - start_all,
    broken_by=broken_by.tolist(),
    torch=torch.__version__,
  )
  print(json.dumps({k: v for k, v in result.items() if k != 'broken_by'}))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f)


if __name__ == '__main__':
  main()
