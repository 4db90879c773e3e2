r"""Adversarial sets on disk: write them (`--mode=attack`), read and score them.

The black-box protocol of the paper's Table 2 and of CAAD 2018: attack the
eval split once with transfer attackers on source models
(`fdjax.attacks.transfer`), keep the images, and score any number of
defenders on them later (`--mode=eval --config.eval.adversarial_sets=...`,
`fdjax.evaluate`).

  python -m fdjax.main --mode=attack --config=configs/default.py:blackbox \
      --workdir=SOURCE_WORKDIR --config.attack_set.out=SETS/mi_fgsm

Layout of a set (the competitions' exchange format; other tools' sets in
this layout score the same way):

* ``NNNNNN.png``: one lossless 8-bit RGB PNG per example of the eval split,
  named by the example's index in the split (``000042.png``), of the size
  the models take (``config.data.image_size``, after the eval
  preprocessing);
* ``labels.csv``: ``filename,true_label,target_label`` (``target_label``
  -1 or empty for untargeted attacks), one row per image;
* ``provenance.json`` (fdjax's sets only): source models, attack, epsilon,
  steps, seed, data, and the rounding rule.

Rounding to uint8 stays inside the epsilon ball: with ``x`` the clean image
the attack saw (float, in [0, 1]) and ``a`` the adversarial one, pixel
``q = clip(round(255 a), ceil(255 (x - eps)), floor(255 (x + eps)))``
clipped to [0, 255], in float64; so ``|q / 255 - x| <= eps`` holds for every
pixel (up to float64 rounding), also when ``x`` is not on the uint8 grid
(digits). The interval is never empty because ``attack_set.epsilon >=
0.5/255`` (checked).

Resumption: every file is written under a temporary name and renamed
(``os.replace``), so a file either exists complete or not at all. Batches
are fixed by ``attack_set.global_batch_size`` (examples ``[b B, (b+1) B)``)
and the attack's randomness is folded per example id, so rerunning the same
command after a kill skips the batches whose images all exist, recomputes
the others, writes only the missing files, and ends with byte-identical
PNGs. ``labels.csv`` is written last: a set without it is incomplete.
"""

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import csv
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image

from fdjax import attacks
from fdjax import checkpoints
from fdjax import config_base
from fdjax import data
from fdjax import parallel
from fdjax import preprocess
from fdjax import results as results_lib
from fdjax import writers

LABELS_FILE = 'labels.csv'
PROVENANCE_FILE = 'provenance.json'
CSV_FIELDS = ('filename', 'true_label', 'target_label')
FORMAT = 'fdjax.attack_set/1'
ROUNDING = (
  'q = clip(round(255 a), ceil(255 (x - eps)), floor(255 (x + eps))) '
  'clipped to [0, 255], float64; x the clean image, a the adversarial one'
)
# Fields of provenance.json that may differ between a run and its resumption.
_RUN_FIELDS = ('devices',)


def file_name(index: int) -> str:
  """The PNG of eval-split example ``index``.

  Examples:
    >>> file_name(42)
    '000042.png'
  """
  return f'{int(index):06d}.png'


def quantize(
  adversarial: np.ndarray, clean: np.ndarray, epsilon: float
) -> np.ndarray:
  """uint8 pixels inside the epsilon ball around ``clean`` (module doc).

  Args:
    adversarial: float images in [0, 1].
    clean: the clean float images in [0, 1], same shape.
    epsilon: the L-inf radius in [0, 1] units, >= 0.5 / 255.

  Returns:
    uint8 images ``q`` with ``|q / 255 - clean| <= epsilon``.

  Examples:
    >>> quantize(np.array([0.45]), np.array([0.4]), 0.02).tolist()
    [107]
    >>> 107 / 255 - 0.4 <= 0.02
    True
  """
  a = np.asarray(adversarial, np.float64) * 255.0
  x = np.asarray(clean, np.float64)
  lo = np.maximum(np.ceil((x - epsilon) * 255.0), 0.0)
  hi = np.minimum(np.floor((x + epsilon) * 255.0), 255.0)
  return np.clip(np.round(a), lo, hi).astype(np.uint8)


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  write(tmp)
  os.replace(tmp, path)


