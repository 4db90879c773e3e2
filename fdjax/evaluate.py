r"""Robustness evaluation: the paper's table, sanity checks, directory mode.

`evaluate` measures, on the eval split of a config (or an injected source):

* clean top-1 accuracy;
* the paper's targeted L-inf PGD (SPEC.md section 4 and 6): a random target
  per example from the eval seed, a random start, epsilon
  `config.eval.epsilon` and the effective step `max(step_size, eps / n)`, at
  every step count of `config.eval.pgd_steps` (10, 100, 1000 and 2000 in the
  paper), with top-1 accuracy and attack success rate (prediction ==
  target). With `config.eval.targeted = False` that sweep is untargeted;
* untargeted PGD at `config.eval.untargeted_steps` (cross-entropy or the CW
  margin, `config.eval.untargeted_loss`);
* `config.eval.restarts` random restarts of every attack: an example counts
  as robust only if it survives every restart (the targets stay the same);
* an all-or-nothing row: an example counts only if it is classified
  correctly under every attack that was run (the CAAD rule);
* sanity checks against gradient masking on the first
  `config.eval.sanity_num_examples` examples (see `sanity_checks` below).

Each attack kind is ONE jitted data-parallel function (`jax.shard_map` over
all devices of all processes via `fdjax.parallel.data_parallel`) whose
epsilon, step size and step count are traced, so a sweep over 10 ... 2000
steps and the sanity checks' epsilon sweep compile it once. Each process
feeds its own part of every global batch (`create_eval_iter`); the
per-example results are gathered with `process_allgather`.

Randomness (the same on any number of devices or processes, because it is
folded per global example id): `key = jax.random.key(config.eval.seed)`,
`target_key, start_key = jax.random.split(key)` -- exactly
`fdjax.attacks.targeted_pgd(logits_fn, key, ...)` for restart 0 -- and
restart r > 0 starts from `jax.random.fold_in(start_key, r)`.

With a workdir, results go to `workdir/eval/<name>/`:

* `per_example.jsonl`: one JSON line per example (`index`, `label`,
  `clean_pred`, `clean_correct` and, per attack `<a>`, `<a>.pred`,
  `<a>.correct`, `<a>.success` and, for targeted attacks, `<a>.target`),
  appended and flushed after every batch. Rerunning the same evaluation
  resumes after the last example written (a different model or attack
  setting starts afresh and keeps the old file as `per_example.jsonl.stale`;
  `num_examples` may grow between runs).
* `per_example.npz`: the same columns as arrays, at the end.
* `results.json`: the returned results.
* `accuracy_vs_steps.png` (the paper's Figure 6) and `feature_maps.png`
  (Figures 2 and 3: the first example and its adversarial version, for
  models with denoising blocks).

Command lines (`fdjax.main` calls `run` and `run_predict`)::

  python -m fdjax.main --mode=eval --config=configs/imagenet.py:r152_denoise \
      --workdir=/tmp/r152_denoise --config.eval.pgd_steps='(10,100,1000,2000)'
  python -m fdjax.main --mode=predict \
      --config=configs/imagenet.py:r152_denoise --workdir=/tmp/r152_denoise \
      --image_dir=imgs/ --output_csv=out.csv
"""

import collections
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
import csv
import dataclasses
import functools
import hashlib
import json
import math
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

from fdjax import attacks
from fdjax import config_base
from fdjax import input_pipeline
from fdjax import parallel

KINDS = ('targeted', 'untargeted')
PASS, WARN, SKIP = 'PASS', 'WARN', 'SKIP'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
PER_EXAMPLE_FILE = 'per_example.jsonl'
STATE_FILE = 'state.json'
RESULTS_FILE = 'results.json'
ACCURACY_FIGURE = 'accuracy_vs_steps.png'
FEATURES_FIGURE = 'feature_maps.png'

# Defaults of the `config.eval` fields (documented there); a config without
# a field gets its default.
EVAL_DEFAULTS = config_base.eval_config().to_dict()

# How often each per-device function was traced (tests check "compiles once").
_TRACES = collections.Counter()
_FN_CACHE = {}


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


