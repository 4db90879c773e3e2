"""Deterministic, resumable, per-process sharded input pipeline.

Batches are pure functions of ``(seed, step, process_index, process_count)``:
a run resumed at step k sees exactly the data (order and augmentation) that an
uninterrupted run would have seen at step k. How:

* A *source* is random access: ``len(source)`` and ``source[i] -> {'image':
  HWC array, 'label': int}``. ``ArraySource`` holds arrays in memory;
  tensorflow-datasets ``data_source`` objects (ArrayRecord files, no
  TensorFlow needed to read them) are used as they are.
* The training stream is an endless sequence of epochs, each a different
  permutation of the source derived from ``(seed, epoch)`` (grain's
  ``MapDataset.shuffle`` then ``repeat``). Global batch k is stream positions
  ``[k*B, (k+1)*B)``; process p of P takes the contiguous slice
  ``[k*B + p*B/P, k*B + (p+1)*B/P)``. The augmentation of the example at
  stream position g draws from ``np.random.default_rng((seed, g))``, so it
  does not depend on the process count, the thread count or where a run was
  resumed.
* The evaluation stream visits the examples of the eval split in order, pads
  the last global batch and marks the padding with ``mask=False``, so every
  example is counted exactly once across processes.

The work is done by `grain <https://github.com/google/grain>`_ (PyPI
``grain``): each local batch is built on one thread of a pool of
``num_workers`` threads (decoding with PIL and the numpy image arithmetic
release the GIL), and up to ``max(prefetch, num_workers)`` batches are built
ahead of the consumer, starting as soon as the iterator is created.

Batches are dicts of numpy arrays:

* ``'image'``: ``[local_batch, H, W, 3]`` RGB. ``float32`` in [0, 1] for the
  small datasets (``digits``, ``cifar10``), ``uint8`` in [0, 255] for
  ``imagenet2012`` (a quarter of the host-to-device traffic); see
  ``image_dtype`` and the ``image_dtype`` config field.
* ``'label'``: ``int32 [local_batch]``.
* ``'index'``: ``int64 [local_batch]``, a global example id for folding
  per-example attack randomness: the stream position ``k*B + j`` in training,
  the example's index in the split in evaluation (padding continues past the
  end of the split, so ids stay unique).
* ``'mask'`` (evaluation only): ``bool [local_batch]``, False for padding.

Datasets (``data_config.name``):

* ``'digits'`` (default, embedded, no download): scikit-learn's
  ``load_digits``, 1,797 real 8x8 grayscale handwritten digits (values 0..16,
  scaled to [0, 1], replicated to 3 channels). A fixed seeded permutation
  splits them into 1,500 ``'train'`` and 297 ``'test'`` examples. Training
  augmentation is a random translation (zero-pad ``crop_padding`` then a
  random crop); no flip by default (a flipped digit is another symbol).
* ``'cifar10'``: tensorflow-datasets ``cifar10`` (50,000 train, 10,000
  test; tfds labels). Training: pad 4 + random crop + horizontal flip; eval:
  the image as it is.
* ``'imagenet2012'``: tensorflow-datasets ``imagenet2012`` (1,281,167 train,
  50,000 validation). Labels are tfds's: indices into the sorted list of
  WordNet synset ids (tfds ``datasets/imagenet2012/labels.txt``, which starts
  with n01440764 = tench = 0), the order of the released models. Training is
  the paper's augmentation: random-resized crop (area 8%-100%, aspect ratio
  3/4-4/3 sampled log-uniformly, 10 attempts then a centre crop), bicubic
  resize to ``image_size``, brightness/contrast/saturation jitter 0.4 in
  random order, PCA lighting with std 0.1, horizontal flip. Eval: resize the
  shorter side to ``image_size / eval_crop_fraction`` (256 for 224, bicubic)
  and take the central ``image_size`` square.

The tfds datasets must be prepared once in ArrayRecord format in
``data_dir`` (nothing is downloaded at run time). Preparing needs TensorFlow
(the ``[tf]`` extra) because tfds's builders encode with it::

  # CIFAR-10 (downloads about 160 MB):
  tfds build cifar10 --data_dir=DATA_DIR --file_format=array_record
  # ImageNet: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
  # MANUAL_DIR first (about 150 GB, written again as ArrayRecord):
  tfds build imagenet2012 --data_dir=DATA_DIR --manual_dir=MANUAL_DIR \\
      --file_format=array_record

Reading needs only ``tensorflow-datasets``, ``array_record`` and Pillow.

Config fields (``default_data_config(name)`` gives each dataset's defaults;
strings and numbers only):

* ``name``: ``'digits'``, ``'cifar10'`` or ``'imagenet2012'``.
* ``data_dir``: tfds data directory; ``''`` means tfds's default
  (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Unused by digits.
* ``train_split``, ``eval_split``: split names (tfds split syntax such as
  ``'train[:90%]'`` works for the tfds datasets; digits has ``'train'`` and
  ``'test'``).
* ``image_size``: output height = width (digits 8 = native, cifar10 32,
  imagenet2012 224). Digits and CIFAR-10 images of another size are resized
  with ``resize_method`` before augmentation.
* ``image_dtype``: ``'float32'`` (values in [0, 1]) or ``'uint8'``
  (values in [0, 255]).
* ``augment``: apply the training augmentation (otherwise training images get
  the eval preprocessing).
* ``crop_padding``: digits/cifar10 random translation, pixels (0 = none).
* ``flip``: random horizontal flip with probability 0.5 (all datasets).
* ``resize_method``: ``'nearest'``, ``'bilinear'`` or ``'bicubic'``; used to
  resize digits/cifar10 to ``image_size`` (imagenet2012 always uses
  bicubic, as the paper).
* ``min_crop_area``: imagenet2012 random-resized-crop smallest area fraction.
* ``color_jitter``: imagenet2012 brightness/contrast/saturation strength.
* ``lighting_std``: imagenet2012 PCA lighting noise standard deviation.
* ``eval_crop_fraction``: imagenet2012 eval centre-crop fraction (224/256).
* ``num_workers``: threads building batches (0 = build in the caller).
* ``prefetch``: batches built ahead of the consumer (0 = none).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
import functools
import math
from typing import Any
from typing import NamedTuple
from typing import Protocol

from absl import logging
import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

Batch = dict[str, np.ndarray]
Example = dict[str, Any]

DATASETS = ('digits', 'cifar10', 'imagenet2012')
IMAGE_DTYPES = ('float32', 'uint8')
RESIZE_METHODS = ('nearest', 'bilinear', 'bicubic')

_PIL_RESAMPLE = {
  'nearest': Image.Resampling.NEAREST,
  'bilinear': Image.Resampling.BILINEAR,
  'bicubic': Image.Resampling.BICUBIC,
}

_NUM_CLASSES = {'digits': 10, 'cifar10': 10, 'imagenet2012': 1000}

# Split sizes used when a tfds dataset is not prepared locally (dataset_info
# must work before the data exists, e.g. to size a learning-rate schedule).
_KNOWN_SPLIT_SIZES = {
  'digits': {'train': 1500, 'test': 297},
  'cifar10': {'train': 50_000, 'test': 10_000},
  'imagenet2012': {'train': 1_281_167, 'validation': 50_000},
}

_DIGITS_NUM_TRAIN = 1500
_DIGITS_SPLIT_SEED = 0
_DIGITS_MAX_VALUE = 16.0

# Random-resized-crop aspect-ratio range and attempts (the paper's recipe).
_CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10

# Principal components of ImageNet RGB pixel colours (in [0, 1] units), as
# published with AlexNet and used by the fb.resnet.torch lineage of recipes.
# Columns of _PCA_EIGVEC are the eigenvectors; rows are R, G, B.
_PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
_PCA_EIGVEC = np.array(
  [
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
  ]
)
# ITU-R 601 luma weights for R, G, B (grayscale for contrast and saturation).
_LUMA = np.array([0.299, 0.587, 0.114])


class Source(Protocol):
  """A random-access data source: ``len(s)`` and ``s[i] -> example dict``."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Example: ...


