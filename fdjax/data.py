"""Datasets: random-access sources and the facts the pipeline needs.

A *source* is random access: ``len(source)`` and ``source[i] -> {'image':
HWC array, 'label': int}``. ``ArraySource`` holds arrays in memory;
tensorflow-datasets ``data_source`` objects (ArrayRecord files, readable
without TensorFlow) are used as they are; ``fdjax.sources`` reads the
CIFAR-10 binary archive and ImageNet-style image folders. The datasets
(``digits``, embedded in scikit-learn; ``cifar10`` and ``imagenet2012``), the
forms each is read from (``config.data.source``), their splits, label orders
and config fields are described in docs/data.md.
"""

from collections.abc import Sequence
import functools
from typing import Any
from typing import NamedTuple
from typing import Protocol

import ml_collections
import numpy as np

from fdjax import preprocess
from fdjax import sources

Batch = dict[str, np.ndarray]
Example = dict[str, Any]
DATASETS = ('digits', 'cifar10', 'imagenet2012')
IMAGE_DTYPES = ('float32', 'uint8')
_NUM_CLASSES = {'digits': 10, 'cifar10': 10, 'imagenet2012': 1000}
# config.data.source: the forms each dataset is read from (the first is the
# default): scikit-learn's bundled digits, a prepared tfds dataset, the
# official CIFAR-10 binary archive, or image folders (docs/data.md).
SOURCES = {
  'digits': ('sklearn',),
  'cifar10': ('tfds', 'cifar_binary'),
  'imagenet2012': ('tfds', 'folder'),
}
CORRUPT_IMAGES = ('raise', 'skip')

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


def labels(source: Source, total: int) -> np.ndarray:
  """The labels of a source's first `total` examples, [total] int64."""
  return np.asarray([int(source[i]['label']) for i in range(total)], np.int64)


def split_names(name: str) -> tuple[str, ...]:
  """The standard split names of a dataset (digits has only these)."""
  return tuple(_KNOWN_SPLIT_SIZES[name])


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
  if name not in DATASETS:
    raise ValueError(
      f'data.name={name!r} is not valid; valid: {list(DATASETS)}.'
    )
  c = ml_collections.ConfigDict()
  c.name = name
  c.source = SOURCES[name][0]
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
  c.eval_resize = 'cv2' if name == 'imagenet2012' else 'pil'
  c.corrupt_images = 'raise'
  c.num_workers = 16 if name == 'imagenet2012' else 2
  c.worker_processes = 0
  c.prefetch = 4 if name == 'imagenet2012' else 2
  return c


def image_dtype(data_config: ml_collections.ConfigDict) -> np.dtype:
  """Returns the numpy dtype of the images the pipeline delivers.

  ``float32`` images are in [0, 1]; ``uint8`` images are in [0, 255].

  Args:
    data_config: the data config.

  Returns:
    ``np.dtype('float32')`` or ``np.dtype('uint8')``.

  Examples:
    >>> image_dtype(default_data_config('digits'))
    dtype('float32')
  """
  return np.dtype(data_config.image_dtype)


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  """Returns class count, image shape and split sizes without decoding data.

  For tfds datasets the split sizes come from the prepared dataset's metadata
  in ``data_dir`` when present (so sliced splits such as ``'train[:10%]'``
  work), otherwise from the published sizes of the standard splits. The
  CIFAR-10 binary and image-folder sources count their records / files
  (listing the folders once; a missing or malformed ``data_dir`` fails here,
  before any work).

  Args:
    data_config: the data config.

  Returns:
    A ``DatasetInfo``.

  Raises:
    ValueError: for invalid config values, or a non-standard split of a tfds
      dataset that is not prepared in ``data_dir``.
    FileNotFoundError: a CIFAR-10 binary or image-folder ``data_dir`` that
      lacks the expected files.

  Examples:
    >>> dataset_info(default_data_config('digits'))
    DatasetInfo(num_classes=10, image_shape=(8, 8, 3), num_train=1500,
                num_eval=297)
  """
  name = data_config.name
  size = data_config.image_size
  splits = (data_config.train_split, data_config.eval_split)
  kind = source_kind(data_config)
  if name == 'digits':
    sizes = [_KNOWN_SPLIT_SIZES['digits'][s] for s in splits]
  elif kind != 'tfds':
    sizes = []
    for split in splits:
      try:
        sizes.append(len(get_source(data_config, split)))
      except FileNotFoundError:
        if split != data_config.train_split:
          raise
        sizes.append(0)  # Eval-only trees may lack the training split.
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


def source_kind(data_config: ml_collections.ConfigDict) -> str:
  """``data_config.source`` (``SOURCES[name][0]`` when the field is absent)."""
  return data_config.get('source', SOURCES[data_config.name][0])


def get_source(data_config: ml_collections.ConfigDict, split: str) -> Source:
  """Builds the random-access source of one split of the configured dataset.

  Args:
    data_config: the data config (``name``, ``source``, ``data_dir``,
      ``image_size``, ``resize_method`` are used).
    split: a split name, e.g. ``data_config.train_split``.

  Returns:
    A random-access source of ``{'image', 'label', ...}`` dicts.

  Raises:
    ValueError: for an unknown dataset name, source or split, or a malformed
      ``data_dir``.
    FileNotFoundError: if the data is not in ``data_dir`` (a tfds dataset
      not prepared there, missing CIFAR-10 binaries or split folders).

  Examples:
    >>> len(get_source(default_data_config('digits'), 'test'))
    297
  """
  kind = source_kind(data_config)
  if kind not in SOURCES.get(data_config.name, ()):
    raise ValueError(
      f'data.source={kind!r} is not valid for data.name='
      f'{data_config.name!r}; valid: {list(SOURCES[data_config.name])}.'
    )
  if data_config.name == 'digits':
    valid = list(_KNOWN_SPLIT_SIZES['digits'])
    if split not in valid:
      raise ValueError(f'digits split={split!r} is not valid; valid: {valid}.')
    images, labels = _digits_split(
      split, data_config.image_size, data_config.resize_method
    )
    return ArraySource(images, labels)
  if kind in ('cifar_binary', 'folder') and not data_config.data_dir:
    raise ValueError(
      f"data.data_dir='' is not valid for data.source={kind!r}; valid: the "
      'path of the data (docs/data.md).'
    )
  if kind == 'cifar_binary':
    return sources.CifarBinarySource(data_config.data_dir, split)
  if kind == 'folder':
    source = sources.FolderSource(data_config.data_dir, split)
    sources.log_class_count(source, _NUM_CLASSES[data_config.name])
    return source
  builder = _tfds_builder(data_config)
  if not builder.is_prepared():
    raise FileNotFoundError(
      f'{data_config.name} is not prepared in data_dir='
      f'{data_config.data_dir!r} (looked in {builder.data_dir}). Prepare it '
      f'once with: tfds build {data_config.name} --data_dir=DATA_DIR '
      '--file_format=array_record (see docs/data.md), or read it in another '
      f'form: data.source in {list(SOURCES[data_config.name][1:])}.'
    )
  return builder.as_data_source(split=split)


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
    [
      preprocess.resize_float(im[:, :, None], image_size, resize_method)
      for im in images
    ]
  )
  out = np.repeat(out, 3, axis=-1)
  out.setflags(write=False)
  return out, labels
