"""Random-access sources over data as users hold it on disk (no TensorFlow).

* ``CifarBinarySource``: the official CIFAR-10 binary version
  (``cifar-10-batches-bin/`` or ``cifar-10-binary.tar.gz`` itself), read
  with numpy. Each record is 1 label byte then 3,072 bytes of a 32x32 image
  in CHW order (1,024 red, 1,024 green, 1,024 blue bytes). The Python-pickle
  version is refused (unpickling runs code).
* ``FolderSource``: an image-folder tree ``ROOT/SPLIT/CLASS/*.JPEG`` (the
  ImageNet layout torchvision's ImageFolder reads). Labels are positions in
  the sorted class-folder names; images are decoded with PIL when an example
  is read, i.e. inside the input pipeline's workers.

Both return ``{'image': uint8 [H, W, 3], 'label': int}`` as tfds's sources
do, and pickle cheaply (grain's worker processes receive them pickled).
docs/data.md describes the layouts and the errors.
"""

from collections.abc import Sequence
import functools
import io
import os
import tarfile

from absl import logging
import numpy as np
from PIL import Image

CIFAR_RECORD_BYTES = 1 + 32 * 32 * 3
CIFAR_DIR = 'cifar-10-batches-bin'
CIFAR_FILES = {
  'train': tuple(f'data_batch_{i}.bin' for i in range(1, 6)),
  'test': ('test_batch.bin',),
}
CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')
# Split name -> folder names tried in order (the first that exists is used).
FOLDER_SPLITS = {'train': ('train',), 'validation': ('val', 'validation')}


class CorruptImageError(ValueError):
  """An image file that cannot be decoded; ``path`` names it."""

  def __init__(self, path: str, cause: Exception):
    super().__init__(
      f'cannot decode image {path}: {type(cause).__name__}: {cause}. Replace '
      "or delete the file, or set config.data.corrupt_images='skip' to "
      'train on the next readable example instead (training only).'
    )
    self.path = path


# --------------------------------------------------------------------------
# CIFAR-10 binary.
# --------------------------------------------------------------------------


def _refuse_pickle_version(what: str) -> None:
  raise ValueError(
    f'{what} is the Python-pickle version of CIFAR-10, which fdjax does not '
    'load (unpickling a file runs code from it). Use the binary version: '
    f'{CIFAR_URL} (pass the .tar.gz itself or its extracted {CIFAR_DIR}/ '
    'directory as config.data.data_dir).'
  )


def _cifar_records(data_dir: str, split: str) -> np.ndarray:
  """Returns the split's records as a uint8 array [N, 3073]."""
  if split not in CIFAR_FILES:
    raise ValueError(
      f'CIFAR-10 binary split={split!r} is not valid; valid: '
      f'{sorted(CIFAR_FILES)}.'
    )
  names = CIFAR_FILES[split]
  if os.path.isfile(data_dir):
    if 'python' in os.path.basename(data_dir):
      _refuse_pickle_version(data_dir)
    return _cifar_records_from_tar(data_dir, names)
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(
      f'CIFAR-10 binary data_dir={data_dir!r} does not exist; expected the '
      f'{CIFAR_DIR}/ directory of {CIFAR_URL}, a directory containing it, '
      'or the .tar.gz itself.'
    )
  for candidate in (data_dir, os.path.join(data_dir, CIFAR_DIR)):
    if all(os.path.isfile(os.path.join(candidate, n)) for n in names):
      chunks = [
        np.fromfile(os.path.join(candidate, n), np.uint8) for n in names
      ]
      return _check_records(np.concatenate(chunks), candidate)
  for candidate in (data_dir, os.path.join(data_dir, 'cifar-10-batches-py')):
    if os.path.isfile(os.path.join(candidate, 'data_batch_1')):
      _refuse_pickle_version(candidate)
  archives = sorted(
    f for f in os.listdir(data_dir) if f.endswith(('.tar.gz', '.tgz'))
  )
  binary = [f for f in archives if 'binary' in f]
  if binary:
    return _cifar_records_from_tar(os.path.join(data_dir, binary[0]), names)
  if archives:
    _refuse_pickle_version(os.path.join(data_dir, archives[0]))
  raise FileNotFoundError(
    f'no CIFAR-10 binary files for split {split!r} in data_dir={data_dir!r}: '
    f'expected {list(names)} there or in {CIFAR_DIR}/ (or '
    f'cifar-10-binary.tar.gz); found {sorted(os.listdir(data_dir))[:10]}.'
  )


