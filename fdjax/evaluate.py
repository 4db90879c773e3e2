r"""Robustness evaluation: the paper's table of clean and PGD accuracy.

`evaluate` measures, on the eval split of a config (or an injected source):

* clean top-1 accuracy;
* the paper's targeted L-inf PGD (docs/protocol.md): a random target per
  example from the eval seed, a random start, epsilon `config.eval.epsilon`
  and the effective step `max(step_size, eps / n)`, at every step count of
  `config.eval.pgd_steps` (10, 100, 1000 and 2000 in the paper), with top-1
  accuracy and attack success rate (prediction == target). With
  `config.eval.targeted = False` that sweep is untargeted;
* untargeted PGD at `config.eval.untargeted_steps` (cross-entropy or the CW
  margin, `config.eval.untargeted_loss`);
* `config.eval.restarts` random restarts of every attack: an example counts
  as robust only if it survives every restart (the targets stay the same);
* an all-or-nothing row: an example counts only if it is classified
  correctly under every attack that was run (the CAAD rule);
* sanity checks against gradient masking (`fdjax.sanity`);
* black-box scoring: the accuracy on each adversarial set of
  `config.eval.adversarial_sets` (`fdjax.attack_set`, checked against the
  eval split before any work), as ``set.NAME`` rows; with sets, the
  all-or-nothing row also requires the clean image and every set.

Each attack kind is ONE jitted data-parallel function (all devices of all
processes) whose epsilon, step size, step count and restart are traced, so
a sweep over 10 ... 2000 steps and the sanity checks' epsilon sweep compile
it once, and a second evaluation of the same model compiles nothing. The
attacks are `fdjax.attacks.PGDAttack` with `key = jax.random.key(eval.seed)`
-- restart 0 of the targeted attack is exactly
`fdjax.attacks.targeted_pgd(logits_fn, key, ...)`.

Per-example results, resumption and the table: `fdjax.results`. Figures
(accuracy vs steps, feature maps): `fdjax.plots`.
"""

import collections
from collections.abc import Mapping
import dataclasses
import functools
import os
import re
import time
from typing import Any
from typing import NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from fdjax import attack_set as adversarial_sets
from fdjax import attacks
from fdjax import autoattack_eval
from fdjax import checkpoints
from fdjax import config_base
from fdjax import data
from fdjax import input_pipeline
from fdjax import parallel
from fdjax import plots
from fdjax import preprocess
from fdjax import results as results_lib
from fdjax import sanity
from fdjax import writers

KINDS = ('targeted', 'untargeted')
ACCURACY_FIGURE = 'accuracy_vs_steps.png'
FEATURES_FIGURE = 'feature_maps.png'


@dataclasses.dataclass(frozen=True)
class Attack:
  """One attack of an evaluation.

  Attributes:
    kind: 'targeted' (the paper's random-target PGD) or 'untargeted'.
    num_steps: PGD iterations.
  """

  kind: str
  num_steps: int

  @property
  def name(self) -> str:
    return f'{self.kind}_pgd_{self.num_steps}'

  @property
  def label(self) -> str:
    """The table's column title."""
    if self.kind == 'targeted':
      return f'{self.num_steps}-step PGD'
    return f'untargeted {self.num_steps}-step'


def attack_list(eval_config: ml_collections.ConfigDict) -> list[Attack]:
  """The attacks an eval config asks for, in table order.

  The sweep `pgd_steps` (targeted unless `eval.targeted` is False), then
  `untargeted_steps`; an attack listed twice is run once.

  Args:
    eval_config: `config.eval`.

  Returns:
    A list of `Attack`.

  Raises:
    ValueError: a step count that is not a positive integer.

  Examples:
    >>> cfg = ml_collections.ConfigDict(dict(
    ...     pgd_steps=(10, 100), untargeted_steps=(10,), targeted=True))
    >>> [a.name for a in attack_list(cfg)]
    ['targeted_pgd_10', 'targeted_pgd_100', 'untargeted_pgd_10']
  """
  c = eval_config
  sweep_kind = 'targeted' if c.get('targeted', True) else 'untargeted'
  steps = config_base.check_steps('eval.pgd_steps', c.pgd_steps)
  out = [Attack(sweep_kind, s) for s in steps]
  extra = c.get('untargeted_steps', ())
  extra = config_base.check_steps('eval.untargeted_steps', extra)
  out += [Attack('untargeted', s) for s in extra]
  unique = []
  for a in out:
    if a not in unique:
      unique.append(a)
  return unique


