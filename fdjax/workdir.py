"""A workdir belongs to one run: its defining settings and a process lock.

`config.json` in a training workdir records the config of the run. A rerun
is compared with it field by field before anything is written: fields that
define the run (the model, the training data and its augmentation, the
training attack, the optimisation recipe, the seed) must be equal, or the
rerun is refused with the list of differences; fields that may change on
resume (`MAY_CHANGE`: the length of the run, logging and checkpoint
intervals, the parallel backend, evaluation, data loading) are allowed and
logged as such.

One process at a time: `lock(workdir)` holds an exclusive `fcntl.flock` on
`workdir/.lock` (which holds the owner's process id) for as long as the run
lasts; a second run stops at once naming that process. The operating system
drops the lock when the process ends, so a killed run never leaves it stuck.
"""

import contextlib
import errno
import fcntl
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from fdjax import config_base
from fdjax import data

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'

# Fields (or sections, ending in '.') that may differ on resume.
MAY_CHANGE = (
  'train.num_steps',
  'train.num_epochs',
  'train.log_every_steps',
  'train.checkpoint_every_steps',
  'train.max_checkpoints',
  'train.log_clean_accuracy',
  'train.parallel',
  'model.conv_impl',
  'data.data_dir',
  'data.num_workers',
  'data.prefetch',
  'data.eval_split',
  'data.eval_crop_fraction',
  'eval.',
  'attack_set.',  # --mode=attack (adversarial sets), not training.
)


class WorkdirError(RuntimeError):
  """A workdir holds another run, or another process uses it (one line)."""


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def _settings(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """{'model.depth': 152, ...}: the JSON values of every field."""
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  return _flatten(config)


def _defaults(recorded: dict[str, Any]) -> dict[str, Any]:
  """The defaults of every field (those of the recorded dataset's data)."""
  base = config_base.base_config()
  name = recorded.get('data', {}).get('name')
  if name in data.DATASETS:
    base.data = data.default_data_config(name)
  return _settings(base)


def may_change(field: str) -> bool:
  return any(
    field == f or (f.endswith('.') and field.startswith(f)) for f in MAY_CHANGE
  )


def differences(
  recorded: dict[str, Any], config: ml_collections.ConfigDict
) -> tuple[list[str], list[str]]:
  """(defining, allowed): the fields where `config` differs from a record.

  Args:
    recorded: the JSON dict of a workdir's `config.json`.
    config: the config of the rerun.

  Returns:
    Two lists of 'field: recorded -> now' strings.
  """
  old, new = _settings(recorded), _settings(config)
  defaults = _defaults(recorded)
  defining, allowed = [], []
  for field in sorted(set(old) | set(new)):
    a, b = old.get(field, '<absent>'), new.get(field, '<absent>')
    if field not in old and field in defaults and b == defaults[field]:
      continue  # A setting added since the record, at its default.
    if field not in new:
      allowed.append(f'{field}: {a!r} -> no longer a setting')
      continue
    if a != b:
      line = f'{field}: {a!r} -> {b!r}'
      (allowed if may_change(field) else defining).append(line)
  return defining, allowed


def check_and_record(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a config that differs from the workdir's run; records it.

  Call before anything else is written to `workdir` (process 0 writes).

  Raises:
    WorkdirError: the workdir's `config.json` differs in a defining field
      (all are listed), or it holds checkpoints without a `config.json`
      (e.g. an `fdjax.convert` output, which is not a training run).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    try:
      with open(path) as f:
        recorded = json.load(f)
    except (OSError, ValueError) as e:
      raise WorkdirError(
        f'{path} cannot be read ({e}); it records the run this workdir '
        'holds. Restore it or use another --workdir.'
      ) from None
    defining, allowed = differences(recorded, config)
    if defining:
      raise WorkdirError(
        f'{workdir} holds another run: {len(defining)} defining setting(s) '
        f'differ from its {CONFIG_FILE} ({"; ".join(defining)}). Use another '
        '--workdir, or rerun with the recorded values. May change on '
        f'resume: {", ".join(MAY_CHANGE)}.'
      )
    if allowed:
      logging.info(
        'Resuming %s with settings that may change on resume: %s',
        workdir,
        '; '.join(allowed),
      )
  elif _holds_checkpoints(workdir):
    raise WorkdirError(
      f'{workdir} holds checkpoints but no {CONFIG_FILE} (e.g. an '
      'fdjax.convert output): it is not a training run to resume. Train in '
      'another --workdir.'
    )
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, path)


def _holds_checkpoints(workdir: str) -> bool:
  directory = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(directory) and any(
    name.isdigit() for name in os.listdir(directory)
  )


def holds_checkpoints(workdir: str) -> bool:
  """Whether `workdir/checkpoints/` holds a step directory."""
  return _holds_checkpoints(workdir)


_HELD: dict[str, list[Any]] = {}  # Real path -> [open lock file, depth].


@contextlib.contextmanager
def lock(workdir: str):
  """Holds `workdir/.lock` exclusively (re-entrant within one process).

  Only process 0 of a multi-process run locks (the others follow it).

  Raises:
    WorkdirError: another process holds the lock (its id is named).
  """
  if jax.process_index() != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
  if path in _HELD:
    _HELD[path][1] += 1
    try:
      yield
    finally:
      _HELD[path][1] -= 1
    return
  f = open(path, 'a+')
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    f.seek(0)
    owner = f.read().strip() or 'unknown'
    f.close()
    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      raise
    raise WorkdirError(
      f'{workdir} is in use by process {owner} (lock {path}); wait for it '
      'to end or use another --workdir.'
    ) from None
  f.seek(0)
  f.truncate()
  f.write(f'{os.getpid()}\n')
  f.flush()
  _HELD[path] = [f, 1]
  try:
    yield
  finally:
    _HELD[path][1] -= 1
    if not _HELD[path][1]:
      del _HELD[path]
      f.seek(0)
      f.truncate()
      fcntl.flock(f, fcntl.LOCK_UN)
      f.close()