class DatasetInfo(NamedTuple):
  """Static facts about a dataset as the pipeline delivers it."""

  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_eval: int


class ArraySource:
  """An in-memory random-access source of ``{'image', 'label'}`` examples.

  Args:
    images: ``[N, H, W, C]`` array, or a sequence of N ``[H, W, C]`` arrays
      (sizes may differ), uint8 in [0, 255] or float in [0, 1].
    labels: N integer labels.

  Raises:
    ValueError: if the lengths differ or there are no examples.

  Examples:
    >>> src = ArraySource(np.zeros((3, 4, 4, 3), np.uint8), [0, 1, 2])
    >>> len(src), src[1]['image'].shape, src[1]['label']
    (3, (4, 4, 3), 1)
  """

  def __init__(self, images: Sequence[np.ndarray], labels: Sequence[int]):
    labels = np.asarray(labels)
    if len(images) != len(labels):
      raise ValueError(
        f'ArraySource: {len(images)} images but {len(labels)} labels; they '
        'must have the same length.'
      )
    if not len(labels):
      raise ValueError('ArraySource: no examples; need at least one.')
    if labels.dtype.kind not in 'iu':
      raise ValueError(
        f'ArraySource: labels must be integers, got dtype {labels.dtype}.'
      )
    self._images = images
    self._labels = labels

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} examples')
    return {'image': self._images[index], 'label': int(self._labels[index])}