def write_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, 3] image as PNG, atomically (temp + rename)."""
  _atomic_write(
    path, lambda tmp: Image.fromarray(image, 'RGB').save(tmp, format='PNG')
  )


def _write_text(path: str, text: str) -> None:
  def write(tmp):
    with open(tmp, 'w', newline='') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())

  _atomic_write(path, write)


# ---------------------------------------------------------------------------
# Writing a set: --mode=attack.


def attack_of(c: ml_collections.ConfigDict, num_classes: int):
  """The `fdjax.attacks.TransferAttack` of `config.attack_set`."""
  return attacks.TransferAttack(
    epsilon=float(c.epsilon),
    num_steps=int(c.num_steps),
    momentum=float(c.momentum),
    diversity_prob=float(c.diversity_prob),
    diversity_scale=float(c.diversity_scale),
    ti_kernel_size=int(c.ti_kernel_size),
    ti_sigma=float(c.ti_sigma) or None,
    targeted=bool(c.targeted),
    loss=str(c.loss),
    num_classes=int(num_classes),
  )


def _attack_batch(
  attack, apply, variables, key_data, images, labels, ids, eps, steps
):
  key = jax.random.wrap_key_data(key_data)
  adv = attacks.transfer_attack(
    functools.partial(apply, variables),
    key,
    preprocess.to_unit_float(images),
    labels,
    epsilon=eps,
    num_steps=steps,
    momentum=attack.momentum,
    diversity_prob=attack.diversity_prob,
    diversity_scale=attack.diversity_scale,
    ti_kernel_size=attack.ti_kernel_size,
    ti_sigma=attack.ti_sigma,
    targeted=attack.targeted,
    loss=attack.loss,
    example_ids=ids,
  )
  return adv


def _num_classes(model, variables, image_size: int) -> int:
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  out = jax.eval_shape(lambda z: model.apply(variables, z, train=False), x)
  return int(out.shape[-1])


def _apply_train_false(model, variables, x):
  return model.apply(variables, x, train=False)


@functools.lru_cache(maxsize=8)
def _compiled_cached(attack, models, mesh):
  return _build_compiled(attack, models, mesh)


def _build_compiled(attack, models, mesh):
  apply = attacks.ensemble_apply(
    [functools.partial(_apply_train_false, m) for m in models]
  )
  d, r = P(parallel.AXIS), P()
  return parallel.jit_data_parallel(
    functools.partial(_attack_batch, attack, apply),
    mesh=mesh,
    in_specs=(r, r, d, d, d, r, r),
    out_specs=d,
  )


def compiled(attack, models: tuple[Any, ...], mesh: jax.sharding.Mesh):
  """The jitted data-parallel attack of a set (cached: no recompiles).

  Returns:
    ``fn(variables_seq, key_data, images, attack_labels, ids, epsilon,
    num_steps) -> adversarial images`` of global arrays.
  """
  try:
    return _compiled_cached(attack, models, mesh)
  except TypeError:  # Unhashable models.
    return _build_compiled(attack, models, mesh)


def make_set(
  config: ml_collections.ConfigDict,
  workdir: str | None,
  *,
  members: Sequence[tuple[Any, Any, Mapping[str, Any]]] | None = None,
  source: data.Source | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
  """`--mode=attack`: writes the adversarial set of `config.attack_set`.

  Call it on every process (the attack is collective); process 0 writes.

  Args:
    config: an fdjax config (`attack_set`, `data`; `model` for checkpoints
      that do not describe their model).
    workdir: the source model's workdir when `attack_set.sources` is empty.
    members: instead of checkpoints, the source models as ``(model,
      variables, info)`` (tests; ``info`` goes into the provenance).
    source: the eval split's source instead of the config's.
    mesh: a `fdjax.parallel.make_mesh()` mesh; default all devices.

  Returns:
    {'directory', 'written', 'skipped', 'num_examples', 'batch_seconds',
    'batch_sizes', 'seconds_per_image'} (the last one: after the first,
    compiling batch, NaN with one batch).

  Raises:
    ValueError: an invalid config, no output directory, or an output
      directory holding a set made with other settings (what differs).
  """
  c, dc = config.attack_set, config.data
  config_base.validate_attack_set(c)
  config_base.validate_data(dc)
  if not c.out:
    raise ValueError(
      "attack_set.out='' is not valid; valid: the directory to write the "
      'set to (--config.attack_set.out=DIR).'
    )
  mesh = parallel.make_mesh() if mesh is None else mesh
  batch = int(c.global_batch_size)
  parallel.check_divisible(
    batch, mesh.devices.size, 'attack_set.global_batch_size'
  )
  parallel.check_divisible(
    batch, jax.process_count(), 'attack_set.global_batch_size'
  )
  if members is None:
    dirs = tuple(c.sources) or ((workdir,) if workdir else ())
    if not dirs:
      raise ValueError(
        'attack_set.sources=() is not valid without --workdir; valid: source '
        'model workdirs.'
      )
    members = []
    for d in dirs:
      model, variables, meta, step = checkpoints.load_model(config, d)
      info = {'workdir': os.path.abspath(d), 'checkpoint_step': int(step)}
      if meta.get('model'):
        info['model'] = dict(meta['model'])
      members.append((model, variables, info))
  variables_seq = [
    jax.tree.map(np.asarray, jax.device_get(v)) for _, v, _ in members
  ]
  classes = {
    _num_classes(m, v, dc.image_size)
    for (m, _, _), v in zip(members, variables_seq)
  }
  if len(classes) != 1:
    raise ValueError(
      f'the source models disagree on the number of classes: {sorted(classes)}.'
    )
  num_classes = classes.pop()
  attack = attack_of(c, num_classes)
  if source is None:
    source = data.get_source(dc, dc.eval_split)
  split_size = len(source)
  total = split_size if c.num_examples == -1 else int(c.num_examples)
  if total > split_size:
    raise ValueError(
      f'attack_set.num_examples={total} is not valid; valid: -1 or at most '
      f'the {split_size} examples of the eval split.'
    )
  out = c.out
  provenance = {
    'format': FORMAT,
    'name': c.name or os.path.basename(os.path.normpath(out)),
    'method': attack.name,
    'attack': {
      k: c[k]
      for k in (
        'epsilon',
        'num_steps',
        'momentum',
        'diversity_prob',
        'diversity_scale',
        'ti_kernel_size',
        'ti_sigma',
        'targeted',
        'loss',
        'seed',
      )
    },
    'epsilon_255': float(c.epsilon) * 255.0,
    'step_size': float(c.epsilon) / int(c.num_steps),
    'sources': [
      dict(info, variables=results_lib.fingerprint(v))
      for (_, _, info), v in zip(members, variables_seq)
    ],
    'data': {
      k: dc.get(k)
      for k in ('name', 'eval_split', 'image_size', 'resize_method')
    },
    'num_examples': total,
    'num_classes': num_classes,
    'global_batch_size': batch,
    'rounding': ROUNDING,
    'devices': int(mesh.devices.size),
  }
  provenance = json.loads(json.dumps(provenance))  # Tuples become lists.
  is_main = jax.process_index() == 0
  if is_main:
    _start_directory(out, provenance)

  fn = compiled(attack, tuple(m for m, _, _ in members), mesh)
  rep = functools.partial(parallel.replicate, mesh=mesh)
  variables_rep = rep(variables_seq)
  target_key, key = jax.random.split(jax.random.key(int(c.seed)))
  key_data = rep(np.asarray(jax.random.key_data(key)))
  eps = rep(np.float32(c.epsilon))
  steps = rep(np.int32(c.num_steps))
  sharding = NamedSharding(mesh, P(parallel.AXIS))
  transform = preprocess.eval_fn(dc)

  labels = np.asarray([int(source[i]['label']) for i in range(total)], np.int32)
  ids = np.arange(total)
  targets = np.full(total, -1, np.int32)
  if attack.targeted:
    targets = np.asarray(
      jax.jit(attacks.random_targets, static_argnums=2)(
        target_key, labels, num_classes, ids
      ),
      np.int32,
    )
  attack_labels = targets if attack.targeted else labels

  num_batches = math.ceil(total / batch)
  stats = {'written': 0, 'skipped': 0, 'batch_seconds': [], 'batch_sizes': []}
  local = batch // jax.process_count()
  lo_local = jax.process_index() * local
  for b in range(num_batches):
    index = np.arange(b * batch, (b + 1) * batch)
    real = index[index < total]
    names = [file_name(i) for i in real]
    missing = [not os.path.exists(os.path.join(out, n)) for n in names]
    if is_main and not any(missing):
      stats['skipped'] += len(real)
    todo = (
      any(missing)
      if jax.process_count() == 1
      else bool(
        np.asarray(multihost_utils.broadcast_one_to_all(np.bool_(any(missing))))
      )
    )
    if not todo:
      continue
    t0 = time.perf_counter()
    images = [transform(source[i]['image']) for i in real]
    pad = batch - len(real)
    images = np.stack(images + [np.zeros_like(images[0])] * pad)
    lab = np.concatenate([attack_labels[real], np.zeros(pad, np.int32)])

    def place(x):
      return jax.make_array_from_process_local_data(
        sharding, np.asarray(x)[lo_local : lo_local + local]
      )

    adv = fn(
      variables_rep,
      key_data,
      place(images),
      place(lab),
      place(index),
      eps,
      steps,
    )
    adv = _gather(adv)
    clean = preprocess.to_unit_float(images)
    q = quantize(adv[: len(real)], clean[: len(real)], float(c.epsilon))
    if is_main:
      for n, m, image in zip(names, missing, q):
        if m:
          write_png(os.path.join(out, n), image)
          stats['written'] += 1
        else:
          stats['skipped'] += 1
    stats['batch_seconds'].append(time.perf_counter() - t0)
    stats['batch_sizes'].append(len(real))
    if is_main:
      done = min((b + 1) * batch, total)
      recent = stats['batch_seconds'][1:] or stats['batch_seconds']
      logging.info(
        'attack %s: %d/%d images (%.1f%%), batch %d/%d, %.2f img/s, ETA %s',
        attack.name,
        done,
        total,
        100.0 * done / total,
        b + 1,
        num_batches,
        len(real) / max(stats['batch_seconds'][-1], 1e-9),
        writers.format_duration(float(np.mean(recent)) * (num_batches - b - 1)),
      )
  if is_main:
    rows = [
      [file_name(i), int(labels[i]), int(targets[i])] for i in range(total)
    ]
    _write_csv(os.path.join(out, LABELS_FILE), rows)
  secs, sizes = stats['batch_seconds'][1:], stats['batch_sizes'][1:]
  stats['seconds_per_image'] = (
    float(sum(secs) / sum(sizes)) if sizes else float('nan')
  )
  stats.update(directory=out, num_examples=total, method=attack.name)
  logging.info(
    'attack set %s: %d images written, %d already there.',
    out,
    stats['written'],
    stats['skipped'],
  )
  return stats


def _gather(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _write_csv(path: str, rows: Sequence[Sequence[Any]]) -> None:
  lines = [','.join(CSV_FIELDS)] + [','.join(str(v) for v in r) for r in rows]
  _write_text(path, '\n'.join(lines) + '\n')


def _start_directory(out: str, provenance: Mapping[str, Any]) -> None:
  """Creates the set's directory, or checks that it holds this very set."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, PROVENANCE_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    differs = [
      f'{k}: {old.get(k)!r} there, {provenance.get(k)!r} now'
      for k in sorted(set(old) | set(provenance))
      if k not in _RUN_FIELDS and old.get(k) != provenance.get(k)
    ]
    if differs:
      raise ValueError(
        f'attack_set.out={out!r} holds a set made with other settings ('
        + '; '.join(differs)
        + '); valid: a new directory, or the same settings to resume.'
      )
    n = len([f for f in os.listdir(out) if f.endswith('.png')])
    logging.info('Resuming the attack set in %s: %d images there.', out, n)
  elif any(f.endswith('.png') for f in os.listdir(out)):
    raise ValueError(
      f'attack_set.out={out!r} holds PNG files but no {PROVENANCE_FILE}; '
      'valid: an empty or new directory.'
    )
  _write_text(path, json.dumps(provenance, indent=2) + '\n')
  for f in os.listdir(out):  # Leftovers of a killed run.
    if '.tmp' in f:
      os.remove(os.path.join(out, f))


