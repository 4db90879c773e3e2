"""Orbax checkpoints of fdjax runs and converted models, verified.

A workdir holds `checkpoints/<step>/` written by an orbax `CheckpointManager`
with two items: 'state' (a pytree holding at least 'params' and
'batch_stats'; a training run adds 'opt_state', 'step' and 'rng') and 'meta'
(JSON: the model settings, so that a checkpoint can be evaluated without its
training config, and `checksums`: the CRC-32 of every array's bytes, with
its dtype and shape). `fdjax.convert` writes the same layout at step 0.

Integrity (docs/reliability.md):

* `save` refuses a state with a non-finite floating-point value
  (`FloatingPointError`) and checks, before orbax starts, that the
  directory is writable and has room; a write that fails later is one
  `CheckpointError` line naming the directory and the last complete step.
* `restore_newest` tries the newest step first and falls back step by step
  to the newest one that restores *and* verifies (checksums, every float
  finite), with one warning line per skipped step; with `reject=True`
  (training) the skipped steps are moved to `checkpoints/rejected/` so that
  they are never picked again nor counted by `max_to_keep`. When no step
  restores, one `CheckpointError` lists each step and why.
"""

import errno
import logging as std_logging
import os
import re
import shutil
import tempfile
from typing import Any
import zlib

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fdjax import data
from fdjax import models

CHECKPOINT_DIR = 'checkpoints'
REJECTED_DIR = 'rejected'
_SAVE_MARGIN_BYTES = 1 << 20  # Metadata beside the arrays.


class CheckpointError(RuntimeError):
  """No checkpoint restores, or one cannot be written (a one-line message)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


class _QuietOrbaxTasks(std_logging.Filter):
  """Drops asyncio's tracebacks of failed orbax tasks (one per array).

  A failed write or read surfaces once, as a `CheckpointError`, instead of a
  traceback per array from orbax's background event loops.
  """

  def filter(self, record):
    if record.levelno < std_logging.ERROR:
      return True
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += repr(record.exc_info[1])
      tb = record.exc_info[2]
      while tb is not None:
        text += tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return 'orbax' not in text and 'Event loop is closed' not in text


class _ShortOrbaxErrors(std_logging.Filter):
  """Shortens orbax's own error records to one line (no traceback)."""

  def filter(self, record):
    if record.levelno >= std_logging.ERROR and '/orbax/' in record.pathname:
      message = record.getMessage().splitlines()[0] if record.msg else ''
      record.msg = message[:300] + ('...' if len(message) > 300 else '')
      record.args = None
      record.exc_info = record.exc_text = None
    return True


_ASYNCIO_FILTER = _QuietOrbaxTasks()
_ORBAX_FILTER = _ShortOrbaxErrors()


def _quiet_asyncio() -> None:
  for name, f in (('asyncio', _ASYNCIO_FILTER), ('absl', _ORBAX_FILTER)):
    logger = std_logging.getLogger(name)
    if f not in logger.filters:
      logger.addFilter(f)


def create_manager(
  workdir: str,
  *,
  max_to_keep: int | None = 3,
  enable_async: bool = True,
) -> ocp.CheckpointManager:
  """An orbax CheckpointManager for `workdir/checkpoints`."""
  _quiet_asyncio()
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    create=True,
    enable_async_checkpointing=enable_async,
  )
  return ocp.CheckpointManager(
    checkpoint_dir(workdir), options=options, item_names=('state', 'meta')
  )


# ---------------------------------------------------------------------------
# Integrity: names, checksums and finiteness of a state's arrays.