def default_data_config(name: str = 'digits') -> ml_collections.ConfigDict:
  """Returns the default data config of a dataset (fields: module docstring).

  Args:
    name: one of ``DATASETS``.

  Returns:
    A ``ConfigDict`` to start experiment configs from.

  Raises:
    ValueError: for an unknown name.

  Examples:
    >>> cfg = default_data_config('imagenet2012')
    >>> cfg.image_size, cfg.image_dtype, cfg.eval_split
    (224, 'uint8', 'validation')
  """
  _check_choice('data_config.name', name, DATASETS)
  c = ml_collections.ConfigDict()
  c.name = name
  c.data_dir = ''
  c.train_split = 'train'
  c.eval_split = 'validation' if name == 'imagenet2012' else 'test'
  c.image_size = {'digits': 8, 'cifar10': 32, 'imagenet2012': 224}[name]
  c.image_dtype = 'uint8' if name == 'imagenet2012' else 'float32'
  c.augment = True
  c.crop_padding = {'digits': 1, 'cifar10': 4, 'imagenet2012': 0}[name]
  c.flip = name != 'digits'
  c.resize_method = 'bilinear' if name == 'digits' else 'bicubic'
  c.min_crop_area = 0.08
  c.color_jitter = 0.4
  c.lighting_std = 0.1
  c.eval_crop_fraction = 224 / 256
  c.num_workers = 16 if name == 'imagenet2012' else 2
  c.prefetch = 4 if name == 'imagenet2012' else 2
  return c


def image_dtype(data_config: ml_collections.ConfigDict) -> np.dtype:
  """Returns the numpy dtype of the images the pipeline delivers.

  ``float32`` images are in [0, 1]; ``uint8`` images are in [0, 255].

  Args:
    data_config: the data config.

  Returns:
    ``np.dtype('float32')`` or ``np.dtype('uint8')``.

  Raises:
    ValueError: if ``data_config.image_dtype`` is not one of ``IMAGE_DTYPES``.

  Examples:
    >>> image_dtype(default_data_config('digits'))
    dtype('float32')
  """
  _check_choice(
    'data_config.image_dtype', data_config.image_dtype, IMAGE_DTYPES
  )
  return np.dtype(data_config.image_dtype)


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  """Returns class count, image shape and split sizes without reading data.

  For tfds datasets the split sizes come from the prepared dataset's metadata
  in ``data_dir`` when present (so sliced splits such as ``'train[:10%]'``
  work), otherwise from the published sizes of the standard splits.

  Args:
    data_config: the data config.

  Returns:
    A ``DatasetInfo``.

  Raises:
    ValueError: for invalid config values, or a non-standard split of a tfds
      dataset that is not prepared in ``data_dir``.

  Examples:
    >>> dataset_info(default_data_config('digits'))
    DatasetInfo(num_classes=10, image_shape=(8, 8, 3), num_train=1500,
                num_eval=297)
  """
  _validate(data_config)
  name = data_config.name
  size = data_config.image_size
  splits = (data_config.train_split, data_config.eval_split)
  if name == 'digits':
    sizes = [_KNOWN_SPLIT_SIZES['digits'][s] for s in splits]
  else:
    builder = _tfds_builder(data_config)
    sizes = []
    for split in splits:
      if builder.is_prepared():
        sizes.append(builder.info.splits[split].num_examples)
      elif split in _KNOWN_SPLIT_SIZES[name]:
        sizes.append(_KNOWN_SPLIT_SIZES[name][split])
      else:
        raise ValueError(
          f'dataset_info: {name} is not prepared in data_dir='
          f'{data_config.data_dir!r}, so the size of split {split!r} is '
          f'unknown; known without data: {sorted(_KNOWN_SPLIT_SIZES[name])}.'
        )
  return DatasetInfo(
    num_classes=_NUM_CLASSES[name],
    image_shape=(size, size, 3),
    num_train=sizes[0],
    num_eval=sizes[1],
  )


