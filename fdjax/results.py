"""Evaluation results on disk: the per-example store, resumption, the table.

With a workdir, an evaluation writes to ``workdir/eval/<name>/`` (or the
directory it is given):

* ``per_example.jsonl``: one JSON line per example (``index``, ``label``,
  ``clean_pred``, ``clean_correct`` and, per attack ``<a>``, ``<a>.pred``,
  ``<a>.correct``, ``<a>.success`` and, for targeted attacks,
  ``<a>.target``), appended and flushed after every batch. Rerunning the
  same evaluation resumes after the last example written; a different model
  or attack setting starts afresh and keeps the old file as
  ``per_example.jsonl.stale`` (``num_examples`` may grow between runs).
* ``per_example.npz``: the same columns as arrays, at the end.
* ``results.json``: the aggregated results.
"""

from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
import hashlib
import json
import math
import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

PER_EXAMPLE_FILE = 'per_example.jsonl'
PER_EXAMPLE_NPZ = 'per_example.npz'
STATE_FILE = 'state.json'
RESULTS_FILE = 'results.json'


def fingerprint(variables: Any) -> str:
  """A digest of the variables, to tell whether stored results are theirs."""
  h = hashlib.blake2b(digest_size=16)
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(arr.dtype).encode() + str(arr.shape).encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def to_json_value(x):
  if isinstance(x, (np.bool_, bool)):
    return bool(x)
  if isinstance(x, (np.integer,)):
    return int(x)
  return x


