"""Metric writers: TensorBoard event files and a JSON-lines file.

Only the main process writes (pass `enabled=jax.process_index() == 0`).
Logs follow the state: a run resumed at `start_step` first drops the rows
of `metrics.jsonl` after that step (written by the abandoned run beyond its
last checkpoint) and asks TensorBoard to purge its events after it, so that
each step has exactly one row, that of the run that the state comes from.
"""

import json
import os
from typing import Any

import numpy as np

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Writes scalars to TensorBoard (tensorboardX) and `metrics.jsonl`.

  Args:
    workdir: where `metrics.jsonl` and `tensorboard/` go.
    enabled: False on processes other than the main one.
    start_step: the step the run starts from (resumes at); rows of later
      steps already in the files are dropped (JSON lines) or purged
      (TensorBoard).

  Examples:
    >>> import tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> writer = MetricWriter(workdir)
    >>> writer.write_scalars(1, {'loss': 0.5})
    >>> writer.close()
    >>> open(os.path.join(workdir, METRICS_FILE)).read().strip()
    '{"step": 1, "loss": 0.5}'
  """

  def __init__(
    self, workdir: str, *, enabled: bool = True, start_step: int = 0
  ):
    self._enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    truncate_rows(path, start_step)
    tb_dir = os.path.join(workdir, 'tensorboard')
    # TensorBoard hides the events of steps >= purge_step in older files.
    purge = int(start_step) + 1 if os.path.isdir(tb_dir) else None
    self._tb = SummaryWriter(tb_dir, purge_step=purge)
    self._jsonl = open(path, 'a')

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    if not self._enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for name, value in values.items():
      self._tb.add_scalar(name, value, global_step=step)
    self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')
    self._jsonl.flush()

  def flush(self) -> None:
    if self._enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self._enabled and self._jsonl is not None:
      self._tb.close()
      self._jsonl.close()
      self._jsonl = None


def truncate_rows(path: str, last_step: int) -> int:
  """Drops the rows of a JSON-lines metrics file after `last_step`.

  Also drops a torn line (a run killed while writing it). The file is
  replaced atomically.

  Args:
    path: a `metrics.jsonl` (nothing happens when it does not exist).
    last_step: the step the state is at; rows with a larger step go.

  Returns:
    The number of rows dropped.

  Examples:
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), METRICS_FILE)
    >>> _ = open(path, 'w').write(
    ...     '{"step": 2}\\n{"step": 4}\\n{"step": 6}\\n{"step": 8')
    >>> truncate_rows(path, 4), open(path).read()
    (2, '{"step": 2}\\n{"step": 4}\\n')
  """
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.read().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if int(row.get('step', 0)) <= last_step:
      kept.append(line if line.endswith('\n') else line + '\n')
  dropped = len(lines) - len(kept)
  if kept != lines:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


def format_duration(seconds: float) -> str:
  """``H:MM:SS`` for progress lines ('?' when unknown).

  Examples:
    >>> format_duration(3725.4), format_duration(float('nan'))
    ('1:02:05', '?')
  """
  if not np.isfinite(seconds):
    return '?'
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def eta(done: int, total: int, start_done: int, elapsed: float) -> str:
  """Remaining time from the rate since a start point, as `format_duration`.

  Args:
    done: units done so far (steps, examples).
    total: units in all.
    start_done: units already done when the clock started.
    elapsed: seconds since the clock started.

  Examples:
    >>> eta(30, 100, 10, 20.0)
    '0:01:10'
  """
  rate = (done - start_done) / elapsed if elapsed > 0 else 0.0
  return format_duration((total - done) / rate if rate > 0 else float('nan'))
