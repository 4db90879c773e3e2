"""Adversarial training: the data-parallel train step and the training loop.

The train step follows the paper (docs/protocol.md): every device attacks
its own shard with targeted L-inf PGD (BatchNorm frozen during the attack, a
clean start with probability 0.2 per device batch), then trains on the
adversarial batch with cross-entropy (label smoothing 0.1) plus weight decay
on the conv and linear kernels, Nesterov momentum SGD, gradients averaged
across devices and BatchNorm statistics computed per device (or synchronised).
`config.train.recipe` swaps in TRADES, fast or free adversarial training,
`train.ema_decay` adds a moving average of the weights and
`train.guard_every_steps` the catastrophic-overfitting guard
(`CollapseGuard`); see `fdjax.recipes`.

`train_and_evaluate(config, workdir)` runs the whole job: it resumes from the
newest checkpoint in `workdir` (same data order and randomness as an
uninterrupted run), writes TensorBoard and JSON-lines metrics, stops with a
clear message on a non-finite loss, then evaluates clean and PGD accuracy.
"""

from collections.abc import Callable
import functools
import json
import os
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fdjax import attacks
from fdjax import checkpoints
from fdjax import config_base
from fdjax import data
from fdjax import evaluate
from fdjax import guard as guard_lib
from fdjax import input_pipeline
from fdjax import models
from fdjax import parallel
from fdjax import preprocess
from fdjax import recipes
from fdjax import workdir as workdir_lib
from fdjax import writers

P = jax.sharding.PartitionSpec


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: checkpointed whole."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # Raw key data (uint32), so that checkpoints can hold it.
  # The weights' moving average (`train.ema_decay` > 0), else {}.
  ema_params: Any = flax.struct.field(default_factory=dict)
  ema_batch_stats: Any = flax.struct.field(default_factory=dict)
  # Free AT's perturbation [global batch, H, W, C], sharded over 'data' like
  # the batch (`train.recipe='free'`), else {}.
  free_delta: Any = flax.struct.field(default_factory=dict)

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}

  @property
  def has_ema(self) -> bool:
    return bool(jax.tree.leaves(self.ema_params))

  @property
  def ema_variables(self):
    """The averaged variables; the raw ones when there is no average."""
    if not self.has_ema:
      return self.variables
    return {'params': self.ema_params, 'batch_stats': self.ema_batch_stats}


def state_specs() -> TrainState:
  """The train state's partition specs: replicated but free AT's delta."""
  return TrainState(
    step=P(),
    params=P(),
    batch_stats=P(),
    opt_state=P(),
    rng=P(),
    ema_params=P(),
    ema_batch_stats=P(),
    free_delta=P(parallel.AXIS),
  )


def state_shardings(mesh: jax.sharding.Mesh) -> TrainState:
  """`state_specs` on `mesh` (a pytree prefix of the state): the train step's
  output shardings, so a state placed with them does not recompile it."""
  return jax.tree.map(
    lambda spec: jax.sharding.NamedSharding(mesh, spec), state_specs()
  )