def get_source(data_config: ml_collections.ConfigDict, split: str) -> Source:
  """Builds the random-access source of one split of the configured dataset.

  Args:
    data_config: the data config (``name``, ``data_dir``, ``image_size``,
      ``resize_method`` are used).
    split: a split name, e.g. ``data_config.train_split``.

  Returns:
    A random-access source of ``{'image', 'label', ...}`` dicts.

  Raises:
    ValueError: for an unknown dataset name or split.
    FileNotFoundError: if a tfds dataset is not prepared in ``data_dir``.

  Examples:
    >>> len(get_source(default_data_config('digits'), 'test'))
    297
  """
  _validate(data_config)
  if data_config.name == 'digits':
    _check_choice('digits split', split, tuple(_KNOWN_SPLIT_SIZES['digits']))
    images, labels = _digits_split(
      split, data_config.image_size, data_config.resize_method
    )
    return ArraySource(images, labels)
  builder = _tfds_builder(data_config)
  if not builder.is_prepared():
    raise FileNotFoundError(
      f'{data_config.name} is not prepared in data_dir='
      f'{data_config.data_dir!r} (looked in {builder.data_dir}). Prepare it '
      f'once with: tfds build {data_config.name} --data_dir=DATA_DIR '
      '--file_format=array_record (see fdjax/input_pipeline.py).'
    )
  return builder.as_data_source(split=split)


def preprocess_train(
  data_config: ml_collections.ConfigDict,
  image: np.ndarray,
  rng: np.random.Generator,
) -> np.ndarray:
  """Applies the dataset's training augmentation to one HWC image.

  Args:
    data_config: the data config.
    image: ``[H, W, C]`` (C = 1 or 3; a 2-D array is grayscale) uint8 in
      [0, 255] or float in [0, 1].
    rng: the example's generator; the same generator state gives the same
      output.

  Returns:
    ``[image_size, image_size, 3]`` array of ``image_dtype(data_config)``.

  Examples:
    >>> cfg = default_data_config('cifar10')
    >>> img = np.full((32, 32, 3), 200, np.uint8)
    >>> out = preprocess_train(cfg, img, np.random.default_rng(0))
    >>> out.shape, out.dtype, float(out.max())
    ((32, 32, 3), dtype('float32'), 0.78...)
  """
  _validate(data_config)
  return _train_fn(data_config)(image, rng)


def preprocess_eval(
  data_config: ml_collections.ConfigDict, image: np.ndarray
) -> np.ndarray:
  """Applies the dataset's deterministic eval preprocessing to one image.

  Args:
    data_config: the data config.
    image: ``[H, W, C]`` (C = 1 or 3; a 2-D array is grayscale) uint8 in
      [0, 255] or float in [0, 1].

  Returns:
    ``[image_size, image_size, 3]`` array of ``image_dtype(data_config)``.

  Examples:
    >>> cfg = default_data_config('imagenet2012')
    >>> preprocess_eval(cfg, np.zeros((300, 500, 3), np.uint8)).shape
    (224, 224, 3)
  """
  _validate(data_config)
  return _eval_fn(data_config)(image)


