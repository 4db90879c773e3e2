"""AutoAttack rows of an evaluation, resumable batch by batch.

With ``config.eval.autoattack`` set ('standard', 'plus' or attack names),
`fdjax.evaluate` runs `fdjax.attacks.AutoAttack` on the evaluated examples
at ``eval.epsilon`` after the PGD attacks. Every finished attack batch is
appended (and flushed) to ``autoattack.jsonl`` in the evaluation's
directory; a rerun of the same evaluation skips those batches and ends with
the same per-example results as an uninterrupted run (a kill loses at most
the batch in flight). The rows use RobustBench's names: ``clean_acc`` and
``autoattack_acc``.
"""

from collections.abc import Mapping
import json
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from fdjax import attacks
from fdjax import config_base
from fdjax import data
from fdjax import preprocess
from fdjax import writers

LOG_FILE = 'autoattack.jsonl'
STATE_FILE = 'autoattack_state.json'


def settings(ec: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """Per-attack overrides from the eval config (steps, targets, queries)."""
  steps, targets = int(ec.autoattack_steps), int(ec.autoattack_target_classes)
  return {
    'apgd-ce': {'num_steps': steps},
    'apgd-dlr': {'num_steps': steps},
    'apgd-t': {'num_steps': steps, 'num_target_classes': targets},
    'fab': {'num_steps': steps},
    'fab-t': {'num_steps': steps, 'num_target_classes': targets},
    'square': {'num_queries': int(ec.autoattack_queries)},
  }


class _SourceImages:
  """The eval images, read and preprocessed batch by batch when AutoAttack
  asks for them (only a batch at a time is in memory)."""

  def __init__(self, dc: ml_collections.ConfigDict, source: data.Source, n):
    self._fn, self._source, self._n = preprocess.eval_fn(dc), source, n

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, idx: np.ndarray) -> np.ndarray:
    return np.stack([self._fn(self._source[int(i)]['image']) for i in idx])


def _read_log(path: str) -> dict[str, list[list[int]]]:
  done: dict[str, list[list[int]]] = {}
  if not os.path.exists(path):
    return done
  with open(path) as f:
    for line in f:
      if not line.endswith('\n'):
        break  # Torn by an interruption: that batch runs again.
      row = json.loads(line)
      batches = done.setdefault(row['attack'], [])
      if row['batch'] != len(batches):
        break
      batches.append(row['broken'])
  return done