def _key_name(entry: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def named_arrays(tree: Any) -> dict[str, np.ndarray]:
  """{'params/conv0/kernel': host array} of a pytree's leaves.

  The names are the same for a `TrainState` and for the dicts and lists
  orbax restores it as without a target (attribute, key and index alike).
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(map(_key_name, p)): _host(x) for p, x in leaves}


def checksum(array: np.ndarray) -> str:
  """'float32[3,3,16]:1a2b3c4d': dtype, shape and CRC-32 of the bytes."""
  array = np.ascontiguousarray(array)
  crc = zlib.crc32(array.reshape(-1).view(np.uint8))
  shape = ','.join(map(str, array.shape))
  return f'{array.dtype}[{shape}]:{crc:08x}'


def nonfinite(arrays: dict[str, np.ndarray]) -> list[str]:
  """The names of floating-point arrays holding a NaN or an infinity."""
  return [
    name
    for name, a in arrays.items()
    if jnp.issubdtype(a.dtype, jnp.floating)
    and not np.isfinite(a.astype(np.float32)).all()
  ]


def _few(names: list[str]) -> str:
  more = f' and {len(names) - 3} more' if len(names) > 3 else ''
  return ', '.join(names[:3]) + more


def verify(state: Any, meta: dict[str, Any]) -> tuple[str, str] | None:
  """Why a restored checkpoint is not to be used, or None when it is good.

  Args:
    state: the restored state pytree.
    meta: its restored meta (`checksums` from `save`; checkpoints written
      before fdjax recorded them are checked for finiteness only).

  Returns:
    None, or (code, reason): code is 'checksum' or 'nonfinite' (a short
    name for the rejected directory), reason a phrase for the log.
  """
  arrays = named_arrays(state)
  expected = meta.get('checksums')
  if expected is not None:
    bad = [n for n, a in arrays.items() if expected.get(n) != checksum(a)]
    if bad:
      return 'checksum', (
        f'checksum mismatch in {len(bad)} of {len(arrays)} arrays ({_few(bad)})'
      )
  bad = nonfinite(arrays)
  if bad:
    return 'nonfinite', (
      f'non-finite values in {len(bad)} arrays ({_few(bad)})'
    )
  return None


def _one_line(error: BaseException) -> str:
  """A short one-line summary of an orbax/tensorstore/OS error."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  code = re.search(r"os_error_code='(\d+)'", text)
  if code:  # tensorstore: the OS error is what matters.
    return f'{os.strerror(int(code[1]))} (tensorstore: {text[:120]}...)'
  for tail in (' [tensorstore_spec', ' [source locations', '. See full'):
    text = text.split(tail)[0]
  if len(text) > 240:
    text = text[:237] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


# ---------------------------------------------------------------------------
# Saving.


def complete_steps(manager: ocp.CheckpointManager) -> list[int]:
  """The steps whose directories orbax finished (sorted)."""
  manager.reload()
  return sorted(manager.all_steps())


def _last_complete(manager: ocp.CheckpointManager, exclude=()) -> str:
  try:
    steps = [s for s in complete_steps(manager) if s not in exclude]
  except Exception:  # noqa: BLE001 - the message must not fail itself.
    steps = []
  if not steps:
    return 'there is no complete checkpoint'
  return (
    f'the last complete checkpoint is step {steps[-1]} '
    f'({os.path.join(str(manager.directory), str(steps[-1]))})'
  )


def _check_writable(directory: str, step: int, needed: int, manager) -> None:
  """Fails before orbax starts when `directory` cannot take `needed` bytes."""
  if '://' in directory:  # Cloud storage: nothing to measure here.
    return
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix='.write_test'):
      pass
    free = shutil.disk_usage(directory).free
  except OSError as e:
    raise CheckpointError(
      f'cannot write checkpoint step {step} to {directory}: '
      f'{e.strerror or e}; {_last_complete(manager)}.'
    ) from None
  if free < needed:
    raise CheckpointError(
      f'cannot write checkpoint step {step} to {directory}: it needs about '
      f'{needed / 2**20:.1f} MiB and the disk has {free / 2**20:.1f} MiB '
      f'free ({os.strerror(errno.ENOSPC)}); {_last_complete(manager)}.'
    )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  meta: dict[str, Any] | None = None,
  *,
  force: bool = False,
) -> bool:
  """Saves `state` (a pytree) and `meta` (JSON-able dict) at `step`.

  The meta gets `checksums` ({array name: `checksum`}) for `restore_newest`
  to verify.

  Raises:
    FloatingPointError: a floating-point array of `state` is not finite
      (nothing is written).
    CheckpointError: the directory is not writable, has no room, or an
      earlier asynchronous save failed (one line: the directory and the
      last complete checkpoint).
  """
  arrays = named_arrays(state)
  bad = nonfinite(arrays)
  if bad:
    raise FloatingPointError(
      f'non-finite values in {len(bad)} arrays ({_few(bad)}) of the state '
      f'at step {step}, not saved'
    )
  meta = dict(meta or {})
  meta['checksums'] = {name: checksum(a) for name, a in arrays.items()}
  directory = str(manager.directory)
  needed = sum(a.nbytes for a in arrays.values()) + _SAVE_MARGIN_BYTES
  _check_writable(directory, step, needed, manager)
  try:
    return manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(meta),
      ),
      force=force,
    )
  except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types.
    raise CheckpointError(
      f'could not write a checkpoint to {directory} ({_one_line(e)}); '
      f'{_last_complete(manager, exclude=(step,))}.'
    ) from None


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for asynchronous saves; a failed one is one `CheckpointError`."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(
      f'could not write a checkpoint to {manager.directory} '
      f'({_one_line(e)}); {_last_complete(manager)}.'
    ) from None