def create_train_iter(
  data_config: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  seed: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  source: Source | None = None,
) -> Iterator[Batch]:
  """Returns the endless iterator of this process's training batches.

  The first batch is the one of step ``start_step``; the batch of step k is a
  pure function of ``(seed, k, process_index, process_count)`` and the
  config, so resuming at ``start_step=k`` continues an interrupted run
  exactly. The processes' local batches concatenate (in process order) to the
  global batch.

  Args:
    data_config: the data config.
    global_batch_size: examples per step over all processes (B).
    seed: non-negative integer; sets the epoch permutations and the
      augmentation randomness.
    start_step: first step to produce.
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).
    source: random-access source to use instead of
      ``get_source(data_config, data_config.train_split)``.

  Returns:
    An iterator of dicts ``image [B/P, S, S, 3]``, ``label int32 [B/P]``,
    ``index int64 [B/P]`` (global stream positions).

  Raises:
    ValueError: for invalid config values, a batch size not divisible by the
      process count, a bad process index, a negative seed or start step.

  Examples:
    >>> it = create_train_iter(
    ...     default_data_config('digits'), global_batch_size=4, seed=0,
    ...     start_step=2, process_index=1, process_count=2)
    >>> batch = next(it)
    >>> batch['image'].shape, batch['index'].tolist()
    ((2, 8, 8, 3), [10, 11])
  """
  _validate(data_config)
  process_index, process_count = _check_processes(
    global_batch_size, process_index, process_count
  )
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}.')
  if not isinstance(start_step, (int, np.integer)) or start_step < 0:
    raise ValueError(
      f'start_step must be a non-negative integer, got {start_step!r}.'
    )
  if source is None:
    source = get_source(data_config, data_config.train_split)
  seed = int(seed)
  local_batch = global_batch_size // process_count
  transform = (
    _train_fn(data_config) if data_config.augment else _eval_fn(data_config)
  )

  def make_example(position: int, example: Example) -> Example:
    rng = np.random.default_rng((seed, position))
    return {
      'image': transform(example['image'], rng),
      'label': np.int32(example['label']),
      'index': np.int64(position),
    }

  ds = grain.MapDataset.source(source)
  ds = ds.shuffle(seed=_shuffle_seed(seed)).repeat()
  ds = ds.map_with_index(make_example)
  # Chunk c of local_batch stream positions; global batch k is chunks
  # k*P .. k*P+P-1, and process p takes chunk k*P + p.
  ds = ds.batch(local_batch)[process_index::process_count]
  ds = ds[int(start_step) :]
  logging.info(
    'Train input: %s/%s, %d examples, global batch %d, local batch %d, '
    'process %d/%d, start step %d.',
    data_config.name,
    data_config.train_split,
    len(source),
    global_batch_size,
    local_batch,
    process_index,
    process_count,
    start_step,
  )
  return _start(ds, data_config)


def create_eval_iter(
  data_config: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
  source: Source | None = None,
  start_index: int = 0,
  num_examples: int | None = None,
) -> Iterator[Batch]:
  """Returns the iterator over this process's share of the eval split.

  The evaluated examples are ``[start_index, end)`` of the split with ``end =
  num_examples`` (or the split size), visited in order in global batches of
  ``global_batch_size``; the last global batch is padded and its padding has
  ``mask == False``. Over all processes each evaluated example appears exactly
  once with ``mask == True``. Resume an interrupted evaluation of the first
  ``num_examples`` by passing the same ``num_examples`` and the number already
  done as ``start_index``.

  Args:
    data_config: the data config.
    global_batch_size: examples per global batch over all processes (B).
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).
    source: random-access source to use instead of
      ``get_source(data_config, data_config.eval_split)``.
    start_index: first example to evaluate.
    num_examples: evaluate only the first ``num_examples`` examples of the
      split (``None``: all).

  Returns:
    A finite iterator of dicts ``image [B/P, S, S, 3]``, ``label int32``,
    ``index int64`` (example index in the split; padding continues past the
    end) and ``mask bool``, all ``[B/P]`` except the image.

  Raises:
    ValueError: for invalid config values, a batch size not divisible by the
      process count, a bad process index, or ``start_index``/``num_examples``
      outside the split.

  Examples:
    >>> batches = list(create_eval_iter(
    ...     default_data_config('digits'), global_batch_size=128,
    ...     process_index=0, process_count=1, start_index=200))
    >>> len(batches), int(sum(b['mask'].sum() for b in batches))
    (1, 97)
  """
  _validate(data_config)
  process_index, process_count = _check_processes(
    global_batch_size, process_index, process_count
  )
  if source is None:
    source = get_source(data_config, data_config.eval_split)
  size = len(source)
  end = size if num_examples is None else num_examples
  if not isinstance(end, (int, np.integer)) or not 0 < end <= size:
    raise ValueError(
      f'num_examples must be None or an integer in [1, {size}] (the split '
      f'size), got {num_examples!r}.'
    )
  if not isinstance(start_index, (int, np.integer)) or not (
    0 <= start_index <= end
  ):
    raise ValueError(
      f'start_index must be an integer in [0, {end}], got {start_index!r}.'
    )
  start, end = int(start_index), int(end)
  num_batches = math.ceil((end - start) / global_batch_size)
  transform = _eval_fn(data_config)
  size_hw = data_config.image_size
  padding_image = np.zeros((size_hw, size_hw, 3), image_dtype(data_config))

  def make_example(index: int) -> Example:
    if index < end:
      example = source[index]
      return {
        'image': transform(example['image']),
        'label': np.int32(example['label']),
        'index': np.int64(index),
        'mask': np.bool_(True),
      }
    return {
      'image': padding_image,
      'label': np.int32(0),
      'index': np.int64(index),
      'mask': np.bool_(False),
    }

  local_batch = global_batch_size // process_count
  ds = grain.MapDataset.range(start, start + num_batches * global_batch_size)
  ds = ds.map(make_example).batch(local_batch)
  ds = ds[process_index::process_count]
  logging.info(
    'Eval input: %s/%s, examples [%d, %d) of %d, %d global batches of %d, '
    'process %d/%d.',
    data_config.name,
    data_config.eval_split,
    start,
    end,
    size,
    num_batches,
    global_batch_size,
    process_index,
    process_count,
  )
  return _start(ds, data_config)


