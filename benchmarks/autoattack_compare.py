"""fdjax's AutoAttack against the reference on the same model and examples.

  python benchmarks/autoattack_reference.py --out ref.json   # its own venv
  python benchmarks/autoattack_compare.py --reference ref.json

The model is tests/digits_mlp.py (the same weights in both frameworks), the
examples the 297 held-out digits. Prints a table: per attack the robust
accuracy after it (cumulative) of fdjax and of the reference, seconds per
attack (fdjax's first call includes compiling; the second call of the same
model compiles nothing), and how many examples the two disagree on.
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from fdjax import attacks

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
import digits_mlp  # noqa: E402


def _timed_run(aa, w, x, y):
  """(result, seconds per attack, total seconds) of one call."""
  per_attack = {}
  clock = {'t': time.perf_counter()}

  def on_batch(name, *_):
    now = time.perf_counter()
    per_attack[name] = per_attack.get(name, 0.0) + now - clock['t']
    clock['t'] = now

  start = clock['t']
  r = aa(w, jax.random.key(0), x, y, on_batch=on_batch)
  return r, per_attack, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--reference', default=None)
  parser.add_argument('--epsilon', type=float, default=0.1)
  parser.add_argument('--norm', default='linf')
  parser.add_argument('--num_examples', type=int, default=297)
  parser.add_argument('--batch_size', type=int, default=297)
  args = parser.parse_args()
  w = digits_mlp.weights()
  _, _, x, y = digits_mlp.data()
  x, y = x[: args.num_examples], y[: args.num_examples]
  aa = attacks.AutoAttack(
    lambda p, z: digits_mlp.logits_fn(p)(z),
    epsilon=args.epsilon,
    norm=args.norm,
    batch_size=args.batch_size,
  )
  runs = [_timed_run(aa, w, x, y) for _ in range(2)]
  (r, first, total1), (_, second, total2) = runs
  ref = None
  if args.reference:
    with open(args.reference) as f:
      ref = json.load(f)
  print(
    f'AutoAttack standard, {args.norm} eps {args.epsilon}, '
    f'{len(y)} digits, jax {jax.__version__} on {jax.default_backend()}'
  )
  print(
    '| attack | fdjax robust % | reference robust % | fdjax s (1st call) '
    '| fdjax s (2nd call) | reference s | ratio (1st) | ratio (2nd) |'
  )
  print('|---|---|---|---|---|---|---|---|')
  rows = [('clean', None)] + [(n, n) for n in r.attacks]
  for name, key in rows:
    ours = 100 * r.robust_accuracy[name]
    theirs = 100 * ref['robust_accuracy'][name] if ref else float('nan')
    if key is None:
      print(f'| clean | {ours:.2f} | {theirs:.2f} | | | | | |')
      continue
    t1, t2 = first.get(key, 0.0), second.get(key, 0.0)
    tr = ref['seconds'][key] if ref else float('nan')
    print(
      f'| {name} | {ours:.2f} | {theirs:.2f} | {t1:.1f} | {t2:.1f} | '
      f'{tr:.1f} | {tr / max(t1, 1e-9):.1f}x | {tr / max(t2, 1e-9):.1f}x |'
    )
  tr = ref['total_seconds'] if ref else float('nan')
  print(
    f'| total | | | {total1:.1f} | {total2:.1f} | {tr:.1f} | '
    f'{tr / total1:.1f}x | {tr / total2:.1f}x |'
  )
  if ref:
    theirs = np.asarray(ref['broken_by']) == -1
    ours = r.broken_by == -1
    print(
      f'robust by fdjax only: {int(np.sum(ours & ~theirs))}, by the '
      f'reference only: {int(np.sum(theirs & ~ours))} (of {len(y)})'
    )


if __name__ == '__main__':
  main()