# ---------------------------------------------------------------------------
# Reading and scoring sets.


@dataclasses.dataclass
class AdversarialSet:
  """A set on disk, checked against an eval split.

  Attributes:
    name: the set's name (table column).
    directory: where it is.
    files: [n] PNG paths, in example order.
    labels: [n] true labels.
    targets: [n] targets, -1 for untargeted.
    provenance: provenance.json, or {} for other tools' sets.
  """

  name: str
  directory: str
  files: list[str]
  labels: np.ndarray
  targets: np.ndarray
  provenance: dict[str, Any]

  @property
  def targeted(self) -> bool:
    return bool(np.any(self.targets >= 0))

  def images(self, start: int, stop: int) -> np.ndarray:
    """uint8 [stop - start, S, S, 3] images."""
    out = []
    for path in self.files[start:stop]:
      with Image.open(path) as im:
        out.append(np.asarray(im.convert('RGB')))
    return np.stack(out)


def _read_csv(directory: str) -> list[dict[str, str]]:
  path = os.path.join(directory, LABELS_FILE)
  if not os.path.exists(path):
    raise ValueError(
      f'adversarial set {directory!r} has no {LABELS_FILE} (an incomplete '
      f'--mode=attack run, or not a set); valid: a directory of PNGs with '
      f'{LABELS_FILE} ({",".join(CSV_FIELDS)}).'
    )
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    missing = {'filename', 'true_label'} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(
        f'{path} lacks column(s) {sorted(missing)}; valid columns: '
        f'{list(CSV_FIELDS)} (target_label optional).'
      )
    return list(reader)