# ---------------------------------------------------------------------------
# Validation and plumbing.


def _check_choice(what: str, value: Any, valid: Sequence[Any]) -> None:
  if value not in valid:
    raise ValueError(f'{what}={value!r} is not valid; valid: {list(valid)}.')


def _validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the bad field and what is valid."""
  _check_choice('data_config.name', c.name, DATASETS)
  _check_choice('data_config.image_dtype', c.image_dtype, IMAGE_DTYPES)
  _check_choice('data_config.resize_method', c.resize_method, RESIZE_METHODS)
  if c.name == 'digits':
    for field in ('train_split', 'eval_split'):
      _check_choice(
        f'data_config.{field} (digits)',
        c[field],
        tuple(_KNOWN_SPLIT_SIZES['digits']),
      )
  counts = (
    ('image_size', c.image_size, 1, 'a positive integer'),
    ('crop_padding', c.crop_padding, 0, 'a non-negative integer'),
    ('num_workers', c.num_workers, 0, 'a non-negative integer'),
    ('prefetch', c.prefetch, 0, 'a non-negative integer'),
  )
  for field, value, low, valid in counts:
    is_int = isinstance(value, (int, np.integer)) and not isinstance(
      value, bool
    )
    if not is_int or value < low:
      raise ValueError(f'data_config.{field}={value!r} must be {valid}.')
  ranges = (
    ('min_crop_area', c.min_crop_area, 0.0, 1.0, '(0, 1]'),
    ('eval_crop_fraction', c.eval_crop_fraction, 0.0, 1.0, '(0, 1]'),
  )
  for field, value, low, high, valid in ranges:
    if not low < value <= high:
      raise ValueError(f'data_config.{field}={value!r} must be in {valid}.')
  for field in ('color_jitter', 'lighting_std'):
    if not c[field] >= 0:
      raise ValueError(
        f'data_config.{field}={c[field]!r} must be a number >= 0.'
      )
  if c.name == 'imagenet2012' and not c.color_jitter < 1:
    raise ValueError(
      f'data_config.color_jitter={c.color_jitter!r} must be in [0, 1) (the '
      'jitter factors are 1 +- U(0, color_jitter)).'
    )


def _check_processes(
  global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if process_count < 1:
    raise ValueError(f'process_count must be >= 1, got {process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(
      f'process_index must be in [0, {process_count}), got {process_index}.'
    )
  if (
    not isinstance(global_batch_size, (int, np.integer))
    or global_batch_size < 1
    or global_batch_size % process_count
  ):
    raise ValueError(
      f'global_batch_size={global_batch_size!r} must be a positive multiple '
      f'of the process count {process_count}.'
    )
  return int(process_index), int(process_count)


def _shuffle_seed(seed: int) -> int:
  # grain wants a 32-bit seed and uses seed + epoch for epoch `epoch`; hashing
  # keeps seed s+1 from replaying the epochs of seed s shifted by one.
  return int(np.random.SeedSequence((seed, 0x5EED)).generate_state(1)[0])


def _start(ds: grain.MapDataset, c: ml_collections.ConfigDict) -> Iterator:
  """Starts building batches on the thread pool right away."""
  buffer = max(c.prefetch, c.num_workers) if c.num_workers else 0
  options = grain.ReadOptions(
    num_threads=c.num_workers, prefetch_buffer_size=buffer
  )
  it = iter(ds.to_iter_dataset(options))
  if hasattr(it, 'start_prefetch'):
    it.start_prefetch()
  return it


@functools.cache
def _tfds_builder_cached(name: str, data_dir: str):
  import tensorflow_datasets as tfds  # Heavy: only for the tfds datasets.

  return tfds.builder(name, data_dir=data_dir or None)


def _tfds_builder(c: ml_collections.ConfigDict):
  return _tfds_builder_cached(c.name, c.data_dir)


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # Reads a bundled 180 kB file.

  digits = load_digits()
  images = (digits.images / _DIGITS_MAX_VALUE).astype(np.float32)
  labels = digits.target.astype(np.int64)
  order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(labels))
  return images[order], labels[order]


@functools.cache
def _digits_split(
  split: str, image_size: int, resize_method: str
) -> tuple[np.ndarray, np.ndarray]:
  """Returns digits images [N, S, S, 3] float32 in [0, 1] and labels."""
  images, labels = _digits_arrays()
  if split == 'train':
    images, labels = images[:_DIGITS_NUM_TRAIN], labels[:_DIGITS_NUM_TRAIN]
  else:
    images, labels = images[_DIGITS_NUM_TRAIN:], labels[_DIGITS_NUM_TRAIN:]
  out = np.stack(
    [_resize_float(im[:, :, None], image_size, resize_method) for im in images]
  )
  out = np.repeat(out, 3, axis=-1)
  out.setflags(write=False)
  return out, labels


# ---------------------------------------------------------------------------
# Image operations (numpy + PIL).


def _as_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(
      f'expected an [H, W] or [H, W, C] image with C in (1, 3, 4), got '
      f'shape {image.shape}.'
    )
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image[:, :, :3]


def _to_float01(image: np.ndarray) -> np.ndarray:
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  return image.astype(np.float32, copy=False)


def _to_uint8(image255: np.ndarray) -> np.ndarray:
  # Round half up; cheaper than np.round on the hot ImageNet path.
  out = np.add(image255, 0.5, dtype=np.float32)
  return np.clip(out, 0, 255, out=out).astype(np.uint8)


def _from_float01(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
  if dtype == np.uint8:
    return _to_uint8(image * 255.0)
  return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)


def _from_uint8(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
  if dtype == np.uint8:
    return image
  return image.astype(np.float32) / 255.0


def _resize_float(image: np.ndarray, size: int, method: str) -> np.ndarray:
  """Resizes an [H, W, C] float image to [size, size, C], per channel."""
  if image.shape[:2] == (size, size):
    return image.astype(np.float32, copy=False)
  channels = [
    np.asarray(
      Image.fromarray(image[:, :, k].astype(np.float32)).resize(
        (size, size), _PIL_RESAMPLE[method]
      )
    )
    for k in range(image.shape[-1])
  ]
  return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def _pad_crop_flip(
  image: np.ndarray, rng: np.random.Generator, padding: int, flip: bool
) -> np.ndarray:
  """Random translation by zero-padding and cropping, then random flip."""
  h, w = image.shape[:2]
  if padding:
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    dy, dx = rng.integers(0, 2 * padding + 1, size=2)
    image = padded[dy : dy + h, dx : dx + w]
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return image


def _random_resized_crop_box(
  height: int, width: int, rng: np.random.Generator, min_area: float
) -> tuple[int, int, int, int]:
  """Samples a crop box (left, top, right, bottom) of the paper's recipe."""
  area = height * width
  log_lo, log_hi = np.log(_CROP_ASPECT_RANGE)
  for _ in range(_CROP_ATTEMPTS):
    target_area = area * rng.uniform(min_area, 1.0)
    aspect = np.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  # Fallback: the largest centred box whose aspect ratio is in range.
  aspect = width / height
  if aspect < _CROP_ASPECT_RANGE[0]:
    w, h = width, min(height, int(round(width / _CROP_ASPECT_RANGE[0])))
  elif aspect > _CROP_ASPECT_RANGE[1]:
    w, h = min(width, int(round(height * _CROP_ASPECT_RANGE[1]))), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def _color_jitter(
  image: np.ndarray, rng: np.random.Generator, strength: float
) -> np.ndarray:
  """Brightness, contrast and saturation jitter in random order (0..255)."""
  if not strength:
    return image
  for op in rng.permutation(3):
    alpha = np.float32(1.0 + rng.uniform(-strength, strength))
    if op == 0:  # Brightness: scale towards black.
      image = image * alpha
    elif op == 1:  # Contrast: blend with the mean grey level.
      grey_mean = np.float32((image @ _LUMA.astype(np.float32)).mean())
      image = image * alpha + grey_mean * (1 - alpha)
    else:  # Saturation: blend with each pixel's grey level.
      grey = (image @ _LUMA.astype(np.float32))[:, :, None]
      image = image * alpha + grey * (1 - alpha)
  return image


