"""The catastrophic-overfitting guard of single-step adversarial training.

Every `train.guard_every_steps` steps the train loop (`fdjax.train`) asks
`CollapseGuard` to measure clean, FGSM and PGD accuracy of the raw weights
on a fixed batch of training data (`fdjax.recipes.guard_accuracies`), kept
in ``guard.jsonl``; a collapse (`fdjax.recipes.find_collapse`) is logged and,
by `train.guard_action`, training goes on, stops, or returns to the last
checkpoint before it and stops (``guard_collapse.json`` records it, so a
rerun does not train on).
"""

import json
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

from fdjax import checkpoints
from fdjax import data
from fdjax import input_pipeline
from fdjax import preprocess
from fdjax import recipes


class CollapseGuard:
  """The catastrophic-overfitting guard of a training run (`fdjax.recipes`).

  Every `train.guard_every_steps` steps it measures clean, FGSM and PGD
  accuracy of the current (raw) weights on the first
  `train.guard_num_examples` training examples (eval preprocessing; as Wong
  et al.'s early stopping, a fixed batch of training data) and appends them
  to `workdir/guard.jsonl`. A collapse (`recipes.find_collapse`) is logged
  as an error and, by `train.guard_action`, training goes on ('warn'),
  stops there ('stop') or returns to the newest checkpoint at or before the
  last check before the collapse and stops ('rollback', deleting the later
  checkpoints). A stopped run writes `workdir/guard_collapse.json`; rerunning
  it evaluates without training further.
  """

  def __init__(self, config, workdir, model, start_step, train_source=None):
    tc = config.train
    self.every = int(tc.guard_every_steps)
    self.max_drop = float(tc.guard_max_drop)
    self.action = tc.guard_action
    self.workdir = workdir
    self.path = os.path.join(workdir, 'guard.jsonl')
    self.collapse_path = os.path.join(workdir, 'guard_collapse.json')
    self.is_main = jax.process_index() == 0
    self.stopped = self.every > 0 and os.path.exists(self.collapse_path)
    self.collapse = None
    self.history = []
    if self.every <= 0:
      return
    if os.path.exists(self.path):  # Resumed: the checks made so far.
      with open(self.path) as f:
        self.history = [json.loads(line) for line in f if line.strip()]
      self.history = [h for h in self.history if h['step'] <= start_step]
      if self.is_main:
        self._write_all()
    self.collapse = recipes.find_collapse(self.history, self.max_drop)
    source = train_source
    if source is None:
      source = data.get_source(config.data, config.data.train_split)
    n = min(int(tc.guard_num_examples), len(source))
    batch = next(
      input_pipeline.create_eval_iter(
        config.data,
        global_batch_size=n,
        process_index=0,
        process_count=1,
        source=source,
        num_examples=n,
      )
    )
    self.images = preprocess.to_unit_float(jnp.asarray(batch['image']))
    self.labels = jnp.asarray(batch['label'])
    self.key = jax.random.fold_in(jax.random.key(config.seed), 0x9A4D)

    def accuracies(variables, key, images, labels):
      return recipes.guard_accuracies(
        lambda x: model.apply(variables, x, train=False),
        key,
        images,
        labels,
        epsilon=float(config.attack.epsilon),
        pgd_steps=int(tc.guard_pgd_steps),
        norm=str(config.attack.norm),
      )

    self._accuracies = jax.jit(accuracies)

  def is_check(self, done: int) -> bool:
    return self.every > 0 and done % self.every == 0

  def _write_all(self):
    with open(self.path, 'w') as f:
      for h in self.history:
        f.write(json.dumps(h) + '\n')

  def measure(self, state: Any) -> dict[str, float]:
    """{'clean', 'fgsm', 'pgd'} accuracies of the raw weights."""
    acc = self._accuracies(state.variables, self.key, self.images, self.labels)
    return {k: float(v) for k, v in jax.device_get(acc).items()}

  def check(self, done: int, state: Any) -> dict[str, Any] | None:
    """Measures; returns the collapse if this check shows it first."""
    entry = {'step': done, **self.measure(state)}
    self.history.append(entry)
    if self.is_main:
      with open(self.path, 'a') as f:
        f.write(json.dumps(entry) + '\n')
    logging.info(
      'guard step %d: clean %.3f  FGSM %.3f  PGD %.3f (fixed training batch)',
      done,
      entry['clean'],
      entry['fgsm'],
      entry['pgd'],
    )
    if self.collapse is not None:
      return None
    self.collapse = recipes.find_collapse(self.history, self.max_drop)
    if self.collapse is None:
      drop = recipes.find_instability(self.history, self.max_drop)
      if drop is not None:
        logging.warning(
          'guard step %d: PGD accuracy %.3f and FGSM accuracy %.3f both '
          'fell more than %.2f below their %.3f and %.3f at step %d: a '
          'training instability, not catastrophic overfitting (which keeps '
          'FGSM accuracy); no action.',
          done,
          drop['pgd'],
          drop['fgsm'],
          self.max_drop,
          drop['best_pgd'],
          drop['best_fgsm'],
          drop['best_step'],
        )
      return None
    c = self.collapse
    if c['kind'] == 'drop':
      why = (
        f'PGD accuracy {c["pgd"]:.3f} fell more than {self.max_drop:.2f} '
        f'below its best {c["best_pgd"]:.3f} (step {c["best_step"]}) while '
        f'FGSM accuracy is {c["fgsm"]:.3f}'
      )
    else:
      why = (
        f'FGSM accuracy {c["fgsm"]:.3f} is above clean accuracy '
        f'{c["clean"]:.3f} and more than {self.max_drop:.2f} above PGD '
        f'accuracy {c["pgd"]:.3f}: the input gradient is masked'
      )
    logging.error(
      'CATASTROPHIC OVERFITTING at step %d: %s; train.guard_action=%r.',
      done,
      why,
      self.action,
    )
    return c

  def record_stop(self, collapse: dict[str, Any], **extra) -> None:
    self.stopped = True
    if self.is_main:
      with open(self.collapse_path, 'w') as f:
        json.dump(dict(collapse, action=self.action, **extra), f, indent=2)

  def rollback(self, manager, state: Any, collapse) -> Any:
    """Restores the newest checkpoint at or before the last healthy check."""
    manager.wait_until_finished()
    checks = [h['step'] for h in self.history if h['step'] < collapse['step']]
    healthy = max(checks) if checks else 0
    steps = [s for s in manager.all_steps() if s <= healthy]
    if not steps:
      logging.error(
        'No checkpoint at or before step %d to roll back to; stopping at '
        'step %d instead.',
        healthy,
        collapse['step'],
      )
      self.record_stop(collapse, rolled_back_to=None)
      return state
    target = max(steps)
    for s in manager.all_steps():
      if s > target:
        manager.delete(s)
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state,
    )
    state, meta = checkpoints.restore(manager, target, target=abstract)
    problem = checkpoints.verify(state, meta)
    if problem:  # The checkpoint to return to must itself be sound.
      raise checkpoints.CheckpointError(
        f'cannot roll back to checkpoint step {target}: {problem[1]}'
      )
    logging.error(
      'Rolled back to the checkpoint of step %d and stopped.', int(target)
    )
    self.record_stop(collapse, rolled_back_to=int(target))
    return state
