"""Sanity checks against gradient masking, after an evaluation.

One measurement pass (`measure`) on the first `eval.sanity_num_examples`
examples collects what the checks need: clean accuracy, untargeted PGD
accuracy along an epsilon sweep, the other attack kind at the smallest step
count, and whether each input gradient is all zero or not finite. Each
check is then a small pure function of those numbers returning PASS or WARN
(SKIP when it does not apply) with its numbers. A margin of
`eval.sanity_tolerance` plus one example's worth of accuracy absorbs the
randomness of the attacks.

* `accuracy_falls_with_epsilon`: untargeted PGD (`eval.sanity_steps` steps
  of 2.5 eps / steps) at eps x `eval.sanity_epsilon_multiples` and at
  `eval.sanity_large_epsilon`: accuracy never rises with epsilon (starting
  from the clean accuracy).
* `large_epsilon_breaks_model`: at the large epsilon accuracy is 0 (at most
  the tolerance).
* `more_steps_never_help`: accuracy does not rise along the step sweep.
* `input_gradients`: the fraction of examples whose input gradient (of the
  cross-entropy at the clean image) is all zero or not finite is at most
  `eval.sanity_max_zero_gradient_fraction`.
* `untargeted_not_weaker`: untargeted PGD is at least as strong as targeted
  PGD at the same epsilon and the smallest step count.
"""

import collections
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from fdjax import data
from fdjax import input_pipeline

PASS, WARN, SKIP = 'PASS', 'WARN', 'SKIP'


@dataclasses.dataclass
class Measurements:
  """What the checks need, from one pass over the sanity examples.

  Attributes:
    num_examples: examples measured.
    clean: clean accuracy.
    epsilons: the epsilon sweep, ascending.
    sweep: untargeted PGD accuracy at each epsilon.
    num_steps: PGD steps of the sweep.
    other: accuracy of the other attack kind at the smallest step count of
      the evaluation's sweep (None without a sweep).
    zero_gradient: per example, the input gradient is all zero.
    bad_gradient: per example, the input gradient is not finite.
  """

  num_examples: int
  clean: float
  epsilons: list[float]
  sweep: list[float]
  num_steps: int
  other: float | None
  zero_gradient: np.ndarray
  bad_gradient: np.ndarray


def sweep_epsilons(ec: ml_collections.ConfigDict) -> list[float]:
  """eps x `sanity_epsilon_multiples`, then the large epsilon, ascending."""
  eps = float(ec.epsilon)
  epsilons = sorted({float(m) * eps for m in ec.sanity_epsilon_multiples})
  large = float(ec.sanity_large_epsilon)
  if large > epsilons[-1]:
    epsilons.append(large)
  return epsilons


def measure(
  runner: Any,
  ec: ml_collections.ConfigDict,
  dc: ml_collections.ConfigDict,
  source: data.Source,
  num_examples: int,
  other: tuple[str, int] | None,
) -> Measurements:
  """The measurement pass (on every process: the attacks are collective).

  Args:
    runner: the evaluation's runner (`fdjax.evaluate`).
    ec: `config.eval` (resolved).
    dc: `config.data`.
    source: the eval source.
    num_examples: how many of the first examples to measure.
    other: (kind, num_steps) of the other attack kind, or None.

  Returns:
    The `Measurements`.
  """
  epsilons = sweep_epsilons(ec)
  steps = int(ec.sanity_steps)
  correct = collections.defaultdict(list)
  zero_grad, bad_grad = [], []
  batches = input_pipeline.create_eval_iter(
    dc,
    global_batch_size=ec.global_batch_size,
    source=source,
    num_examples=num_examples,
  )
  for batch in batches:
    g = runner.place(batch)
    labels, mask = runner.gather(g['label']), runner.gather(g['mask'])
    mask = mask.astype(bool)
    correct['clean'].append((runner.predict(g) == labels)[mask])
    zero, bad = runner.input_gradient_flags(g)
    zero_grad.append(zero[mask])
    bad_grad.append(bad[mask])
    for e in epsilons:
      p, _, _ = runner.attack(
        g, 'untargeted', steps, epsilon=e, step_size=2.5 * e / steps
      )
      correct[e].append((p == labels)[mask])
    if other is not None:
      _, c, _, _ = runner.robust(g, labels, *other)
      correct['other'].append(c[mask])
  acc = {k: float(np.mean(np.concatenate(v))) for k, v in correct.items()}
  return Measurements(
    num_examples=num_examples,
    clean=acc['clean'],
    epsilons=epsilons,
    sweep=[acc[e] for e in epsilons],
    num_steps=steps,
    other=acc.get('other'),
    zero_gradient=np.concatenate(zero_grad),
    bad_gradient=np.concatenate(bad_grad),
  )