def read_set(
  directory: str,
  split_labels: np.ndarray,
  image_size: int,
  data_fields: Mapping[str, Any] | None = None,
) -> AdversarialSet:
  """Reads a set and checks it against the eval split it claims to be of.

  Args:
    directory: the set.
    split_labels: [n] the labels of the evaluated examples ``0..n-1``.
    image_size: the models' input size.
    data_fields: `config.data` fields (name, eval_split, image_size) that a
      provenance.json must agree with.

  Returns:
    An `AdversarialSet`.

  Raises:
    ValueError: every way the set differs from the split: count, example
      ids (file names), labels, image sizes, missing files, or the data of
      its provenance.
  """
  rows = _read_csv(directory)
  prov = {}
  prov_path = os.path.join(directory, PROVENANCE_FILE)
  if os.path.exists(prov_path):
    with open(prov_path) as f:
      prov = json.load(f)
  n = len(split_labels)
  problems = []
  if prov and data_fields:
    for k, v in data_fields.items():
      if k in prov.get('data', {}) and prov['data'][k] != v:
        problems.append(f'data.{k} is {prov["data"][k]!r}, the eval {v!r}')
  if len(rows) != n:
    problems.append(f'{len(rows)} images, the eval split {n} examples')
  ids, bad_names = [], []
  for row in rows:
    stem = os.path.splitext(row['filename'])[0]
    try:
      ids.append(int(stem))
    except ValueError:
      ids.append(-1)
      bad_names.append(row['filename'])
  if bad_names:
    problems.append(
      f'{len(bad_names)} file names are not example indices, e.g. '
      f'{bad_names[:3]} (valid: 000042.png for example 42)'
    )
  id_set = set(ids)
  lacking = sorted(set(range(n)) - id_set)
  extra = sorted(i for i in id_set - set(range(n)) if i >= 0)
  if lacking or extra or len(id_set) != len(ids):
    problems.append(
      f'example ids differ: missing {lacking[:5]} ({len(lacking)}), '
      f'not in the split {extra[:5]} ({len(extra)}), '
      f'{len(ids) - len(id_set)} repeated'
    )
  order = sorted(range(len(rows)), key=lambda k: ids[k])
  rows = [rows[k] for k in order]
  ids = [ids[k] for k in order]
  labels = np.asarray([int(r['true_label']) for r in rows], np.int64)
  targets = np.asarray(
    [int(r.get('target_label') or -1) for r in rows], np.int64
  )
  if not problems:
    wrong = np.flatnonzero(labels != np.asarray(split_labels))
    if len(wrong):
      k = int(wrong[0])
      problems.append(
        f'{len(wrong)} true labels differ from the split, e.g. '
        f'{rows[k]["filename"]}: {labels[k]} vs {int(split_labels[k])}'
      )
  files = [os.path.join(directory, r['filename']) for r in rows]
  absent = [f for f in files if not os.path.exists(f)]
  if absent:
    problems.append(f'{len(absent)} files missing, e.g. {absent[:2]}')
  else:
    sizes = {}
    for f in files:
      with Image.open(f) as im:
        sizes.setdefault((im.size, im.mode), f)
    wrong = {k: f for k, f in sizes.items() if k[0] != (image_size, image_size)}
    if wrong:
      (size, _), f = next(iter(wrong.items()))
      problems.append(
        f'images of size {size[0]}x{size[1]} (e.g. {f}), the models take '
        f'{image_size}x{image_size}'
      )
  if problems:
    raise ValueError(
      f'adversarial set {directory!r} does not match the eval split: '
      + '; '.join(problems)
      + '.'
    )
  name = prov.get('name') or os.path.basename(os.path.normpath(directory))
  return AdversarialSet(name, directory, files, labels, targets, prov)