def _positive_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_steps(field: str, steps: Any) -> list[int]:
  steps = list(steps or ())
  for s in steps:
    if not _positive_int(s) or s < 1:
      raise ValueError(
        f'eval.{field}={tuple(steps)!r}: every step count must be an '
        'integer >= 1.'
      )
  return [int(s) for s in steps]


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
  out = [Attack(sweep_kind, s) for s in _check_steps('pgd_steps', c.pgd_steps)]
  extra = _check_steps('untargeted_steps', c.get('untargeted_steps', ()))
  out += [Attack('untargeted', s) for s in extra]
  unique = []
  for a in out:
    if a not in unique:
      unique.append(a)
  return unique


def resolve_eval_config(
  eval_config: ml_collections.ConfigDict | Mapping[str, Any] | None,
) -> ml_collections.ConfigDict:
  """`config.eval` with defaults (`EVAL_DEFAULTS`) filled in, validated.

  Args:
    eval_config: `config.eval` (fields: `fdjax/config_base.py`); missing fields
      take their defaults.

  Returns:
    A new `ConfigDict` with every field of `EVAL_DEFAULTS`.

  Raises:
    ValueError: an unknown field, or the first invalid one, with what is
      valid.

  Examples:
    >>> ec = resolve_eval_config({'pgd_steps': (10,)})
    >>> ec.pgd_steps, ec.restarts
    ((10,), 1)
    >>> resolve_eval_config({'restarts': 0})
    Traceback (most recent call last):
    ...
    ValueError: eval.restarts=0 must be an integer >= 1.
  """
  given = eval_config or {}
  if isinstance(given, ml_collections.ConfigDict):
    given = given.to_dict()
  unknown = sorted(set(given) - set(EVAL_DEFAULTS))
  if unknown:
    raise ValueError(
      f'unknown eval config field(s) {unknown}; valid: {sorted(EVAL_DEFAULTS)}.'
    )
  c = ml_collections.ConfigDict(dict(EVAL_DEFAULTS, **given))
  attack_list(c)
  for field in (
    'global_batch_size',
    'restarts',
    'sanity_num_examples',
    'sanity_steps',
  ):
    value = c[field]
    if not _positive_int(value) or value < 1:
      raise ValueError(f'eval.{field}={value!r} must be an integer >= 1.')
  if not _positive_int(c.num_examples) or not (
    c.num_examples == -1 or c.num_examples >= 1
  ):
    raise ValueError(
      f'eval.num_examples={c.num_examples!r} must be -1 (the whole split) or '
      'a positive integer.'
    )
  for field in ('epsilon', 'step_size', 'sanity_large_epsilon'):
    value = c[field]
    if not (
      isinstance(value, (int, float, np.floating))
      and math.isfinite(value)
      and value > 0
    ):
      raise ValueError(f'eval.{field}={value!r} must be a number > 0.')
  multiples = tuple(c.sanity_epsilon_multiples)
  if not multiples or any(not m > 0 for m in multiples):
    raise ValueError(
      f'eval.sanity_epsilon_multiples={multiples!r} must be a non-empty '
      'tuple of numbers > 0.'
    )
  for field in ('sanity_tolerance', 'sanity_max_zero_gradient_fraction'):
    if not 0 <= c[field] <= 1:
      raise ValueError(f'eval.{field}={c[field]!r} must be in [0, 1].')
  if c.untargeted_loss not in attacks.LOSSES:
    raise ValueError(
      f'eval.untargeted_loss={c.untargeted_loss!r} is not valid; valid: '
      f'{attacks.LOSSES}.'
    )
  for channel in c.figure_channels:
    if not _positive_int(channel) or channel < 0:
      raise ValueError(
        f'eval.figure_channels={tuple(c.figure_channels)!r} must hold '
        'channel indices >= 0 (empty: the channel mean).'
      )
  return c


# ---------------------------------------------------------------------------
# The jitted data-parallel functions.


class _Fns(NamedTuple):
  predict: Any
  input_grads: Any
  targeted: Any
  untargeted: Any