class Store:
  """Per-example results on disk (process 0 only), resumable."""

  def __init__(self, directory: str | None, state: dict[str, Any]):
    self.directory = directory
    self.rows: list[dict[str, Any]] = []
    self.is_main = jax.process_index() == 0
    if directory is None or not self.is_main:
      return
    os.makedirs(directory, exist_ok=True)
    self.path = os.path.join(directory, PER_EXAMPLE_FILE)
    state_path = os.path.join(directory, STATE_FILE)
    old_state = None
    if os.path.exists(state_path):
      with open(state_path) as f:
        old_state = json.load(f)
    if old_state == state:
      self.rows = self._read()
    elif os.path.exists(self.path):
      logging.warning(
        'Stored results in %s are of another model or attack setting; '
        'starting afresh (old file kept as %s.stale).',
        directory,
        PER_EXAMPLE_FILE,
      )
      os.replace(self.path, self.path + '.stale')
    with open(state_path, 'w') as f:
      json.dump(state, f, indent=2)
    self._rewrite()

  def _read(self) -> list[dict[str, Any]]:
    rows = []
    if not os.path.exists(self.path):
      return rows
    with open(self.path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          break  # A line torn by an interruption: redo from there.
        if not line.endswith('\n') or row.get('index') != len(rows):
          break
        rows.append(row)
    return rows

  def _rewrite(self):
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      for row in self.rows:
        f.write(json.dumps(row) + '\n')
    os.replace(tmp, self.path)

  @property
  def num_done(self) -> int:
    n = len(self.rows)
    if jax.process_count() > 1:
      n = int(multihost_utils.broadcast_one_to_all(np.int64(n)))
    return n

  def append(self, rows: list[dict[str, Any]]):
    self.rows.extend(rows)
    if self.directory is None or not self.is_main:
      return
    with open(self.path, 'a') as f:
      f.write(''.join(json.dumps(row) + '\n' for row in rows))
      f.flush()
      os.fsync(f.fileno())


def columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  if not rows:
    return {}
  return {k: np.asarray([row[k] for row in rows]) for k in rows[0]}


def broadcast_json(obj: Any) -> Any:
  """Process 0's JSON-able object on every process."""
  if jax.process_count() == 1:
    return obj
  is_main = jax.process_index() == 0
  data = json.dumps(obj).encode() if is_main else b''
  n = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
  buf = np.zeros(n, np.uint8)
  if is_main:
    buf[:] = np.frombuffer(data, np.uint8)
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return json.loads(buf.tobytes().decode())


def write(
  directory: str, results: dict[str, Any], cols: Mapping[str, np.ndarray]
) -> dict[str, str]:
  """Writes the per-example arrays and results.json (process 0 only).

  Returns:
    {'per_example', 'per_example_npz', 'results'}: the paths, also added to
    `results['files']` before results.json is written.
  """
  npz = os.path.join(directory, PER_EXAMPLE_NPZ)
  np.savez(npz, **cols)
  files = dict(
    per_example=os.path.join(directory, PER_EXAMPLE_FILE),
    per_example_npz=npz,
    results=os.path.join(directory, RESULTS_FILE),
  )
  results.setdefault('files', {}).update(files)
  with open(files['results'], 'w') as f:
    json.dump(results, f, indent=2)
  return files


# ---------------------------------------------------------------------------
# The table.


def _pct(x: float | None) -> str:
  if x is None or not math.isfinite(x):
    return '-'
  return f'{100.0 * x:.1f}'


def format_table(
  results: Mapping[str, Any] | Iterable[Mapping[str, Any]],
  *,
  sanity: bool = True,
) -> str:
  """A markdown table like the original's model zoo, plus the sanity checks.

  One row per results dict: model, clean accuracy, then per attack the
  accuracy with the attack success rate in parentheses (targeted: the
  prediction is the target; untargeted: misclassified), then the
  all-or-nothing accuracy. All in percent.

  Args:
    results: one `evaluate` result or several (one row each).
    sanity: append the sanity checks of each result.

  Returns:
    The table as text.

  Examples:
    >>> r = {'model': 'R152-Denoise', 'num_examples': 50000,
    ...      'epsilon_255': 16.0, 'restarts': 1,
    ...      'clean': {'accuracy': 0.653},
    ...      'attacks': {'targeted_pgd_10': {
    ...          'label': '10-step PGD', 'accuracy': 0.557,
    ...          'success_rate': 0.001}},
    ...      'all_or_nothing': {'accuracy': 0.557}}
    >>> print(format_table(r))
    | model | clean | 10-step PGD | all-or-nothing |
    |---|---|---|---|
    | R152-Denoise | 65.3 | 55.7 (0.1) | 55.7 |
    <BLANKLINE>
    accuracy % (success %); L-inf eps 16/255, 1 restart(s), 50000 examples.
  """
  rows = [results] if isinstance(results, Mapping) else list(results)
  columns = {}
  for r in rows:
    for name, a in r.get('attacks', {}).items():
      columns.setdefault(name, a.get('label', name))
  has_aon = any(r.get('all_or_nothing') for r in rows)
  header = ['model', 'clean', *columns.values()]
  header += ['all-or-nothing'] if has_aon else []
  lines = [
    '| ' + ' | '.join(header) + ' |',
    '|' + '---|' * len(header),
  ]
  for r in rows:
    cells = [str(r.get('model', '?')), _pct(r['clean']['accuracy'])]
    for name in columns:
      a = r.get('attacks', {}).get(name)
      if a is None:
        cells.append('-')
      else:
        rate = a.get('success_rate')
        rate = '' if rate is None else f' ({_pct(rate)})'
        cells.append(f'{_pct(a["accuracy"])}{rate}')
    if has_aon:
      aon = r.get('all_or_nothing')
      cells.append(_pct(aon['accuracy']) if aon else '-')
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines.append('')
  notes = {
    f'accuracy % (success %); L-inf eps '
    f'{r.get("epsilon_255", float("nan")):g}/255, '
    f'{r.get("restarts", 1)} restart(s), {r.get("num_examples", "?")} '
    'examples.'
    for r in rows
  }
  lines += sorted(notes)
  if sanity:
    for r in rows:
      s = r.get('sanity')
      if not s:
        continue
      lines.append(
        f'sanity checks of {r.get("model", "?")} (first '
        f'{s["num_examples"]} examples): {s["status"]}'
      )
      for name, c in s['checks'].items():
        numbers = ', '.join(
          f'{k}={_fmt(v)}'
          for k, v in c.items()
          if k not in ('status', 'message')
        )
        lines.append(f'  [{c["status"]}] {name}: {c["message"]}; {numbers}')
    for r in rows:
      checks = (r.get('autoattack') or {}).get('checks')
      if not checks:
        continue
      warned = sum(c['status'] != 'ok' for c in checks.values())
      lines.append(
        f'AutoAttack checks of {r.get("model", "?")}: '
        + (f'{warned} warning(s)' if warned else 'ok')
      )
      for name, c in checks.items():
        lines.append(f'  [{c["status"]}] {name}: {c["message"]}')
  return '\n'.join(lines)


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f'{v:.4g}'
  if isinstance(v, (list, tuple)):
    return '[' + ', '.join(_fmt(x) for x in v) + ']'
  return str(v)