def read_sets(
  directories: Sequence[str],
  split_labels: np.ndarray,
  image_size: int,
  data_fields: Mapping[str, Any] | None = None,
) -> list[AdversarialSet]:
  """`read_set` of each directory, names made unique (``name_2``, ...)."""
  sets, seen = [], set()
  for d in directories:
    s = read_set(d, split_labels, image_size, data_fields)
    base, k = s.name, 2
    while s.name in seen:
      s.name, k = f'{base}_{k}', k + 1
    seen.add(s.name)
    sets.append(s)
  return sets


def score(
  sets: Sequence[AdversarialSet],
  predict: Callable[[np.ndarray], np.ndarray],
  batch_size: int,
) -> dict[str, dict[str, np.ndarray]]:
  """Predictions of a defender on each set.

  Args:
    sets: from `read_sets`.
    predict: uint8 [batch_size, S, S, 3] -> [batch_size] predicted classes
      (called on every process with the same global batch).
    batch_size: the global batch (the last one is padded with zeros).

  Returns:
    {name: {'pred', 'correct', 'success' and, targeted, 'target'}}: [n]
    arrays; success is ``pred == target`` (targeted) or a misclassification.
  """
  out = {}
  for s in sets:
    n = len(s.files)
    preds = []
    for start in range(0, n, batch_size):
      x = s.images(start, min(start + batch_size, n))
      if len(x) < batch_size:
        pad = np.zeros((batch_size - len(x),) + x.shape[1:], x.dtype)
        x = np.concatenate([x, pad])
      preds.append(np.asarray(predict(x))[: min(batch_size, n - start)])
    pred = np.concatenate(preds)
    correct = pred == s.labels
    cols = {'pred': pred, 'correct': correct}
    if s.targeted:
      cols['target'] = s.targets
      cols['success'] = pred == s.targets
    else:
      cols['success'] = ~correct
    out[s.name] = cols
    logging.info('adversarial set %s: accuracy %.4f', s.name, correct.mean())
  return out


