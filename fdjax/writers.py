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