# ---------------------------------------------------------------------------
# The jitted data-parallel functions.


class CompiledFunctions(NamedTuple):
  """The evaluation's compiled functions of global arrays (`compiled`)."""

  predict: Any
  input_grads: Any
  targeted: Any
  untargeted: Any


def _logits(model, variables, x):
  # Moving BatchNorm statistics, nothing mutable (docs/protocol.md).
  return model.apply(variables, x, train=False)


def _predict(model, variables, images):
  logits = _logits(model, variables, preprocess.to_unit_float(images))
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _input_grads(model, variables, images, labels):
  def total_loss(x):
    logits = _logits(model, variables, x)
    return jnp.sum(attacks.example_losses(logits, labels, 'xent'))

  g = jax.grad(total_loss)(preprocess.to_unit_float(images))
  axes = tuple(range(1, g.ndim))
  return jnp.all(g == 0, axis=axes), ~jnp.all(jnp.isfinite(g), axis=axes)


def _attack(
  model, attack, variables, key, images, labels, ids, eps, step, steps, restart
):
  adv, attack_labels = attack(
    functools.partial(_logits, model, variables),
    jax.random.wrap_key_data(key),
    preprocess.to_unit_float(images),
    labels,
    example_ids=ids,
    restart=restart,
    epsilon=eps,
    step_size=step,
    num_steps=steps,
  )
  pred = jnp.argmax(_logits(model, variables, adv), axis=-1).astype(jnp.int32)
  return pred, attack_labels, adv


@functools.lru_cache(maxsize=8)
def _compiled_cached(model, mesh, num_classes, loss):
  return _build_compiled(model, mesh, num_classes, loss)


def _build_compiled(model, mesh, num_classes, loss) -> CompiledFunctions:
  d, r = P(parallel.AXIS), P()

  def wrap(fn, in_specs, out_specs):
    return parallel.jit_data_parallel(
      fn,
      mesh=mesh,
      in_specs=in_specs,
      out_specs=out_specs,
    )

  attack_specs = ((r, r, d, d, d, r, r, r, r), (d, d, d))
  targeted = attacks.PGDAttack(targeted=True, num_classes=num_classes)
  untargeted = attacks.PGDAttack(targeted=False, loss=loss)
  return CompiledFunctions(
    predict=wrap(functools.partial(_predict, model), (r, d), d),
    input_grads=wrap(functools.partial(_input_grads, model), (r, d, d), (d, d)),
    targeted=wrap(functools.partial(_attack, model, targeted), *attack_specs),
    untargeted=wrap(
      functools.partial(_attack, model, untargeted), *attack_specs
    ),
  )


def compiled(
  model: Any, mesh: jax.sharding.Mesh, num_classes: int, loss: str = 'xent'
) -> CompiledFunctions:
  """The evaluation's jitted data-parallel functions for a model and mesh.

  Reused across calls (a small LRU cache keyed by model, mesh, classes and
  loss), so evaluating the same model twice compiles nothing the second
  time. An unhashable model gets fresh functions.

  Args:
    model: a Flax module applied as `model.apply(variables, x,
      train=False)`.
    mesh: a `fdjax.parallel.make_mesh()` mesh.
    num_classes: the model's classes (random targets).
    loss: the untargeted attack's loss ('xent' or 'margin').

  Returns:
    `CompiledFunctions`: `predict(variables, images)`, `input_grads(variables,
    images, labels)`, and `targeted`/`untargeted(variables, key_data, images,
    labels, ids, epsilon, step_size, num_steps, restart) -> (pred,
    attack_labels, adv)`.
  """
  try:
    return _compiled_cached(model, mesh, num_classes, loss)
  except TypeError:  # An unhashable model.
    return _build_compiled(model, mesh, num_classes, loss)