def _check(ok: bool, message: str, **numbers) -> dict[str, Any]:
  return dict(status=PASS if ok else WARN, message=message, **numbers)


def _skip(message: str) -> dict[str, Any]:
  return dict(status=SKIP, message=message)


def non_increasing(values: Sequence[float], slack: float) -> bool:
  """True if no value exceeds its predecessor by more than `slack`."""
  return all(b <= a + slack for a, b in zip(values, values[1:]))


def accuracy_falls_with_epsilon(m: Measurements, slack: float):
  chain = [m.clean] + m.sweep
  return _check(
    non_increasing(chain, slack),
    'accuracy should not rise with epsilon',
    epsilons=[0.0] + m.epsilons,
    accuracy=chain,
    num_steps=m.num_steps,
  )


def large_epsilon_breaks_model(m: Measurements, tolerance: float):
  return _check(
    m.sweep[-1] <= tolerance,
    f'accuracy should reach 0 at epsilon {m.epsilons[-1]:g}',
    epsilon=m.epsilons[-1],
    accuracy=m.sweep[-1],
  )


def more_steps_never_help(curve: Mapping[int, float], kind: str, slack: float):
  """`curve`: accuracy by step count of the evaluation's sweep."""
  if len(curve) < 2:
    return _skip('needs at least two step counts in eval.pgd_steps')
  steps = sorted(curve)
  accs = [curve[s] for s in steps]
  return _check(
    non_increasing(accs, slack),
    f'{kind} PGD accuracy should not rise with more steps',
    num_steps=steps,
    accuracy=accs,
  )


def input_gradients(m: Measurements, max_fraction: float):
  frac = float(np.mean(m.zero_gradient | m.bad_gradient))
  return _check(
    frac <= max_fraction,
    'input gradients should be non-zero and finite',
    zero_fraction=float(np.mean(m.zero_gradient)),
    nonfinite_fraction=float(np.mean(m.bad_gradient)),
    max_fraction=max_fraction,
  )


def untargeted_not_weaker(
  targeted_acc: float, untargeted_acc: float, num_steps: int, slack: float
):
  return _check(
    untargeted_acc <= targeted_acc + slack,
    f'untargeted accuracy should be <= targeted accuracy at {num_steps} steps',
    num_steps=num_steps,
    targeted_accuracy=targeted_acc,
    untargeted_accuracy=untargeted_acc,
  )


def run_checks(
  m: Measurements,
  ec: ml_collections.ConfigDict,
  *,
  sweep_kind: str | None,
  curve: Mapping[int, float],
  sweep_first: float | None,
  num_evaluated: int,
) -> dict[str, Any]:
  """All checks from the measurements and the evaluation's results.

  Args:
    m: the measurements.
    ec: `config.eval` (resolved).
    sweep_kind: 'targeted' or 'untargeted', the kind of the step sweep (None
      without attacks).
    curve: the sweep's accuracy by step count (all evaluated examples).
    sweep_first: the sweep's accuracy at its smallest step count on the
      measured examples.
    num_evaluated: examples of the whole evaluation.

  Returns:
    {'status': PASS or WARN, 'num_examples', 'checks': {name: {...}}}.
  """
  tol = float(ec.sanity_tolerance)
  slack = tol + 1.0 / m.num_examples
  checks = {
    'accuracy_falls_with_epsilon': accuracy_falls_with_epsilon(m, slack),
    'large_epsilon_breaks_model': large_epsilon_breaks_model(m, tol),
    'more_steps_never_help': more_steps_never_help(
      curve, sweep_kind, tol + 1.0 / max(num_evaluated, 1)
    ),
    'input_gradients': input_gradients(
      m, float(ec.sanity_max_zero_gradient_fraction)
    ),
  }
  if sweep_kind is not None and m.other is not None:
    pair = (sweep_first, m.other)
    targeted, untargeted = pair if sweep_kind == 'targeted' else pair[::-1]
    checks['untargeted_not_weaker'] = untargeted_not_weaker(
      targeted, untargeted, min(curve), slack
    )
  else:
    checks['untargeted_not_weaker'] = _skip('needs an attack in eval.pgd_steps')
  status = WARN if any(c['status'] == WARN for c in checks.values()) else PASS
  for name, c in checks.items():
    log = logging.warning if c['status'] == WARN else logging.info
    log('sanity check %s: %s (%s)', name, c['status'], c['message'])
  return {'status': status, 'num_examples': m.num_examples, 'checks': checks}
