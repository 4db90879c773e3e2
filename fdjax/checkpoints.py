"""Orbax checkpoints of fdjax runs and converted models.

A workdir holds `checkpoints/<step>/` written by an orbax `CheckpointManager`
with two items: 'state' (a pytree holding at least 'params' and
'batch_stats'; a training run adds 'opt_state', 'step' and 'rng') and 'meta'
(JSON: the model settings, so that a checkpoint can be evaluated without its
training config). `fdjax.convert` writes the same layout at step 0.
"""

import os
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fdjax import data
from fdjax import models

CHECKPOINT_DIR = 'checkpoints'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def create_manager(
  workdir: str,
  *,
  max_to_keep: int | None = 3,
  enable_async: bool = True,
) -> ocp.CheckpointManager:
  """An orbax CheckpointManager for `workdir/checkpoints`."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    create=True,
    enable_async_checkpointing=enable_async,
  )
  return ocp.CheckpointManager(
    checkpoint_dir(workdir), options=options, item_names=('state', 'meta')
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  meta: dict[str, Any] | None = None,
  *,
  force: bool = False,
) -> bool:
  """Saves `state` (a pytree) and `meta` (JSON-able dict) at `step`."""
  return manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave(meta or {}),
    ),
    force=force,
  )


def restore(
  manager: ocp.CheckpointManager,
  step: int | None = None,
  target: Any = None,
) -> tuple[Any, dict[str, Any]]:
  """Restores (state, meta) at `step` (default: the newest).

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


def load_variables(
  workdir: str, step: int | None = None, *, use_ema: bool = False
):
  """Loads the model variables and meta of a workdir's newest checkpoint.

  Works on training workdirs and on `fdjax.convert` outputs alike.

  Args:
    workdir: a directory with a `checkpoints/` subdirectory.
    step: the step to load; None for the newest.
    use_ema: load the weights' moving average ('ema_params' and
      'ema_batch_stats', `train.ema_decay`) when the checkpoint has one.

  Returns:
    (variables, meta, step) with variables = {'params', 'batch_stats'} as
    host numpy arrays.
  """
  manager = create_manager(workdir, enable_async=False, max_to_keep=None)
  step = manager.latest_step() if step is None else step
  state, meta = restore(manager, step)
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