# ---------------------------------------------------------------------------
# Restoring.


def restore(
  manager: ocp.CheckpointManager,
  step: int | None = None,
  target: Any = None,
) -> tuple[Any, dict[str, Any]]:
  """Restores (state, meta) at `step` (default: the newest), unverified.

  Args:
    manager: from `create_manager`.
    step: the step to restore; None for the newest.
    target: optional pytree of arrays or `jax.ShapeDtypeStruct`s giving the
      structure, dtypes and shardings to restore into.

  Returns:
    The state pytree and the meta dict.

  Raises:
    FileNotFoundError: the directory holds no checkpoint.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}')
  if target is None:
    target = _local_target(manager, step)
  state_args = (
    ocp.args.StandardRestore(target)
    if target is not None
    else ocp.args.StandardRestore()
  )
  restored = manager.restore(
    step,
    args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()),
  )
  return restored.state, dict(restored.meta or {})


def _local_target(manager: ocp.CheckpointManager, step: int) -> Any:
  """A target that restores every array of `step` onto this process's first
  device, whatever devices and processes wrote it (orbax otherwise restores
  onto the writer's topology, and a pod's checkpoint would not load on one
  host); None when the manager cannot read the metadata."""
  try:
    metadata = manager.item_metadata(step)
    tree = metadata['state']
  except (KeyError, TypeError, ValueError):
    return None
  if tree is None:
    return None
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(x):
    if hasattr(x, 'shape') and hasattr(x, 'dtype'):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
    return x

  return jax.tree.map(leaf, tree)


def _try_restore(manager, step, target):
  """(state, meta, None) or (None, None, (code, reason))."""
  try:
    state, meta = restore(manager, step, target)
  except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types.
    directory = _step_dir(manager, step)
    empty = os.path.isdir(directory) and not os.listdir(directory)
    code = 'empty' if empty else 'unreadable'
    return None, None, (code, _one_line(e))
  problem = verify(state, meta)
  if problem:
    return None, None, problem
  return state, meta, None


def _step_dir(manager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def reject(manager: ocp.CheckpointManager, step: int, code: str) -> str:
  """Moves `checkpoints/<step>` to `checkpoints/rejected/<step>-<code>`."""
  root = os.path.join(str(manager.directory), REJECTED_DIR)
  os.makedirs(root, exist_ok=True)
  dest = os.path.join(root, f'{step}-{code}')
  n = 1
  while os.path.exists(dest):
    dest = os.path.join(root, f'{step}-{code}-{n}')
    n += 1
  os.rename(_step_dir(manager, step), dest)
  return dest


def restore_newest(
  manager: ocp.CheckpointManager,
  target: Any = None,
  *,
  reject_bad: bool = False,
) -> tuple[Any, dict[str, Any], int] | None:
  """The newest checkpoint that restores and verifies, falling back.

  Each skipped step gets one warning line with the reason.

  Args:
    manager: from `create_manager`.
    target: as `restore`.
    reject_bad: move the steps skipped before the good one to
      `checkpoints/rejected/<step>-<code>` (training), so that they are
      never picked again nor counted by `max_to_keep`. Nothing is moved
      when no step restores.

  Returns:
    (state, meta, step), or None when the directory holds no step.

  Raises:
    CheckpointError: no step restores (each step and why).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  failures = []
  for step in steps:
    state, meta, problem = _try_restore(manager, step, target)
    if problem is None:
      if reject_bad and failures and jax.process_index() == 0:
        for bad_step, code, _ in failures:
          dest = reject(manager, bad_step, code)
          logging.warning('Moved checkpoint step %d to %s', bad_step, dest)
      if failures:
        manager.reload()
      return state, meta, step
    code, reason = problem
    logging.warning(
      'Skipping checkpoint step %d in %s: %s', step, manager.directory, reason
    )
    failures.append((step, code, reason))
  listing = '; '.join(f'step {s}: {r}' for s, _, r in failures)
  raise CheckpointError(
    f'no checkpoint in {manager.directory} restores ({listing}). Move the '
    'damaged steps aside (or delete them) to start again.'
  )