def _cifar_records_from_tar(path: str, names: Sequence[str]) -> np.ndarray:
  chunks = {}
  with tarfile.open(path, 'r:*') as tar:
    for member in tar:
      base = os.path.basename(member.name)
      if member.isfile() and base == 'data_batch_1' and 'py' in member.name:
        _refuse_pickle_version(path)
      if member.isfile() and base in names:
        chunks[base] = np.frombuffer(tar.extractfile(member).read(), np.uint8)
  missing = [n for n in names if n not in chunks]
  if missing:
    raise FileNotFoundError(
      f'{path} has no {missing}; expected the CIFAR-10 binary archive '
      f'{CIFAR_URL}.'
    )
  return _check_records(np.concatenate([chunks[n] for n in names]), path)


def _check_records(raw: np.ndarray, where: str) -> np.ndarray:
  if not raw.size or raw.size % CIFAR_RECORD_BYTES:
    raise ValueError(
      f'CIFAR-10 binary files in {where} hold {raw.size} bytes, not a '
      f'positive multiple of the {CIFAR_RECORD_BYTES}-byte record (1 label '
      'byte + 3072 image bytes); are they the binary version?'
    )
  records = raw.reshape(-1, CIFAR_RECORD_BYTES)
  if records[:, 0].max() > 9:
    raise ValueError(
      f'CIFAR-10 binary files in {where} have label bytes up to '
      f'{records[:, 0].max()}; valid: 0..9 (is this CIFAR-100?).'
    )
  return records


@functools.cache
def _cifar_records_cached(data_dir: str, split: str) -> np.ndarray:
  return _cifar_records(data_dir, split)


class CifarBinarySource:
  """One split of the official CIFAR-10 binary version, in file order.

  Args:
    data_dir: ``cifar-10-batches-bin/``, a directory containing it (or the
      ``.tar.gz``), or the path of ``cifar-10-binary.tar.gz``.
    split: ``'train'`` (data_batch_1..5, 50,000) or ``'test'`` (10,000).

  Raises:
    FileNotFoundError: the files are not there (says what was found).
    ValueError: the pickle version, a bad split, or malformed files.

  Labels are the record's label byte (the order of ``batches.meta.txt`` and
  of tfds ``cifar10``, which is built from the same files).
  """

  def __init__(self, data_dir: str, split: str):
    self._data_dir = os.path.abspath(os.path.expanduser(data_dir))
    self._split = split
    self._len = len(_cifar_records_cached(self._data_dir, split))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    record = _cifar_records_cached(self._data_dir, self._split)[int(index)]
    image = record[1:].reshape(3, 32, 32).transpose(1, 2, 0)
    return {'image': np.ascontiguousarray(image), 'label': int(record[0])}

  def __repr__(self) -> str:
    return f'CifarBinarySource({self._data_dir!r}, {self._split!r})'


# --------------------------------------------------------------------------
# Image folders.
# --------------------------------------------------------------------------


def folder_split_dir(root: str, split: str) -> str:
  """The directory of ``split`` under ``root`` (``validation`` -> ``val``)."""
  names = FOLDER_SPLITS.get(split, (split,))
  for name in names:
    path = os.path.join(root, name)
    if os.path.isdir(path):
      return path
  found = sorted(os.listdir(root)) if os.path.isdir(root) else None
  wanted = ' or '.join(f'{n}/' for n in names)
  raise FileNotFoundError(
    f'image-folder data_dir={root!r} has no {wanted} folder '
    f'for split {split!r}; expected ROOT/train/CLASS/*.JPEG and '
    'ROOT/val/CLASS/*.JPEG (one folder per class, e.g. n01440764); found '
    + ('no such directory' if found is None else f'{found[:10]}')
    + '.'
  )


def _class_dirs(split_dir: str) -> list[str]:
  entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
  classes = [e.name for e in entries if e.is_dir()]
  stray = [e.name for e in entries if e.is_file() and not e.name[0] == '.']
  if stray and not classes:
    raise ValueError(
      f'{split_dir} holds files ({stray[:3]}...) but no class folders; '
      'images must be in one folder per class (SPLIT/CLASS/*.JPEG). The '
      'flat ImageNet validation archive needs sorting into class folders '
      'first (e.g. with the widely used valprep.sh).'
    )
  if not classes:
    raise ValueError(f'{split_dir} has no class folders; expected CLASS/*.')
  return classes