def evaluate_autoattack(
  model: Any,
  variables: Any,
  ec: ml_collections.ConfigDict,
  dc: ml_collections.ConfigDict,
  source: data.Source,
  total: int,
  *,
  directory: str | None,
  fingerprint: str,
  mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
  """Runs AutoAttack on the first `total` examples (see the module doc).

  Args:
    model: the Flax model (applied with ``train=False``).
    variables: its variables (host arrays).
    ec: `config.eval` (resolved).
    dc: `config.data`.
    source: the eval source.
    total: how many examples.
    directory: where the batch log goes (None: in memory only).
    fingerprint: identifies the model's variables, so a log of another
      model is not resumed.
    mesh: the devices to split each attack batch over (None: the default
      device); `eval.global_batch_size` divides by them.

  Returns:
    {'version', 'attacks', 'norm', 'epsilon', 'clean_acc', 'autoattack_acc',
    'rows': {attack: cumulative robust accuracy}, 'broken_by': [total] int
    (0 clean error, k the k-th attack, -1 robust), 'resumed_batches',
    'checks' (the reference's warnings, `fdjax.attacks.AutoAttackResult`)}.
  """
  version, names = config_base.autoattack_names(ec.autoattack)
  aa = attacks.AutoAttack(
    lambda v, x: model.apply(v, x, train=False),
    epsilon=float(ec.epsilon),
    norm=ec.autoattack_norm,
    version=version,
    attacks=names if version == 'custom' else None,
    batch_size=int(ec.global_batch_size),
    settings=settings(ec),
    mesh=mesh,
  )
  state = {
    'variables': fingerprint,
    'attacks': list(aa.names),
    'settings': {n: aa.kwargs(n) for n in aa.names},
    'epsilon': float(ec.epsilon),
    'norm': ec.autoattack_norm,
    'seed': int(ec.autoattack_seed),
    'num_examples': int(total),
    'batch_size': int(ec.global_batch_size),
  }
  is_main = jax.process_index() == 0
  completed: dict[str, list[list[int]]] = {}
  log_path = None
  if directory is not None and is_main:
    os.makedirs(directory, exist_ok=True)
    log_path = os.path.join(directory, LOG_FILE)
    state_path = os.path.join(directory, STATE_FILE)
    old = None
    if os.path.exists(state_path):
      with open(state_path) as f:
        old = json.load(f)
    if old == state:
      completed = _read_log(log_path)
    elif os.path.exists(log_path):
      logging.warning(
        'AutoAttack log %s is of another model or setting; starting afresh.',
        log_path,
      )
      os.replace(log_path, log_path + '.stale')
    with open(state_path, 'w') as f:
      json.dump(state, f, indent=2)
    # Keep only the complete rows that will be resumed.
    with open(log_path, 'w') as f:
      for name, batches in completed.items():
        for b, broken in enumerate(batches):
          f.write(json.dumps(dict(attack=name, batch=b, broken=broken)) + '\n')
  resumed = sum(len(b) for b in completed.values())
  if resumed:
    logging.info('AutoAttack resumes after %d finished batches', resumed)

  images, labels = _SourceImages(dc, source, total), data.labels(source, total)
  clock = {'start': time.perf_counter(), 'attack': None, 'done': 0}

  def on_batch(name, batch, points, broken, todo, robust):
    if clock['attack'] != name:
      clock.update(attack=name, start=time.perf_counter(), done=0)
    clock['done'] += len(points)
    if log_path is not None:
      row = dict(attack=name, batch=batch, broken=[int(i) for i in broken])
      with open(log_path, 'a') as f:
        f.write(json.dumps(row) + '\n')
        f.flush()
        os.fsync(f.fileno())
    if is_main:
      elapsed = time.perf_counter() - clock['start']
      logging.info(
        'autoattack %s: %d/%d points attacked, %d of %d still robust, ETA %s',
        name,
        clock['done'],
        todo,
        robust,
        total,
        writers.eta(clock['done'], todo, 0, elapsed),
      )

  result = aa(
    jax.tree.map(np.asarray, variables),
    jax.random.key(int(ec.autoattack_seed)),
    images,
    labels,
    on_batch=on_batch,
    completed=completed,
    return_adversarial=False,
  )
  return {
    'version': version,
    'attacks': list(result.attacks),
    'norm': ec.autoattack_norm,
    'epsilon': float(ec.epsilon),
    'clean_acc': result.robust_accuracy['clean'],
    'autoattack_acc': list(result.robust_accuracy.values())[-1],
    'rows': {n: result.robust_accuracy[n] for n in result.attacks},
    'broken_by': result.broken_by.tolist(),
    'resumed_batches': resumed,
    'checks': result.checks,
  }


def table_columns(aa: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """The AutoAttack rows as `results['attacks']` entries (table columns)."""
  cols = {}
  for name, acc in aa['rows'].items():
    cols[f'autoattack.{name}'] = {
      'kind': 'autoattack',
      'label': f'AA {name}',
      'accuracy': acc,
      'success_rate': None,
    }
  cols['autoattack'] = {
    'kind': 'autoattack',
    'label': f'AutoAttack ({aa["version"]})',
    'accuracy': aa['autoattack_acc'],
    'success_rate': None,
  }
  return cols


def add_to_results(results, cols, aa) -> None:
  """AutoAttack's rows, columns and its share of the all-or-nothing row."""
  broken_by = np.asarray(aa.pop('broken_by'), np.int32)
  cols['autoattack.broken_by'] = broken_by
  results['autoattack'] = aa
  results['clean_acc'] = aa['clean_acc']
  results['autoattack_acc'] = aa['autoattack_acc']
  results['attacks'].update(table_columns(aa))
  aon = results.get('all_or_nothing') or {
    'attacks': [],
    'correct': len(broken_by),
  }
  robust = broken_by == -1
  if aon['attacks']:
    for name in aon['attacks']:
      robust &= cols[f'{name}.correct'].astype(bool)
  results['all_or_nothing'] = {
    'attacks': aon['attacks'] + ['autoattack'],
    'accuracy': float(np.mean(robust)) if len(robust) else float('nan'),
    'correct': int(np.sum(robust)),
  }