def _unit_images(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] or float [0, 1] images -> float32 in [0, 1]."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _make_fns(
  model: Any, mesh: jax.sharding.Mesh, num_classes: int, loss: str
) -> _Fns:
  """Builds (or reuses) the jitted data-parallel evaluation functions."""
  cache_key = (model, mesh, num_classes, loss)
  try:
    return _FN_CACHE[cache_key]
  except (KeyError, TypeError):
    pass

  def logits_fn(variables, x):
    # Moving BatchNorm statistics, nothing mutable (SPEC.md section 4).
    return model.apply(variables, x, train=False)

  def predict(variables, images):
    _TRACES['predict'] += 1
    logits = logits_fn(variables, _unit_images(images))
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def input_grads(variables, images, labels):
    _TRACES['input_grads'] += 1

    def total_loss(x):
      logits = logits_fn(variables, x)
      return jnp.sum(attacks.example_losses(logits, labels, 'xent'))

    g = jax.grad(total_loss)(_unit_images(images))
    axes = tuple(range(1, g.ndim))
    return jnp.all(g == 0, axis=axes), ~jnp.all(jnp.isfinite(g), axis=axes)

  def targeted(
    variables, target_key, start_key, images, labels, ids, eps, step, steps
  ):
    _TRACES['targeted'] += 1
    targets = attacks.random_targets(
      jax.random.wrap_key_data(target_key), labels, num_classes, ids
    )
    adv = attacks.pgd(
      functools.partial(logits_fn, variables),
      jax.random.wrap_key_data(start_key),
      _unit_images(images),
      targets,
      epsilon=eps,
      step_size=step,
      num_steps=steps,
      targeted=True,
      random_start=True,
      example_ids=ids,
    )
    pred = jnp.argmax(logits_fn(variables, adv), axis=-1).astype(jnp.int32)
    return pred, targets, adv

  def untargeted(variables, start_key, images, labels, ids, eps, step, steps):
    _TRACES['untargeted'] += 1
    adv = attacks.pgd(
      functools.partial(logits_fn, variables),
      jax.random.wrap_key_data(start_key),
      _unit_images(images),
      labels,
      epsilon=eps,
      step_size=step,
      num_steps=steps,
      targeted=False,
      random_start=True,
      loss=loss,
      example_ids=ids,
    )
    pred = jnp.argmax(logits_fn(variables, adv), axis=-1).astype(jnp.int32)
    return pred, adv

  d, r = P(parallel.AXIS), P()

  def wrap(fn, in_specs, out_specs):
    return jax.jit(
      parallel.data_parallel(
        fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs
      )
    )

  fns = _Fns(
    predict=wrap(predict, (r, d), d),
    input_grads=wrap(input_grads, (r, d, d), (d, d)),
    targeted=wrap(targeted, (r, r, r, d, d, d, r, r, r), (d, d, d)),
    untargeted=wrap(untargeted, (r, r, d, d, d, r, r, r), (d, d)),
  )
  try:
    _FN_CACHE[cache_key] = fns
  except TypeError:  # An unhashable model: no reuse across calls.
    pass
  return fns


class _Runner:
  """Places batches on the mesh, runs the attacks, gathers the results."""

  def __init__(self, fns, variables, mesh, eval_config, num_classes):
    self.fns = fns
    self.mesh = mesh
    self.num_classes = num_classes
    self.variables = parallel.replicate(variables, mesh)
    self.batch_sharding = NamedSharding(mesh, P(parallel.AXIS))
    key = jax.random.key(eval_config.seed)
    target_key, start_key = jax.random.split(key)
    self.target_key = self._rep(jax.random.key_data(target_key))
    self._start_key = start_key
    self.epsilon = float(eval_config.epsilon)
    self.step_size = float(eval_config.step_size)
    self.restarts = int(eval_config.restarts)

  def _rep(self, x):
    return parallel.replicate(np.asarray(x), self.mesh)

  def start_key(self, restart: int):
    key = self._start_key
    if restart:
      key = jax.random.fold_in(key, restart)
    return self._rep(jax.random.key_data(key))

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

  def predict(self, g) -> np.ndarray:
    return _gather(self.fns.predict(self.variables, g['image']))

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
    if step_size is None:
      step_size = attacks.paper_step_size(
        np.float32(eps), np.float32(self.step_size), np.int32(num_steps)
      )
    scalars = self.scalars(eps, step_size, num_steps)
    start = self.start_key(restart)
    args = (g['image'], g['label'], g['index'])
    if kind == 'targeted':
      pred, targets, adv = self.fns.targeted(
        self.variables, self.target_key, start, *args, *scalars
      )
      return _gather(pred), _gather(targets), adv
    pred, adv = self.fns.untargeted(self.variables, start, *args, *scalars)
    return _gather(pred), None, adv

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