@functools.cache
def folder_classes(root: str) -> tuple[str, ...]:
  """The sorted class names of the tree; every split must have the same."""
  per_split = {}
  for split in FOLDER_SPLITS:
    try:
      per_split[split] = _class_dirs(folder_split_dir(root, split))
    except FileNotFoundError:
      continue
  if not per_split:
    folder_split_dir(root, 'train')  # Raises with what was found.
  sets = {s: set(c) for s, c in per_split.items()}
  if len(sets) == 2 and sets['train'] != sets['validation']:
    only = sorted(sets['train'] ^ sets['validation'])
    raise ValueError(
      f'the class folders of {root}/train and the validation folder differ '
      f'({len(sets["train"])} vs {len(sets["validation"])} classes; in one '
      f'only: {only[:5]}); labels are positions in the sorted class list, '
      'so both splits must have the same classes.'
    )
  classes = tuple(sorted(next(iter(per_split.values()))))
  return classes


@functools.cache
def _folder_listing(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (relative paths as bytes [N], labels int32 [N]), sorted."""
  split_dir = folder_split_dir(root, split)
  classes = folder_classes(root)
  found = _class_dirs(split_dir)
  if set(found) != set(classes):
    raise ValueError(
      f'{split_dir} has {len(found)} class folders, expected the {len(classes)}'
      f' of the tree: {sorted(set(found) ^ set(classes))[:5]} differ.'
    )
  paths, labels = [], []
  for label, name in enumerate(classes):
    files = sorted(
      e.name
      for e in os.scandir(os.path.join(split_dir, name))
      if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
      raise ValueError(
        f'class folder {os.path.join(split_dir, name)} has no images '
        f'(extensions {IMAGE_EXTENSIONS}).'
      )
    rel = os.path.relpath(os.path.join(split_dir, name), root)
    paths.extend(os.path.join(rel, f).encode() for f in files)
    labels.extend([label] * len(files))
  return np.array(paths), np.array(labels, np.int32)


def decode_image(path: str) -> np.ndarray:
  """Decodes an image file to uint8 RGB [H, W, 3] (CMYK, grey, palette ok).

  Raises:
    CorruptImageError: naming the path, if the file cannot be decoded.
  """
  try:
    with open(path, 'rb') as f:
      raw = f.read()
    with Image.open(io.BytesIO(raw)) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise CorruptImageError(path, e) from e


class FolderSource:
  """One split of an image-folder tree ``ROOT/SPLIT/CLASS/IMAGE``.

  Args:
    root: the tree's root (``config.data.data_dir``).
    split: ``'train'`` (folder ``train/``), ``'validation'`` (``val/`` or
      ``validation/``) or any other folder name under ``root``.

  Raises:
    FileNotFoundError: the split folder is missing (says what was found).
    ValueError: no class folders, an empty class, or splits whose classes
      differ.

  Examples are in class then file-name order; ``label`` is the position of
  the class folder in the sorted class names (for the 1,000 WordNet-id
  folders of ImageNet, tfds ``imagenet2012``'s order). Reading an example
  decodes its file (``decode_image``), raising ``CorruptImageError`` with
  the path when it cannot.
  """

  def __init__(self, root: str, split: str):
    self._root = os.path.abspath(os.path.expanduser(root))
    self._split = split
    self._paths, self._labels = _folder_listing(self._root, split)
    self.classes = folder_classes(self._root)

  def __len__(self) -> int:
    return len(self._labels)

  def path(self, index: int) -> str:
    return os.path.join(self._root, self._paths[int(index)].decode())

  def __getitem__(self, index: int) -> dict:
    return {
      'image': decode_image(self.path(index)),
      'label': int(self._labels[int(index)]),
    }

  def __repr__(self) -> str:
    return f'FolderSource({self._root!r}, {self._split!r}, n={len(self)})'


@functools.cache
def _warn_class_count(root: str, found: int, num_classes: int) -> None:
  if found != num_classes:
    logging.warning(
      'Image folders in %s: %d classes, not %d: labels are positions among '
      'these %d sorted folders (not the full dataset order).',
      root,
      found,
      num_classes,
      found,
    )


def log_class_count(source: FolderSource, num_classes: int) -> None:
  """Warns (once per tree) when the tree has not ``num_classes`` classes."""
  _warn_class_count(source._root, len(source.classes), num_classes)
