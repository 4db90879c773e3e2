"""Metric writers: TensorBoard event files and a JSON-lines file.

Only the main process writes (pass `enabled=jax.process_index() == 0`).
"""

import json
import os
from typing import Any

import numpy as np

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Writes scalars to TensorBoard (tensorboardX) and `metrics.jsonl`.

  Examples:
    >>> import tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> writer = MetricWriter(workdir)
    >>> writer.write_scalars(1, {'loss': 0.5})
    >>> writer.close()
    >>> open(os.path.join(workdir, METRICS_FILE)).read().strip()
    '{"step": 1, "loss": 0.5}'
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self._enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    os.makedirs(workdir, exist_ok=True)
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')

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