def _pca_lighting(
  image: np.ndarray, rng: np.random.Generator, std: float
) -> np.ndarray:
  """AlexNet-style PCA colour noise (image in 0..255, RGB)."""
  if not std:
    return image
  alpha = rng.normal(0.0, std, size=3)
  offset = _PCA_EIGVEC @ (alpha * _PCA_EIGVAL) * 255.0
  return image + offset.astype(np.float32)


def _imagenet_train(
  image: np.ndarray,
  rng: np.random.Generator,
  *,
  size: int,
  min_area: float,
  jitter: float,
  lighting: float,
  flip: bool,
  dtype: np.dtype,
) -> np.ndarray:
  image = _as_rgb(image)
  if image.dtype != np.uint8:
    image = _to_uint8(_to_float01(image) * 255.0)
  box = _random_resized_crop_box(*image.shape[:2], rng, min_area)
  pil = Image.fromarray(image).resize(
    (size, size), Image.Resampling.BICUBIC, box=box
  )
  out = np.asarray(pil, dtype=np.float32)
  out = _color_jitter(out, rng, jitter)
  out = _pca_lighting(out, rng, lighting)
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  if dtype == np.uint8:
    return _to_uint8(out)
  return np.clip(out, 0.0, 255.0) / np.float32(255.0)