def table_columns(
  sets: Sequence[AdversarialSet], scored: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
  """The sets as `results['attacks']` entries (table columns ``set.NAME``)."""
  cols = {}
  for s in sets:
    c = scored[s.name]
    prov = s.provenance
    cols[f'set.{s.name}'] = {
      'kind': 'transfer',
      'label': s.name,
      'method': prov.get('method'),
      'directory': os.path.abspath(s.directory),
      'sources': [x.get('workdir') for x in prov.get('sources', [])],
      'epsilon': prov.get('attack', {}).get('epsilon'),
      'targeted': s.targeted,
      'accuracy': float(np.mean(c['correct'])),
      'correct': int(np.sum(c['correct'])),
      'success_rate': float(np.mean(c['success'])),
      'success': int(np.sum(c['success'])),
    }
  return cols


def read_for_eval(ec, dc, source, total):
  """`eval.adversarial_sets`, checked against the first `total` examples."""
  if not ec.adversarial_sets:
    return []
  labels = data.labels(source, total)
  fields = {k: dc.get(k) for k in ('name', 'eval_split', 'image_size')}
  return read_sets(tuple(ec.adversarial_sets), labels, dc.image_size, fields)


def add_to_results(results, cols, sets, scored) -> None:
  """The sets' rows and columns; all-or-nothing with clean and every set."""
  names = [f'set.{s.name}' for s in sets]
  for s, name in zip(sets, names):
    for k, v in scored[s.name].items():
      cols[f'{name}.{k}'] = v
  results['attacks'].update(table_columns(sets, scored))
  clean = cols['clean_correct'].astype(bool)
  blackbox = clean.copy()
  for name in names:
    blackbox &= cols[f'{name}.correct']
  robust = blackbox.copy()
  previous = (results.get('all_or_nothing') or {}).get('attacks', [])
  for name in previous:
    if name == 'autoattack':
      robust &= cols['autoattack.broken_by'] == -1
    elif name != 'clean':
      robust &= cols[f'{name}.correct'].astype(bool)
  results['all_or_nothing'] = {
    'attacks': ['clean'] + [n for n in previous if n != 'clean'] + names,
    'accuracy': float(np.mean(robust)),
    'correct': int(np.sum(robust)),
  }
  results['adversarial_sets'] = {
    'sets': names,
    'all_or_nothing': {
      'accuracy': float(np.mean(blackbox)),
      'correct': int(np.sum(blackbox)),
    },
  }