def create_learning_rate_fn(
  train_config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """The learning rate: base * batch / 256, linear warmup, step or cosine.

  A schedule of optimizer updates: free AT (`train.recipe='free'`) makes
  `train.free_replays` per step, over the same epochs.

  Args:
    train_config: the config's `train` section.
    steps_per_epoch: optimizer steps per epoch.

  Returns:
    An optax schedule of the step.

  Raises:
    ValueError: an unknown schedule.
  """
  tc = train_config
  config_base.check_choice(
    'train.lr_schedule', tc.lr_schedule, config_base.LR_SCHEDULES
  )
  peak = tc.base_lr * tc.global_batch_size / 256
  # Free AT makes several optimizer updates per step: the schedule is one of
  # updates, over the same epochs.
  replays = updates_per_step(tc)
  total = total_steps(tc, steps_per_epoch) * replays
  steps_per_epoch *= replays
  warmup = int(round(tc.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(total - 1, 0))
  if tc.lr_schedule == 'step':
    boundaries = {
      int(round(e * steps_per_epoch)) - warmup: tc.decay_factor
      for e in tc.decay_epochs
      if int(round(e * steps_per_epoch)) > warmup
    }
    main = optax.piecewise_constant_schedule(peak, boundaries)
  else:
    main = optax.cosine_decay_schedule(peak, max(total - warmup, 1))
  if warmup == 0:
    return main
  start = min(tc.warmup_start_lr, peak)
  ramp = optax.linear_schedule(start, peak, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def updates_per_step(train_config) -> int:
  """Optimizer updates per train step: free AT's replays, else 1."""
  if train_config.get('recipe', 'pgd') == 'free':
    return int(train_config.free_replays)
  return 1


def total_steps(train_config, steps_per_epoch: int) -> int:
  if train_config.num_steps > 0:
    return int(train_config.num_steps)
  return int(round(train_config.num_epochs * steps_per_epoch))


def weight_decay_loss(params: Any) -> jax.Array:
  """sum(w^2) / 2 over conv and linear kernels (not BN, not biases)."""
  flat = flax.traverse_util.flatten_dict(params)
  return 0.5 * sum(
    jnp.sum(jnp.square(w.astype(jnp.float32)))
    for path, w in flat.items()
    if path[-1] == 'kernel'
  )


def create_optimizer(
  train_config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
  return optax.sgd(
    learning_rate_fn,
    momentum=train_config.momentum,
    nesterov=train_config.nesterov,
  )


def create_train_state(
  key: jax.Array,
  model: models.ResNet,
  image_shape: tuple[int, ...],
  tx: optax.GradientTransformation,
  ema: bool = False,
  free_batch_size: int = 0,
) -> TrainState:
  """Initialises parameters, BatchNorm statistics and optimizer state.

  Args:
    key: the run's key.
    model: the network.
    image_shape: (H, W, C).
    tx: the optimizer.
    ema: also hold a moving average of the variables (starting at them).
    free_batch_size: > 0 for free AT: its zero perturbation of the global
      batch, [free_batch_size, H, W, C].
  """
  init_key, state_key = jax.random.split(key)
  variables = model.init(
    init_key, jnp.zeros((1, *image_shape), jnp.float32), train=False
  )
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(params),
    rng=jax.random.key_data(state_key),
    ema_params=jax.tree.map(jnp.copy, params) if ema else {},
    ema_batch_stats=jax.tree.map(jnp.copy, batch_stats) if ema else {},
    free_delta=(
      jnp.zeros((free_batch_size, *image_shape), jnp.float32)
      if free_batch_size
      else {}
    ),
  )


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: models.ResNet,
  tx: optax.GradientTransformation,
  learning_rate_fn: optax.Schedule,
  num_classes: int,
  attack: Any,
  clean_start_prob: float = 0.2,
  label_smoothing: float = 0.1,
  weight_decay: float = 1e-4,
  adv_fraction: float = 1.0,
  log_clean_accuracy: bool = True,
  recipe: str = 'pgd',
  trades_beta: float = 6.0,
  free_replays: int = 4,
  free_epsilon: float = 0.0,
  free_norm: str = 'linf',
  ema_decay: float = 0.0,
  ema_start_step: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One adversarial training step on one device's shard (per-device code).

  Run it through `parallel.data_parallel` (axis 'data', state specs
  `state_specs()`): gradients and the BatchNorm moving averages are averaged
  over the axis, metrics summed.

  Args:
    state: the replicated train state (free AT's delta: this device's part).
    batch: this device's {'image', 'label', 'index'} (global example ids).
    model: the network.
    tx: the optimizer.
    learning_rate_fn: for the logged learning rate (of optimizer updates:
      free AT makes `free_replays` per step).
    num_classes: classifier outputs.
    attack: the training attack (`fdjax.attacks.training_attack`), or None
      to train on clean images (or for free AT).
    clean_start_prob: probability of a clean start, one coin per device
      batch and step (the original's 0.2; the fast recipe uses 0).
    label_smoothing: of the training cross-entropy.
    weight_decay: times sum(w^2) / 2 over conv and linear kernels.
    adv_fraction: the fraction of each device batch that is adversarial
      ('pgd' and 'fast').
    log_clean_accuracy: also measure clean accuracy (an extra forward pass).
    recipe: 'pgd', 'fast', 'trades' or 'free' (`fdjax.recipes`).
    trades_beta: TRADES' KL weight.
    free_replays: free AT's m (optimizer updates per batch).
    free_epsilon: free AT's ball radius (and perturbation step).
    free_norm: free AT's norm.
    ema_decay: the weights' moving average decay (0: none in the state).
    ema_start_step: steps before it copy the weights.

  Returns:
    The new state and a dict of metrics summed over devices (`count` holds
    the number of examples, so `metric / count` are means).
  """
  images = preprocess.to_unit_float(batch['image'])
  labels = batch['label']
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  attack_key, target_key, coin_key = jax.random.split(key, 3)
  device_index = jax.lax.axis_index(parallel.AXIS)
  one_hot = jax.nn.one_hot(labels, num_classes)
  targets = optax.smooth_labels(one_hot, label_smoothing)

  # The attack sees the model in inference mode: moving BN statistics, no
  # updates (the original froze BN's update ops during the attack).
  def logits_fn(x):
    return model.apply(state.variables, x, train=False)

  if attack is not None:
    random_start = attacks.clean_start_coin(
      coin_key, clean_start_prob, device_index
    )
    adv, attack_labels = attack(
      logits_fn,
      attack_key,
      images,
      labels,
      example_ids=batch['index'],
      random_start=random_start,
      target_key=target_key,
    )
    if adv_fraction < 1.0 and recipe != 'trades':
      num_adv = int(round(adv_fraction * images.shape[0]))
      keep = (jnp.arange(images.shape[0]) < num_adv)[:, None, None, None]
      adv = jnp.where(keep, adv, images)
  else:
    attack_labels, adv = labels, images

  def loss_fn(params, batch_stats, x):
    variables = {'params': params, 'batch_stats': batch_stats}
    aux = {}
    if recipe == 'trades':
      clean_logits, new_model_state = model.apply(
        variables, images, train=True, mutable=['batch_stats']
      )
      logits, new_model_state = model.apply(
        {'params': params, **new_model_state},
        x,
        train=True,
        mutable=['batch_stats'],
      )
      data_loss, xent, aux['kl'] = recipes.trades_loss(
        clean_logits, logits, targets, trades_beta
      )
    else:
      logits, new_model_state = model.apply(
        variables, x, train=True, mutable=['batch_stats']
      )
      xent = optax.softmax_cross_entropy(logits, targets).mean()
      data_loss = xent
    loss = data_loss + weight_decay * weight_decay_loss(params)
    return loss, (logits, new_model_state['batch_stats'], xent, aux)

  # Per-device gradients (the replicated parameters seen as varying), then
  # averaged explicitly: under shard_map's check_vma, the gradient of the
  # replicated parameters themselves would already be summed.
  def update(params, opt_state, batch_stats, x):
    """One optimizer update on inputs x; also d loss / d x (free AT)."""
    varying = jax.lax.pcast(params, parallel.AXIS, to='varying')
    if recipe == 'free':
      grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)
      (loss, aux), (grads, input_grad) = grad_fn(varying, batch_stats, x)
    else:  # No input gradient: the paper's step costs what it did.
      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
      (loss, aux), grads = grad_fn(varying, batch_stats, x)
      input_grad = None
    grads = jax.lax.pmean(grads, parallel.AXIS)
    # Per-device statistics normalise each shard (the original); the moving
    # averages are averaged so that the state stays replicated.
    new_stats = jax.lax.pmean(aux[1], parallel.AXIS)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, new_stats, loss, aux, grads, input_grad

  if recipe == 'free':
    # Shafahi et al.: m replays of the batch, each one optimizer update on
    # x + delta and, from the same backward pass, delta's signed ascent.
    def replay(carry):
      params, opt_state, batch_stats, delta = carry
      x = jnp.clip(images + delta, 0.0, 1.0)
      params, opt_state, batch_stats, loss, aux, grads, input_grad = update(
        params, opt_state, batch_stats, x
      )
      delta = recipes.free_perturbation_update(
        delta, input_grad, free_epsilon, free_norm
      )
      return (params, opt_state, batch_stats, delta), (loss, aux, grads, x)

    carry = (state.params, state.opt_state, state.batch_stats, state.free_delta)
    carry = jax.lax.fori_loop(
      0, free_replays - 1, lambda _, c: replay(c)[0], carry
    )
    # The last replay's outputs give the metrics.
    (params, opt_state, batch_stats, delta), (loss, aux, grads, adv) = replay(
      carry
    )
  else:
    params, opt_state, batch_stats, loss, aux, grads, _ = update(
      state.params, state.opt_state, state.batch_stats, adv
    )
    delta = state.free_delta
  logits, _, xent, extra = aux

  pred = jnp.argmax(logits, -1)
  count = jnp.asarray(labels.shape[0], jnp.float32)
  metrics = {
    'count': count,
    'loss': loss * count,
    'xent': xent * count,
    'adv_accuracy': jnp.sum(pred == labels).astype(jnp.float32),
  }
  metrics.update({k: v * count for k, v in extra.items()})
  if attack is not None and attack.targeted:
    metrics['attack_success'] = jnp.sum(pred == attack_labels).astype(
      jnp.float32
    )
  if log_clean_accuracy and (attack is not None or recipe == 'free'):
    clean_pred = jnp.argmax(logits_fn(images), -1)
    metrics['clean_accuracy'] = jnp.sum(clean_pred == labels).astype(
      jnp.float32
    )
  metrics = jax.lax.psum(metrics, parallel.AXIS)
  updates_per_step = free_replays if recipe == 'free' else 1
  metrics['learning_rate'] = learning_rate_fn(
    state.step * updates_per_step + updates_per_step - 1
  )
  metrics['grad_norm'] = optax.global_norm(grads)
  metrics['param_norm'] = optax.global_norm(params)
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    batch_stats=batch_stats,
    opt_state=opt_state,
    free_delta=delta,
  )
  if ema_decay > 0:
    new_state = new_state.replace(
      ema_params=recipes.ema_update(
        state.ema_params, params, state.step, ema_decay, ema_start_step
      ),
      ema_batch_stats=recipes.ema_update(
        state.ema_batch_stats,
        batch_stats,
        state.step,
        ema_decay,
        ema_start_step,
      ),
    )
  return new_state, metrics


def make_train_step(
  mesh: jax.sharding.Mesh, backend: str, **step_kwargs
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, Any]]:
  """The compiled data-parallel train step of global state and batch."""
  return parallel.jit_data_parallel(
    functools.partial(train_step, **step_kwargs),
    mesh=mesh,
    in_specs=(state_specs(), P(parallel.AXIS)),
    out_specs=(state_specs(), P()),
    backend=backend,
    donate_argnums=0,
  )


def parameter_overview(params: Any) -> str:
  """A table of parameter counts per top-level module."""
  rows = []
  for name, sub in params.items():
    leaves = jax.tree.leaves(sub)
    rows.append((name, sum(x.size for x in leaves)))
  total = sum(n for _, n in rows)
  width = max([len(n) for n, _ in rows] + [5])
  lines = [f'{"module":<{width}}  {"params":>12}']
  lines += [f'{n:<{width}}  {c:>12,}' for n, c in rows]
  lines.append(f'{"total":<{width}}  {total:>12,}')
  return '\n'.join(lines)


def _global_batch(batch, mesh, backend):
  """Host-local numpy batch -> global arrays for the step function."""
  if backend == 'pmap':
    return batch
  sharding = jax.sharding.NamedSharding(mesh, P(parallel.AXIS))
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, x), batch
  )


def _is_finite(metrics: dict[str, Any]) -> bool:
  # param_norm is of the parameters after the update.
  keys = ('loss', 'grad_norm', 'param_norm')
  return all(np.isfinite(metrics[k]) for k in keys)


def _non_finite_error(what: str, manager, workdir) -> FloatingPointError:
  """The FloatingPointError naming the last checkpoint saved (all verified)."""
  checkpoints.finish(manager)
  steps = checkpoints.complete_steps(manager)
  good = steps[-1] if steps else None
  where = (
    f'The last good checkpoint is step {good} in '
    f'{checkpoints.checkpoint_dir(workdir)} (rerun the command to '
    'resume from it, e.g. with a lower learning rate).'
    if good is not None
    else 'No checkpoint was written yet: there is no last good '
    'checkpoint to resume from (lower the learning rate and rerun).'
  )
  return FloatingPointError(f'{what}; stopping. {where}')


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  train_source: Any = None,
  eval_source: Any = None,
) -> dict[str, Any]:
  """Trains (resuming from `workdir`), then evaluates robustness.

  Args:
    config: an fdjax config (see configs/).
    workdir: where checkpoints, logs and results go; rerunning with the same
      workdir resumes from the newest checkpoint.
    train_source: optional injected random-access training source.
    eval_source: optional injected evaluation source.

  Returns:
    {'train': last logged training metrics, 'eval': evaluation results}.

  Raises:
    ValueError: an invalid config or a global batch that does not divide by
      the device count.
    FloatingPointError: a non-finite loss (the message names the step and
      the last good checkpoint).
  """
  _check(config, train_source)
  with workdir_lib.lock(workdir):  # Training and its evaluation.
    model, state, mesh, last = train(config, workdir, train_source=train_source)
    use_ema = config_base.resolve_eval_config(config.eval).use_ema
    variables = jax.device_get(
      state.ema_variables if use_ema else state.variables
    )
    if state.has_ema:
      logging.info(
        'Evaluating the %s weights (eval.use_ema=%s)',
        'averaged' if use_ema else 'raw',
        use_ema,
      )
    results = evaluate.evaluate(
      model,
      variables,
      config,
      workdir=workdir,
      mesh=mesh,
      source=eval_source,
    )
    if jax.process_index() == 0:  # evaluate() printed the table.
      with open(os.path.join(workdir, 'results.json'), 'w') as f:
        json.dump({'train': last, 'eval': results}, f, indent=2, default=float)
  return {'train': last, 'eval': results}


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  train_source: Any = None,
) -> tuple[models.ResNet, TrainState, jax.sharding.Mesh, dict[str, Any]]:
  """Trains, resuming from the newest checkpoint in `workdir`.

  Args:
    config: an fdjax config (see configs/).
    workdir: where checkpoints, logs and results go; rerunning with the same
      workdir resumes from the newest checkpoint.
    train_source: optional injected random-access training source.

  Returns:
    (model, final state, mesh, last logged training metrics).

  Raises:
    ValueError: an invalid config or a global batch that does not divide by
      the device count.
    FloatingPointError: a non-finite loss (the message names the step and
      the last good checkpoint).
    fdjax.workdir.WorkdirError: the workdir holds another run (differing
      defining settings) or another process uses it.
  """
  _check(config, train_source)
  with workdir_lib.lock(workdir):
    return _train(config, workdir, train_source=train_source)


def _check(config, train_source) -> None:
  """Every setting, with the devices and split sizes, before any work."""
  config_base.validate(config)
  shard_map = config.train.parallel == 'shard_map'
  info = data.dataset_info(config.data)
  config_base.check_run(
    config,
    eval_devices=jax.device_count(),
    train_devices=jax.device_count() if shard_map else jax.local_device_count(),
    num_train=info.num_train if train_source is None else len(train_source),
  )


def _train(config, workdir, *, train_source):
  tc = config.train
  backend = tc.parallel
  if backend == 'pmap' and jax.process_count() > 1:
    raise ValueError(
      "train.parallel='pmap' runs on one host; use 'shard_map' on "
      f'{jax.process_count()} processes'
    )
  devices = jax.devices() if backend == 'shard_map' else jax.local_devices()
  mesh = parallel.make_mesh(devices)
  info = data.dataset_info(config.data)
  if train_source is not None:
    info = info._replace(num_train=len(train_source))
  process_index, process_count = jax.process_index(), jax.process_count()

  num_classes = info.num_classes
  steps_per_epoch = max(info.num_train // tc.global_batch_size, 1)
  num_steps = total_steps(tc, steps_per_epoch)
  model = models.from_config(
    config.model, num_classes, bn_axis_name=parallel.AXIS
  )
  learning_rate_fn = create_learning_rate_fn(tc, steps_per_epoch)
  tx = create_optimizer(tc, learning_rate_fn)

  is_main = process_index == 0
  # Refuses another run's workdir before writing; writes config.json.
  workdir_lib.check_and_record(config, workdir)

  shardings = state_shardings(mesh)
  init = jax.jit(
    functools.partial(
      create_train_state,
      model=model,
      image_shape=info.image_shape,
      tx=tx,
      ema=tc.ema_decay > 0,
      free_batch_size=tc.global_batch_size if tc.recipe == 'free' else 0,
    ),
    out_shardings=shardings,
  )
  state = init(jax.random.key(config.seed))
  logging.info(
    'Parameters:\n%s', parameter_overview(jax.device_get(state.params))
  )
  manager = checkpoints.create_manager(workdir, max_to_keep=tc.max_checkpoints)
  meta = {'model': models.model_kwargs(config.model, num_classes)}
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    state,
  )
  # The newest checkpoint that restores and verifies; damaged newer ones
  # are moved to checkpoints/rejected/.
  restored = checkpoints.restore_newest(manager, abstract, reject_bad=True)
  if restored is not None:
    state = restored[0]
    logging.info('Resumed from step %d in %s', int(state.step), workdir)
  start_step = int(state.step)

  step_fn = make_train_step(
    mesh,
    backend,
    model=model,
    tx=tx,
    learning_rate_fn=learning_rate_fn,
    num_classes=num_classes,
    **recipe_step_kwargs(config, num_classes),
    label_smoothing=float(tc.label_smoothing),
    weight_decay=float(tc.weight_decay),
    adv_fraction=float(tc.adv_fraction),
    log_clean_accuracy=bool(tc.log_clean_accuracy),
  )
  guard = guard_lib.CollapseGuard(
    config, workdir, model, start_step, train_source
  )
  writer = writers.MetricWriter(workdir, enabled=is_main, start_step=start_step)
  train_iter = input_pipeline.create_train_iter(
    config.data,
    global_batch_size=tc.global_batch_size,
    seed=config.seed,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
    source=train_source,
  )
  logging.info(
    'Training %d steps (%d per epoch), global batch %d on %d devices '
    '(%s), from step %d',
    num_steps,
    steps_per_epoch,
    tc.global_batch_size,
    len(devices),
    backend,
    start_step,
  )
  last = {}
  pending = []
  timer_step, timer_start = start_step, time.perf_counter()
  if guard.stopped:
    logging.warning(
      'The catastrophic-overfitting guard stopped this run before (%s); '
      'not training further (remove it to continue).',
      guard.collapse_path,
    )
  for step in range(start_step, 0 if guard.stopped else num_steps):
    batch = next(train_iter)
    batch = _global_batch(
      {k: batch[k] for k in ('image', 'label', 'index')}, mesh, backend
    )
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      state, metrics = step_fn(state, batch)
    pending.append(metrics)
    done = step + 1
    is_log = done % tc.log_every_steps == 0 or done == num_steps
    is_ckpt = done % tc.checkpoint_every_steps == 0 or done == num_steps
    is_guard = guard.is_check(done)
    # Rollback needs a checkpoint at every healthy check.
    is_ckpt |= is_guard and tc.guard_action == 'rollback'
    if not (is_log or is_ckpt or is_guard):
      continue
    history = jax.device_get(pending)
    pending = []
    for offset, m in enumerate(history):
      if not _is_finite(m):
        bad = done - len(history) + offset
        raise _non_finite_error(
          f'non-finite loss, gradient or parameters at step {bad}',
          manager,
          workdir,
        )
    collapse = guard.check(done, state) if is_guard else None
    if collapse is not None and tc.guard_action == 'rollback':
      state = guard.rollback(manager, state, collapse)
      break
    if is_ckpt or (collapse is not None and tc.guard_action == 'stop'):
      try:  # Refuses a non-finite state (e.g. the optimizer's).
        checkpoints.save(manager, done, state, meta)
      except FloatingPointError as e:
        raise _non_finite_error(str(e), manager, workdir) from None
    if collapse is not None and tc.guard_action == 'stop':
      guard.record_stop(collapse)
      break
    if is_log:
      elapsed = time.perf_counter() - timer_start
      images_per_s = (done - timer_step) * tc.global_batch_size / elapsed
      last = summarize(history)
      last['images_per_s'] = images_per_s
      last['epoch'] = done / steps_per_epoch
      writer.write_scalars(done, last)
      logging.info(
        'step %d/%d  loss %.4f  adv_acc %.3f  %s%.1f img/s  ETA %s',
        done,
        num_steps,
        last['loss'],
        last['adv_accuracy'],
        f'clean_acc {last["clean_accuracy"]:.3f}  '
        if 'clean_accuracy' in last
        else '',
        images_per_s,
        writers.eta(done, num_steps, timer_step, elapsed),
      )
      timer_step, timer_start = done, time.perf_counter()
  checkpoints.finish(manager)
  manager.close()
  writer.flush()

  writer.close()
  return model, state, mesh, last


def recipe_step_kwargs(
  config: ml_collections.ConfigDict, num_classes: int
) -> dict[str, Any]:
  """`train_step`'s recipe arguments, resolved from a config."""
  tc, ac = config.train, config.attack
  return dict(
    attack=attacks.training_attack(
      ac,
      num_classes,
      tc.recipe,
      fast_step_multiple=float(tc.fast_step_multiple),
    ),
    # Fast AT always starts at random (Wong et al.); TRADES has its own.
    clean_start_prob=(
      float(ac.clean_start_prob) if tc.recipe == 'pgd' else 0.0
    ),
    recipe=str(tc.recipe),
    trades_beta=float(tc.trades_beta),
    free_replays=int(tc.free_replays),
    free_epsilon=float(ac.epsilon),
    free_norm=str(ac.norm),
    ema_decay=float(tc.ema_decay),
    ema_start_step=int(tc.ema_start_step),
  )


def summarize(history: list[dict[str, Any]]) -> dict[str, float]:
  """Means of summed metrics over steps; last value of the others."""
  count = sum(float(m['count']) for m in history)
  out = {}
  for key in history[-1]:
    if key == 'count':
      continue
    if key in ('learning_rate', 'grad_norm', 'param_norm'):
      out[key] = float(history[-1][key])
    else:
      out[key] = sum(float(m[key]) for m in history) / count
  return out