def _imagenet_eval(
  image: np.ndarray, *, size: int, crop_fraction: float, dtype: np.dtype
) -> np.ndarray:
  """Resizes the shorter side to size / crop_fraction, then centre-crops."""
  image = _as_rgb(image)
  if image.dtype != np.uint8:
    image = _to_uint8(_to_float01(image) * 255.0)
  h, w = image.shape[:2]
  short = int(round(size / crop_fraction))
  scale = short / min(h, w)
  new_w = max(size, int(round(w * scale)))
  new_h = max(size, int(round(h * scale)))
  pil = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  out = np.asarray(pil)[top : top + size, left : left + size]
  return _from_uint8(np.ascontiguousarray(out), dtype)


def _small_train(
  image: np.ndarray,
  rng: np.random.Generator,
  *,
  size: int,
  method: str,
  padding: int,
  flip: bool,
  dtype: np.dtype,
) -> np.ndarray:
  image = _resize_float(_to_float01(_as_rgb(image)), size, method)
  image = _pad_crop_flip(image, rng, padding, flip)
  return _from_float01(np.ascontiguousarray(image), dtype)


def _small_eval(
  image: np.ndarray, *, size: int, method: str, dtype: np.dtype
) -> np.ndarray:
  image = _resize_float(_to_float01(_as_rgb(image)), size, method)
  return _from_float01(np.ascontiguousarray(image), dtype)


def _train_fn(
  c: ml_collections.ConfigDict,
) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
  dtype = np.dtype(c.image_dtype)
  if c.name == 'imagenet2012':
    return functools.partial(
      _imagenet_train,
      size=c.image_size,
      min_area=c.min_crop_area,
      jitter=c.color_jitter,
      lighting=c.lighting_std,
      flip=c.flip,
      dtype=dtype,
    )
  return functools.partial(
    _small_train,
    size=c.image_size,
    method=c.resize_method,
    padding=c.crop_padding,
    flip=c.flip,
    dtype=dtype,
  )


def _eval_fn(c: ml_collections.ConfigDict) -> Callable[..., np.ndarray]:
  dtype = np.dtype(c.image_dtype)
  if c.name == 'imagenet2012':
    fn = functools.partial(
      _imagenet_eval,
      size=c.image_size,
      crop_fraction=c.eval_crop_fraction,
      dtype=dtype,
    )
  else:
    fn = functools.partial(
      _small_eval, size=c.image_size, method=c.resize_method, dtype=dtype
    )
  # Same call signature as the train transform; eval ignores the rng.
  return lambda image, rng=None: fn(image)