# ---------------------------------------------------------------------------
# Persistence and resumption.


def _fingerprint(variables: Any) -> str:
  """A digest of the variables, to tell whether stored results are theirs."""
  h = hashlib.blake2b(digest_size=16)
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(arr.dtype).encode() + str(arr.shape).encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def _to_json_value(x):
  if isinstance(x, (np.bool_, bool)):
    return bool(x)
  if isinstance(x, (np.integer,)):
    return int(x)
  return x


class _Store:
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


def _columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  if not rows:
    return {}
  return {k: np.asarray([row[k] for row in rows]) for k in rows[0]}


def _broadcast_json(obj: Any) -> Any:
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


def eval_name(config: ml_collections.ConfigDict) -> str:
  """The directory name of an evaluation under `workdir/eval/`.

  Args:
    config: an fdjax config.

  Returns:
    `config.eval.name`, or `<dataset>_<eval split>` made file-name safe.

  Examples:
    >>> from fdjax import input_pipeline
    >>> cfg = ml_collections.ConfigDict(dict(
    ...     eval={}, data=input_pipeline.default_data_config('imagenet2012')))
    >>> eval_name(cfg)
    'imagenet2012_validation'
  """
  name = resolve_eval_config(config.eval).name or (
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
  source: input_pipeline.Source | None = None,
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
      results.json, figures); None keeps everything in memory.
    mesh: a `fdjax.parallel.make_mesh()` mesh; default all devices.
    source: a random-access source to use instead of the config's eval
      split (tests, in-memory data).
    metadata: extra JSON-able fields for the results (e.g. the checkpoint
      step).

  Returns:
    A JSON-able dict: `model`, `num_examples`, `epsilon`, `restarts`, ...,
    `clean` {accuracy, correct}, `attacks` {name: {kind, num_steps,
    step_size, accuracy, correct, success_rate, success}},
    `all_or_nothing` {attacks, accuracy, correct} (None without attacks),
    `sanity` (see `sanity_checks`; None when `eval.sanity` is False),
    `files` {name: path} and `resumed_from` (examples already done).

  Raises:
    ValueError: an invalid eval config, a global batch that does not divide
      by the device count, or `num_examples` beyond the split.

  Examples:
    >>> from fdjax import models
    >>> config = ml_collections.ConfigDict(dict(
    ...     data=input_pipeline.default_data_config('digits'),
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
  ec, dc = resolve_eval_config(config.eval), config.data
  mesh = parallel.make_mesh() if mesh is None else mesh
  parallel.check_divisible(
    ec.global_batch_size, mesh.devices.size, 'eval.global_batch_size'
  )
  if source is None:
    source = input_pipeline.get_source(dc, dc.eval_split)
  split_size = len(source)
  total = split_size if ec.num_examples == -1 else int(ec.num_examples)
  if total > split_size:
    raise ValueError(
      f'eval.num_examples={total} exceeds the {split_size} examples of the '
      'eval split; use -1 for all of them.'
    )
  attack_set = attack_list(ec)
  variables = jax.tree.map(np.asarray, jax.device_get(variables))
  num_classes = _infer_num_classes(model, variables, dc.image_size)
  loss = ec.untargeted_loss
  fns = _make_fns(model, mesh, num_classes, loss)
  runner = _Runner(fns, variables, mesh, ec, num_classes)
  is_main = jax.process_index() == 0

  directory = None
  if workdir is not None:
    directory = os.path.join(workdir, 'eval', eval_name(config))
  state = {
    'variables': _fingerprint(variables),
    'data': {
      k: dc.get(k)
      for k in (
        'name',
        'eval_split',
        'image_size',
        'image_dtype',
        'resize_method',
        'eval_crop_fraction',
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
  store = _Store(directory, state)
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

  cols = _columns([row for row in store.rows if row['index'] < total])
  results = (
    _aggregate(cols, attack_set, ec, config, workdir) if is_main else None
  )
  if ec.sanity:
    sanity = sanity_checks(
      runner, ec, dc, source, cols, results, attack_set, total
    )
    if is_main:
      results['sanity'] = sanity
  elif is_main:
    results['sanity'] = None
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
      npz = os.path.join(directory, 'per_example.npz')
      np.savez(npz, **cols)
      results['files'].update(
        per_example=os.path.join(directory, PER_EXAMPLE_FILE),
        per_example_npz=npz,
        results=os.path.join(directory, RESULTS_FILE),
      )
      with open(os.path.join(directory, RESULTS_FILE), 'w') as f:
        json.dump(results, f, indent=2)
    logging.info('Evaluation results:\n%s', format_table(results))
  return _broadcast_json(results)


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
    {k: _to_json_value(v[i].item()) for k, v in cols.items()} for i in keep
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
    eta = (self.total - self.count) / rate if rate > 0 else float('nan')
    accs = ', '.join(
      f'{k.removesuffix(".correct")} {self.sums[k] / self.count:.3f}'
      for k in self.keys
    )
    logging.info(
      'eval %d/%d examples (%.1f%%): %s; %.2f img/s, ETA %.0f s',
      self.count,
      self.total,
      100.0 * self.count / self.total,
      accs,
      rate,
      eta,
    )


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


# ---------------------------------------------------------------------------
# Sanity checks against gradient masking.


def _check(ok: bool, message: str, **numbers) -> dict[str, Any]:
  return dict(status=PASS if ok else WARN, message=message, **numbers)


def _non_increasing(values: Sequence[float], slack: float) -> bool:
  return all(b <= a + slack for a, b in zip(values, values[1:]))


def sanity_checks(
  runner: _Runner,
  ec: ml_collections.ConfigDict,
  dc: ml_collections.ConfigDict,
  source: input_pipeline.Source,
  cols: Mapping[str, np.ndarray],
  results: Mapping[str, Any] | None,
  attack_set: Sequence[Attack],
  total: int,
) -> dict[str, Any]:
  """Checks that the attacks work (no sign of gradient masking).

  On the first `eval.sanity_num_examples` examples (and the full results
  for the step sweep); each check is PASS or WARN (SKIP when it does not
  apply), with its numbers. A margin of `eval.sanity_tolerance` plus one
  example's worth of accuracy absorbs the randomness of the attacks.

  * `accuracy_falls_with_epsilon`: untargeted PGD (`eval.sanity_steps`
    steps of 2.5 eps / steps) at eps x `eval.sanity_epsilon_multiples` and at
    `eval.sanity_large_epsilon`: accuracy never rises with epsilon
    (starting from the clean accuracy).
  * `large_epsilon_breaks_model`: at the large epsilon accuracy is 0 (at
    most the tolerance).
  * `more_steps_never_help`: accuracy does not rise along the step sweep.
  * `input_gradients`: the fraction of examples whose input gradient (of
    the cross-entropy at the clean image) is all zero or not finite is at
    most `eval.sanity_max_zero_gradient_fraction`.
  * `untargeted_not_weaker`: untargeted PGD is at least as strong as
    targeted PGD at the same epsilon and the smallest step count.

  Called by `evaluate` on every process (the attacks are collective).

  Args:
    runner: the evaluation's runner.
    ec: `config.eval`.
    dc: `config.data`.
    source: the eval source.
    cols: the per-example columns of the evaluation (process 0).
    results: the aggregated results (process 0; None elsewhere).
    attack_set: the attacks of the evaluation.
    total: the number of examples evaluated.

  Returns:
    {'status': PASS or WARN, 'num_examples', 'checks': {name: {...}}}.
  """
  n_sub = min(int(ec.sanity_num_examples), total)
  tol = float(ec.sanity_tolerance)
  slack = tol + 1.0 / n_sub
  eps = float(ec.epsilon)
  steps = int(ec.sanity_steps)
  epsilons = sorted({float(m) * eps for m in ec.sanity_epsilon_multiples})
  large = float(ec.sanity_large_epsilon)
  if large > epsilons[-1]:
    epsilons.append(large)
  sweep_kind = attack_set[0].kind if attack_set else None
  sweep = [a for a in attack_set if a.kind == sweep_kind]
  other = 'untargeted' if sweep_kind == 'targeted' else 'targeted'
  first_steps = min(a.num_steps for a in sweep) if sweep else None

  correct = collections.defaultdict(list)
  zero_grad, bad_grad, labels_all = [], [], []
  batches = input_pipeline.create_eval_iter(
    dc,
    global_batch_size=ec.global_batch_size,
    source=source,
    num_examples=n_sub,
  )
  for batch in batches:
    g = runner.place(batch)
    labels, mask = _gather(g['label']), _gather(g['mask']).astype(bool)
    labels_all.append(labels[mask])
    correct['clean'].append((runner.predict(g) == labels)[mask])
    zero, bad = runner.fns.input_grads(runner.variables, g['image'], g['label'])
    zero_grad.append(_gather(zero)[mask])
    bad_grad.append(_gather(bad)[mask])
    for e in epsilons:
      p, _, _ = runner.attack(
        g, 'untargeted', steps, epsilon=e, step_size=2.5 * e / steps
      )
      correct[e].append((p == labels)[mask])
    if first_steps is not None:
      _, c, _, _ = runner.robust(g, labels, other, first_steps)
      correct['other'].append(c[mask])
  acc = {k: float(np.mean(np.concatenate(v))) for k, v in correct.items()}
  if jax.process_index() != 0:
    return {}

  checks = {}
  chain = [acc['clean']] + [acc[e] for e in epsilons]
  checks['accuracy_falls_with_epsilon'] = _check(
    _non_increasing(chain, slack),
    'accuracy should not rise with epsilon',
    epsilons=[0.0] + epsilons,
    accuracy=chain,
    num_steps=steps,
  )
  checks['large_epsilon_breaks_model'] = _check(
    acc[epsilons[-1]] <= tol,
    f'accuracy should reach 0 at epsilon {epsilons[-1]:g}',
    epsilon=epsilons[-1],
    accuracy=acc[epsilons[-1]],
  )
  if len(sweep) >= 2:
    ordered = sorted(sweep, key=lambda a: a.num_steps)
    accs = [results['attacks'][a.name]['accuracy'] for a in ordered]
    full_slack = tol + 1.0 / max(results['num_examples'], 1)
    checks['more_steps_never_help'] = _check(
      _non_increasing(accs, full_slack),
      f'{sweep_kind} PGD accuracy should not rise with more steps',
      num_steps=[a.num_steps for a in ordered],
      accuracy=accs,
    )
  else:
    checks['more_steps_never_help'] = dict(
      status=SKIP, message='needs at least two step counts in eval.pgd_steps'
    )
  zero = np.concatenate(zero_grad)
  bad = np.concatenate(bad_grad)
  frac = float(np.mean(zero | bad))
  checks['input_gradients'] = _check(
    frac <= float(ec.sanity_max_zero_gradient_fraction),
    'input gradients should be non-zero and finite',
    zero_fraction=float(np.mean(zero)),
    nonfinite_fraction=float(np.mean(bad)),
    max_fraction=float(ec.sanity_max_zero_gradient_fraction),
  )
  if first_steps is not None:
    name = f'{sweep_kind}_pgd_{first_steps}'
    sub = cols[f'{name}.correct'][:n_sub] if cols else np.zeros(0)
    sweep_acc = float(np.mean(sub)) if len(sub) else float('nan')
    if sweep_kind == 'targeted':
      targeted_acc, untargeted_acc = sweep_acc, acc['other']
    else:
      targeted_acc, untargeted_acc = acc['other'], sweep_acc
    checks['untargeted_not_weaker'] = _check(
      untargeted_acc <= targeted_acc + slack,
      f'untargeted accuracy should be <= targeted accuracy at '
      f'{first_steps} steps',
      num_steps=first_steps,
      targeted_accuracy=targeted_acc,
      untargeted_accuracy=untargeted_acc,
    )
  else:
    checks['untargeted_not_weaker'] = dict(
      status=SKIP, message='needs an attack in eval.pgd_steps'
    )
  status = WARN if any(c['status'] == WARN for c in checks.values()) else PASS
  for name, c in checks.items():
    log = logging.warning if c['status'] == WARN else logging.info
    log('sanity check %s: %s (%s)', name, c['status'], c['message'])
  return {'status': status, 'num_examples': n_sub, 'checks': checks}


# ---------------------------------------------------------------------------
# Figures.


def _write_figures(
  model, variables, runner, ec, dc, source, results, attack_set, directory
) -> dict[str, str]:
  """The accuracy-vs-steps and feature-map figures (process 0 writes)."""
  from fdjax import plots  # matplotlib only when figures are written.

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
    clean = np.asarray(batch['image'][0])
    if clean.dtype == np.uint8:
      clean = clean.astype(np.float32) / 255.0
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
        cells.append(f'{_pct(a["accuracy"])} ({_pct(a.get("success_rate"))})')
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
  return '\n'.join(lines)


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f'{v:.4g}'
  if isinstance(v, (list, tuple)):
    return '[' + ', '.join(_fmt(x) for x in v) + ']'
  return str(v)


# ---------------------------------------------------------------------------
# Entry points.


def load_model(
  config: ml_collections.ConfigDict, workdir: str
) -> tuple[Any, dict[str, Any], dict[str, Any], int]:
  """The model and variables of a workdir's newest checkpoint.

  The model settings come from the checkpoint's meta['model'] (training
  runs and `fdjax.convert` outputs store them) and otherwise from
  `config.model` with the eval dataset's class count.

  Args:
    config: an fdjax config.
    workdir: a directory with `checkpoints/`.

  Returns:
    (model, variables, meta, step).

  Raises:
    FileNotFoundError: no checkpoint in the workdir.
  """
  from fdjax import checkpoints
  from fdjax import models

  variables, meta, step = checkpoints.load_variables(workdir)
  if meta.get('model'):
    model = models.create_model(**dict(meta['model']))
    logging.info('Model from the checkpoint: %s', meta['model'])
  else:
    from fdjax import train

    num_classes = input_pipeline.dataset_info(config.data).num_classes
    model = train.create_model(config.model, num_classes)
    logging.info('Model from config.model (%d classes)', num_classes)
  return model, variables, meta, step


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`--mode=eval`: evaluates the newest checkpoint of a workdir.

  Works on training workdirs and on `fdjax.convert` outputs. Writes
  `workdir/eval/<name>/` (module docstring) and prints the table.

  Args:
    config: an fdjax config (`eval` and `data` are used; `model` when the
      checkpoint does not describe its model).
    workdir: a directory with `checkpoints/`.

  Returns:
    The results of `evaluate`, plus `checkpoint_step`.
  """
  model, variables, meta, step = load_model(config, workdir)
  results = evaluate(
    model,
    variables,
    config,
    workdir=workdir,
    metadata={'checkpoint_step': step, 'checkpoint_source': meta.get('source')},
  )
  if jax.process_index() == 0:
    print(format_table(results))
    for name, path in sorted(results.get('files', {}).items()):
      print(f'{name}: {path}')
  return results


def list_images(image_dir: str) -> list[str]:
  """The image files (png, jpg, jpeg) of a directory, sorted by name.

  Args:
    image_dir: the directory (not searched recursively).

  Returns:
    File names (not paths).

  Raises:
    ValueError: not a directory, or no image in it.
  """
  if not os.path.isdir(image_dir):
    raise ValueError(f'image_dir={image_dir!r} is not a directory.')
  names = sorted(
    f
    for f in os.listdir(image_dir)
    if f.lower().endswith(IMAGE_EXTENSIONS)
    and os.path.isfile(os.path.join(image_dir, f))
  )
  if not names:
    raise ValueError(
      f'no image files ({", ".join(IMAGE_EXTENSIONS)}) in {image_dir!r}.'
    )
  return names


def predict_directory(
  model: Any,
  variables: Any,
  image_dir: str,
  output_csv: str,
  *,
  image_size: int = 224,
  batch_size: int = 64,
  crop_fraction: float = 224 / 256,
  mesh: jax.sharding.Mesh | None = None,
) -> dict[str, int]:
  """Classifies every image of a directory into a CSV (CAAD-style).

  Each png/jpg/jpeg file is decoded to RGB and given the ImageNet eval
  preprocessing of `fdjax.input_pipeline` (shorter side resized to
  `image_size / crop_fraction` with bicubic interpolation, central
  `image_size` square). The CSV has one line `filename,label` per image (no
  header), in file-name order, with the predicted class index.

  Args:
    model: a Flax module applied as `model.apply(variables, x, train=False)`.
    variables: its variables.
    image_dir: the directory of images.
    output_csv: the CSV file to write (process 0 writes).
    image_size: the model's input size.
    batch_size: images per step (rounded up to a multiple of the devices).
    crop_fraction: centre-crop fraction (224/256 as the original).
    mesh: devices to use (default: this process's devices).

  Returns:
    {filename: predicted class}.

  Raises:
    ValueError: no images, or an invalid image_size/batch_size.

  Examples:
    >>> import tempfile
    >>> from PIL import Image
    >>> from fdjax import models
    >>> d = tempfile.mkdtemp()
    >>> Image.new('RGB', (20, 12), (200, 30, 90)).save(f'{d}/a.png')
    >>> model = models._ResNetTiny(num_classes=10)
    >>> v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    >>> out = predict_directory(model, v, d, f'{d}/out.csv', image_size=8,
    ...                         mesh=parallel.make_mesh(jax.devices()[:1]))
    >>> list(out), open(f'{d}/out.csv').read().count(',')
    (['a.png'], 1)
  """
  from PIL import Image

  if not _positive_int(image_size) or image_size < 1:
    raise ValueError(f'image_size={image_size!r} must be a positive integer.')
  if not _positive_int(batch_size) or batch_size < 1:
    raise ValueError(f'batch_size={batch_size!r} must be a positive integer.')
  names = list_images(image_dir)
  mesh = parallel.make_mesh(jax.local_devices()) if mesh is None else mesh
  num_devices = mesh.devices.size
  batch_size = -(-batch_size // num_devices) * num_devices
  dc = input_pipeline.default_data_config('imagenet2012')
  dc.image_size = int(image_size)
  dc.eval_crop_fraction = float(crop_fraction)
  dc.image_dtype = 'float32'  # As the eval input: shares its compile.
  predict = _make_fns(model, mesh, 2, 'xent').predict
  replicated = parallel.replicate(
    jax.tree.map(np.asarray, jax.device_get(variables)), mesh
  )
  sharding = NamedSharding(mesh, P(parallel.AXIS))
  labels = []
  for start in range(0, len(names), batch_size):
    chunk = names[start : start + batch_size]
    images = np.zeros((batch_size, image_size, image_size, 3), np.float32)
    for i, name in enumerate(chunk):
      with Image.open(os.path.join(image_dir, name)) as im:
        rgb = np.asarray(im.convert('RGB'))
      images[i] = input_pipeline.preprocess_eval(dc, rgb)
    pred = np.asarray(predict(replicated, jax.device_put(images, sharding)))
    labels.extend(int(p) for p in pred[: len(chunk)])
    logging.info('predicted %d/%d images', len(labels), len(names))
  out = dict(zip(names, labels))
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output_csv)), exist_ok=True)
    with open(output_csv, 'w', newline='') as f:
      writer = csv.writer(f)
      for name, label in out.items():
        writer.writerow([name, label])
  return out


def run_predict(
  config: ml_collections.ConfigDict,
  workdir: str,
  image_dir: str,
  output_csv: str,
) -> dict[str, int]:
  """`--mode=predict`: a workdir's newest checkpoint on a directory of images.

  Args:
    config: an fdjax config (`data.image_size`, `data.eval_crop_fraction`,
      `eval.global_batch_size`; `model` when the checkpoint lacks meta).
    workdir: a directory with `checkpoints/`.
    image_dir: the images to classify.
    output_csv: the CSV to write (`filename,label` lines).

  Returns:
    {filename: predicted class}.
  """
  model, variables, _, _ = load_model(config, workdir)
  out = predict_directory(
    model,
    variables,
    image_dir,
    output_csv,
    image_size=config.data.image_size,
    batch_size=config.eval.global_batch_size,
    crop_fraction=config.data.get('eval_crop_fraction', 224 / 256),
  )
  if jax.process_index() == 0:
    print(f'wrote {len(out)} predictions to {output_csv}')
  return out