def load_variables(
  workdir: str, step: int | None = None, *, use_ema: bool = False
):
  """Loads the model variables and meta of a workdir's newest good checkpoint.

  Works on training workdirs and on `fdjax.convert` outputs alike, and on
  read-only directories (nothing is written or moved: a damaged newest step
  is skipped with a warning, as `restore_newest`).

  Args:
    workdir: a directory with a `checkpoints/` subdirectory.
    step: the step to load (it must verify); None for the newest good one.
    use_ema: load the weights' moving average ('ema_params' and
      'ema_batch_stats', `train.ema_decay`) when the checkpoint has one.

  Returns:
    (variables, meta, step) with variables = {'params', 'batch_stats'} as
    host numpy arrays.

  Raises:
    FileNotFoundError: the workdir holds no checkpoint.
    CheckpointError: no checkpoint (or not `step`) restores and verifies.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoint in {directory}')
  _quiet_asyncio()
  manager = ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(
      create=False, enable_async_checkpointing=False
    ),
    item_handlers={
      'state': ocp.StandardCheckpointHandler(),
      'meta': ocp.JsonCheckpointHandler(),
    },
  )
  try:
    if step is None:
      found = restore_newest(manager)
      if found is None:
        raise FileNotFoundError(f'no checkpoint in {directory}')
      state, meta, step = found
    else:
      state, meta, problem = _try_restore(manager, step, None)
      if problem is not None:
        raise CheckpointError(
          f'checkpoint step {step} in {directory} does not restore: '
          f'{problem[1]}'
        )
  finally:
    manager.close()
  variables = {
    'params': state['params'],
    'batch_stats': state.get('batch_stats', {}),
  }
  if use_ema and jax.tree.leaves(state.get('ema_params', {})):
    variables = {
      'params': state['ema_params'],
      'batch_stats': state.get('ema_batch_stats', {}),
    }
    logging.info('Using the moving average of the weights (eval.use_ema)')
  variables = jax.tree.map(np.asarray, variables)
  logging.info('Loaded variables from %s at step %s', workdir, step)
  return variables, meta, step


def load_model(
  config: ml_collections.ConfigDict, workdir: str
) -> tuple[Any, dict[str, Any], dict[str, Any], int]:
  """The model and variables of a workdir's newest checkpoint.

  The model settings come from the checkpoint's meta['model'] (training
  runs and `fdjax.convert` outputs store them) and otherwise from
  `config.model` with the eval dataset's class count. The variables are the
  weights' moving average when the checkpoint has one and
  `config.eval.use_ema` (default True) allows it.

  Args:
    config: an fdjax config.
    workdir: a directory with `checkpoints/`.

  Returns:
    (model, variables, meta, step).

  Raises:
    FileNotFoundError: no checkpoint in the workdir.
  """
  use_ema = bool(config.get('eval', {}).get('use_ema', True))
  variables, meta, step = load_variables(workdir, use_ema=use_ema)
  if meta.get('model'):
    model = models.create_model(**dict(meta['model']))
    logging.info('Model from the checkpoint: %s', meta['model'])
  else:
    num_classes = data.dataset_info(config.data).num_classes
    model = models.from_config(config.model, num_classes)
    logging.info('Model from config.model (%d classes)', num_classes)
  return model, variables, meta, step