class _Runner:
  """Places batches on the mesh, runs the attacks, gathers the results."""

  def __init__(self, fns, variables, mesh, eval_config):
    self.fns = fns
    self.mesh = mesh
    self.variables = parallel.replicate(variables, mesh)
    self.batch_sharding = NamedSharding(mesh, P(parallel.AXIS))
    key = jax.random.key(eval_config.seed)
    self.key = self._rep(jax.random.key_data(key))
    self.epsilon = float(eval_config.epsilon)
    self.step_size = float(eval_config.step_size)
    self.restarts = int(eval_config.restarts)

  def _rep(self, x):
    return parallel.replicate(np.asarray(x), self.mesh)

  def place(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    return {
      k: jax.make_array_from_process_local_data(
        self.batch_sharding, np.asarray(batch[k])
      )
      for k in ('image', 'label', 'index', 'mask')
    }

  def scalars(self, eps, step, num_steps):
    return (
      self._rep(np.float32(eps)),
      self._rep(np.float32(step)),
      self._rep(np.int32(num_steps)),
    )

  gather = staticmethod(lambda x: _gather(x))

  def predict(self, g) -> np.ndarray:
    return _gather(self.fns.predict(self.variables, g['image']))

  def input_gradient_flags(self, g) -> tuple[np.ndarray, np.ndarray]:
    """Per example: the input gradient is all zero; it is not finite."""
    zero, bad = self.fns.input_grads(self.variables, g['image'], g['label'])
    return _gather(zero), _gather(bad)

  def attack(
    self,
    g,
    kind: str,
    num_steps: int,
    *,
    epsilon: float | None = None,
    step_size: float | None = None,
    restart: int = 0,
  ):
    """One restart of one attack: (pred, targets or None, adv global)."""
    eps = self.epsilon if epsilon is None else epsilon
    step = self.step_size if step_size is None else step_size
    scalars = self.scalars(eps, step, num_steps)
    fn = self.fns.targeted if kind == 'targeted' else self.fns.untargeted
    pred, attack_labels, adv = fn(
      self.variables,
      self.key,
      g['image'],
      g['label'],
      g['index'],
      *scalars,
      self._rep(np.int32(restart)),
    )
    targets = _gather(attack_labels) if kind == 'targeted' else None
    return _gather(pred), targets, adv

  def robust(self, g, labels, kind, num_steps, **kwargs):
    """All restarts: (pred, correct, success, targets)."""
    correct = success = pred = targets = None
    for restart in range(self.restarts):
      p, t, _ = self.attack(g, kind, num_steps, restart=restart, **kwargs)
      c = p == labels
      s = (p == t) if kind == 'targeted' else ~c
      if restart == 0:
        pred, correct, success, targets = p, c, s, t
      else:
        # Report the prediction of the first restart that broke the example.
        pred = np.where(correct & ~c, p, pred)
        correct, success = correct & c, success | s
    return pred, correct, success, targets


def _gather(x: jax.Array) -> np.ndarray:
  """The whole global array on every process, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _infer_num_classes(model, variables, image_size: int) -> int:
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  out = jax.eval_shape(lambda z: model.apply(variables, z, train=False), x)
  return int(out.shape[-1])


def eval_name(config: ml_collections.ConfigDict) -> str:
  """The directory name of an evaluation under `workdir/eval/`.

  Args:
    config: an fdjax config.

  Returns:
    `config.eval.name`, or `<dataset>_<eval split>` made file-name safe.

  Examples:
    >>> from fdjax import data
    >>> cfg = ml_collections.ConfigDict(dict(
    ...     eval={}, data=data.default_data_config('imagenet2012')))
    >>> eval_name(cfg)
    'imagenet2012_validation'
  """
  name = config_base.resolve_eval_config(config.eval).name or (
    f'{config.data.name}_{config.data.eval_split}'
  )
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', name)


# ---------------------------------------------------------------------------
# The evaluation.


def evaluate(
  model: Any,
  variables: Any,
  config: ml_collections.ConfigDict,
  *,
  workdir: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  source: data.Source | None = None,
  eval_dir: str | None = None,
  metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Clean and adversarial accuracy with sanity checks (module docstring).

  Call it on every process (the attacks are collective); every process gets
  the same results.

  Args:
    model: a Flax module applied as `model.apply(variables, images,
      train=False)` to RGB images in [0, 1] (fdjax models).
    variables: its variables ({'params', 'batch_stats'}), host or device.
    config: an fdjax config; `config.eval` (see `fdjax/config_base.py`) and
      `config.data` (the eval split and preprocessing) are used.
    workdir: where `eval/<name>/` goes (per-example results, resumption,
      results.json, figures, see `fdjax.results`); None keeps everything in
      memory.
    mesh: a `fdjax.parallel.make_mesh()` mesh; default all devices.
    source: a random-access source to use instead of the config's eval
      split (tests, in-memory data).
    metadata: extra JSON-able fields for the results (e.g. the checkpoint
      step).
    eval_dir: the results directory, instead of `workdir/eval/<name>/`.

  Returns:
    A JSON-able dict: `model`, `num_examples`, `epsilon`, `restarts`, ...,
    `clean` {accuracy, correct}, `attacks` {name: {kind, num_steps,
    step_size, accuracy, correct, success_rate, success}},
    `all_or_nothing` {attacks, accuracy, correct} (None without attacks),
    `sanity` (`fdjax.sanity`; None when `eval.sanity` is False),
    with `eval.adversarial_sets` also `attacks['set.NAME']` rows and
    `adversarial_sets` {sets, all_or_nothing (clean and the sets only)},
    `files` {name: path} and `resumed_from` (examples already done).

  Raises:
    ValueError: an invalid eval config, a global batch that does not divide
      by the device count, or `num_examples` beyond the split.

  Examples:
    >>> from fdjax import models
    >>> config = ml_collections.ConfigDict(dict(
    ...     data=data.default_data_config('digits'),
    ...     eval=dict(num_examples=8, global_batch_size=8, pgd_steps=(2,),
    ...               epsilon=0.1, sanity=False)))
    >>> config.data.num_workers = 0
    >>> model = models._ResNetTiny(num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    >>> mesh = parallel.make_mesh(jax.devices()[:1])
    >>> r = evaluate(model, variables, config, mesh=mesh)
    >>> r['num_examples'], sorted(r['attacks'])
    (8, ['targeted_pgd_2'])
  """
  start_time = time.perf_counter()
  ec, dc = config_base.resolve_eval_config(config.eval), config.data
  mesh = parallel.make_mesh() if mesh is None else mesh
  parallel.check_divisible(
    ec.global_batch_size, mesh.devices.size, 'eval.global_batch_size'
  )
  if source is None:
    source = data.get_source(dc, dc.eval_split)
  split_size = len(source)
  total = split_size if ec.num_examples == -1 else int(ec.num_examples)
  if total > split_size:
    raise ValueError(
      f'eval.num_examples={total} exceeds the {split_size} examples of the '
      'eval split; use -1 for all of them.'
    )
  attack_set = attack_list(ec)
  sets = adversarial_sets.read_for_eval(ec, dc, source, total)
  variables = jax.tree.map(np.asarray, jax.device_get(variables))
  num_classes = _infer_num_classes(model, variables, dc.image_size)
  loss = ec.untargeted_loss
  fns = compiled(model, mesh, num_classes, loss)
  runner = _Runner(fns, variables, mesh, ec)
  is_main = jax.process_index() == 0

  directory = eval_dir
  if directory is None and workdir is not None:
    directory = os.path.join(workdir, 'eval', eval_name(config))
  state = {
    'variables': results_lib.fingerprint(variables),
    'data': {
      k: dc.get(k)
      for k in (
        'name',
        'eval_split',
        'image_size',
        'image_dtype',
        'resize_method',
        'eval_crop_fraction',
        'eval_resize',
      )
    },
    'split_size': split_size,
    'epsilon': float(ec.epsilon),
    'step_size': float(ec.step_size),
    'seed': int(ec.seed),
    'restarts': int(ec.restarts),
    'untargeted_loss': loss,
    'attacks': [a.name for a in attack_set],
  }
  store = results_lib.Store(directory, state)
  done = min(store.num_done, total)
  if done:
    logging.info('Resuming the evaluation in %s at example %d', directory, done)

  batches = input_pipeline.create_eval_iter(
    dc,
    global_batch_size=ec.global_batch_size,
    source=source,
    start_index=done,
    num_examples=total,
  )
  progress = _Progress(attack_set, total, done, store.rows[:done])
  for batch in batches:
    rows = _evaluate_batch(runner, batch, attack_set)
    store.append(rows)
    progress.update(rows)

  cols = results_lib.columns([r for r in store.rows if r['index'] < total])
  results = (
    _aggregate(cols, attack_set, ec, config, workdir) if is_main else None
  )
  if ec.autoattack:
    aa = autoattack_eval.evaluate_autoattack(
      model,
      variables,
      ec,
      dc,
      source,
      total,
      directory=directory,
      fingerprint=state['variables'],
      mesh=mesh,
    )
    if is_main:
      autoattack_eval.add_to_results(results, cols, aa)
  if sets:
    scored = adversarial_sets.score(
      sets, functools.partial(_predict_global, runner), ec.global_batch_size
    )
    if is_main:
      adversarial_sets.add_to_results(results, cols, sets, scored)
  checks = None
  if ec.sanity:
    checks = _sanity(runner, ec, dc, source, cols, results, attack_set, total)
  if is_main:
    results['sanity'] = checks
  if is_main:
    results['resumed_from'] = done
    results.update(dict(metadata or {}))
  figure_paths = {}
  if directory is not None and ec.figures:
    figure_paths = _write_figures(
      model, variables, runner, ec, dc, source, results, attack_set, directory
    )
  if is_main:
    results['elapsed_s'] = time.perf_counter() - start_time
    results['files'] = dict(figure_paths)
    if directory is not None:
      results_lib.write(directory, results, cols)
    logging.info('Evaluation results:\n%s', results_lib.format_table(results))
  return results_lib.broadcast_json(results)


def _evaluate_batch(
  runner: _Runner, batch: Mapping[str, np.ndarray], attack_set: list[Attack]
) -> list[dict[str, Any]]:
  g = runner.place(batch)
  index, labels, mask = (_gather(g[k]) for k in ('index', 'label', 'mask'))
  cols = {'index': index, 'label': labels}
  clean = runner.predict(g)
  cols['clean_pred'] = clean
  cols['clean_correct'] = clean == labels
  for a in attack_set:
    pred, correct, success, targets = runner.robust(
      g, labels, a.kind, a.num_steps
    )
    cols[f'{a.name}.pred'] = pred
    cols[f'{a.name}.correct'] = correct
    cols[f'{a.name}.success'] = success
    if targets is not None:
      cols[f'{a.name}.target'] = targets
  keep = np.flatnonzero(mask)
  return [
    {k: results_lib.to_json_value(v[i].item()) for k, v in cols.items()}
    for i in keep
  ]


class _Progress:
  """Running accuracies and a progress line per batch (process 0 logs)."""

  def __init__(self, attack_set, total, done, rows):
    self.keys = ['clean_correct'] + [f'{a.name}.correct' for a in attack_set]
    self.total, self.done, self.count = total, done, 0
    self.sums = collections.Counter()
    self.start = time.perf_counter()
    self._add(rows)

  def _add(self, rows):
    self.count += len(rows)
    for k in self.keys:
      self.sums[k] += sum(bool(r[k]) for r in rows)

  def update(self, rows):
    self._add(rows)
    if jax.process_index() != 0 or not self.count:
      return
    elapsed = time.perf_counter() - self.start
    rate = (self.count - self.done) / max(elapsed, 1e-9)
    accs = ', '.join(
      f'{k.removesuffix(".correct")} {self.sums[k] / self.count:.3f}'
      for k in self.keys
    )
    logging.info(
      'eval %d/%d examples (%.1f%%): %s; %.2f img/s, ETA %s',
      self.count,
      self.total,
      100.0 * self.count / self.total,
      accs,
      rate,
      writers.eta(self.count, self.total, self.done, elapsed),
    )


def _predict_global(runner, images):
  """Predictions for a global batch that every process holds in full."""
  local = len(images) // jax.process_count()
  lo = jax.process_index() * local
  x = jax.make_array_from_process_local_data(
    runner.batch_sharding, images[lo : lo + local]
  )
  return _gather(runner.fns.predict(runner.variables, x))


def _aggregate(cols, attack_set, ec, config, workdir) -> dict[str, Any]:
  n = len(cols.get('index', ()))

  def frac(x):
    return float(np.mean(x)) if n else float('nan')

  name = ec.model_name or (
    os.path.basename(os.path.normpath(workdir)) if workdir else 'model'
  )
  results = {
    'model': name,
    'data': f'{config.data.name}/{config.data.eval_split}',
    'num_examples': n,
    'epsilon': float(ec.epsilon),
    'epsilon_255': float(ec.epsilon) * 255.0,
    'step_size': float(ec.step_size),
    'restarts': int(ec.restarts),
    'seed': int(ec.seed),
    'untargeted_loss': ec.untargeted_loss,
    'clean': {
      'accuracy': frac(cols.get('clean_correct', [])),
      'correct': int(np.sum(cols.get('clean_correct', 0))),
    },
    'attacks': {},
  }
  for a in attack_set:
    correct = cols.get(f'{a.name}.correct', np.zeros(0, bool))
    success = cols.get(f'{a.name}.success', np.zeros(0, bool))
    step = attacks.paper_step_size(
      np.float32(ec.epsilon), np.float32(ec.step_size), np.int32(a.num_steps)
    )
    results['attacks'][a.name] = {
      'kind': a.kind,
      'num_steps': a.num_steps,
      'step_size': float(step),
      'loss': 'xent' if a.kind == 'targeted' else results['untargeted_loss'],
      'label': a.label,
      'accuracy': frac(correct),
      'correct': int(np.sum(correct)),
      'success_rate': frac(success),
      'success': int(np.sum(success)),
    }
  if attack_set:
    robust = np.ones(n, bool)
    for a in attack_set:
      robust &= cols.get(f'{a.name}.correct', np.zeros(n, bool)).astype(bool)
    results['all_or_nothing'] = {
      'attacks': [a.name for a in attack_set],
      'accuracy': frac(robust),
      'correct': int(np.sum(robust)),
    }
  else:
    results['all_or_nothing'] = None
  return results


def _sanity(runner, ec, dc, source, cols, results, attack_set, total):
  """`fdjax.sanity`'s measurement pass and checks (process 0 gets them)."""
  n_sub = min(int(ec.sanity_num_examples), total)
  sweep_kind = attack_set[0].kind if attack_set else None
  sweep = [a for a in attack_set if a.kind == sweep_kind]
  first = min((a.num_steps for a in sweep), default=None)
  other = None
  if first is not None:
    other = ('untargeted' if sweep_kind == 'targeted' else 'targeted', first)
  m = sanity.measure(runner, ec, dc, source, n_sub, other)
  if jax.process_index() != 0:
    return None
  curve = {a.num_steps: results['attacks'][a.name]['accuracy'] for a in sweep}
  sweep_first = None
  if first is not None:
    sub = cols[f'{sweep_kind}_pgd_{first}.correct'][:n_sub] if cols else []
    sweep_first = float(np.mean(sub)) if len(sub) else float('nan')
  return sanity.run_checks(
    m,
    ec,
    sweep_kind=sweep_kind,
    curve=curve,
    sweep_first=sweep_first,
    num_evaluated=results['num_examples'],
  )


# ---------------------------------------------------------------------------
# Figures.


def _write_figures(
  model, variables, runner, ec, dc, source, results, attack_set, directory
) -> dict[str, str]:
  """The accuracy-vs-steps and feature-map figures (process 0 writes)."""
  is_main = jax.process_index() == 0
  paths = {}
  if is_main:
    for kind in KINDS:
      curve = {
        a.num_steps: results['attacks'][a.name]['accuracy']
        for a in attack_set
        if a.kind == kind
      }
      if curve:
        label = results['model'] + (
          '' if kind == 'targeted' else ' (untargeted)'
        )
        paths.setdefault('curves', {})[label] = curve
    curves = paths.pop('curves', None)
    if curves:
      path = os.path.join(directory, ACCURACY_FIGURE)
      plots.plot_accuracy_vs_steps(curves, path)
      paths['accuracy_vs_steps'] = path
  # The first example and its adversarial version (all processes attack).
  if not attack_set or not plots.has_denoising_blocks(
    model, variables, dc.image_size
  ):
    logging.info('No feature-map figure: no attack or no denoising blocks.')
    return paths
  a = min(
    (x for x in attack_set if x.kind == attack_set[0].kind),
    key=lambda x: x.num_steps,
  )
  batch = next(
    iter(
      input_pipeline.create_eval_iter(
        dc,
        global_batch_size=ec.global_batch_size,
        source=source,
        num_examples=1,
      )
    )
  )
  g = runner.place(batch)
  _, _, adv = runner.attack(g, a.kind, a.num_steps)
  if is_main:
    clean = preprocess.to_unit_float(np.asarray(batch['image'][0]))
    adv0 = None
    for shard in adv.addressable_shards:
      if (shard.index[0].start or 0) == 0:
        adv0 = np.asarray(shard.data[0])
    path = os.path.join(directory, FEATURES_FIGURE)
    plots.plot_feature_maps(
      model,
      variables,
      clean,
      adv0,
      path,
      channels=tuple(ec.figure_channels) or None,
      title=(
        f'{results["model"]}: example 0, {a.label} '
        f'(eps {255 * float(ec.epsilon):g}/255)'
      ),
    )
    paths['feature_maps'] = path
  return paths


# ---------------------------------------------------------------------------
# Entry point.


def run(
  config: ml_collections.ConfigDict, workdir: str, eval_dir: str | None = None
) -> dict[str, Any]:
  """`--mode=eval`: evaluates the newest checkpoint of a workdir.

  Works on training workdirs and on `fdjax.convert` outputs. Writes
  `workdir/eval/<name>/` (`fdjax.results`), or `eval_dir` when given.

  Args:
    config: an fdjax config (`eval` and `data` are used; `model` when the
      checkpoint does not describe its model).
    workdir: a directory with `checkpoints/`.
    eval_dir: where results go instead of `workdir/eval/<name>/`.

  Returns:
    The results of `evaluate`, plus `checkpoint_step`.
  """
  model, variables, meta, step = checkpoints.load_model(config, workdir)
  results = evaluate(
    model,
    variables,
    config,
    workdir=workdir,
    eval_dir=eval_dir,
    metadata={'checkpoint_step': step, 'checkpoint_source': meta.get('source')},
  )
  return results
