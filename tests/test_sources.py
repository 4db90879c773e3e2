"""Tests of real data on disk: CIFAR-10 binaries, image folders, tfds files.

The fixtures in tests/data/real/ were written by
tests/reference/make_data_fixtures.py with tfds's own builders (TensorFlow
was needed there only); these tests read them through the code path of a
user's run (``config.data.source`` and ``config.data.data_dir``) in a venv
without TensorFlow.
"""

import importlib.util
import itertools
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest

from fdjax import config_base
from fdjax import data
from fdjax import input_pipeline as ip
from fdjax import preprocess
from fdjax import sources

REAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'real')
TFDS_DIR = os.path.join(REAL, 'tfds')
FOLDERS = os.path.join(REAL, 'imagenet')
CIFAR_BIN = os.path.join(REAL, 'cifar-10-batches-bin')
_TFDS_LABELS = os.path.join(
  importlib.util.find_spec('tensorflow_datasets').submodule_search_locations[0],
  'datasets',
  'imagenet2012',
  'labels.txt',
)


def _take(it, n):
  return list(itertools.islice(it, n))


def _config(name, source, data_dir, **overrides):
  cfg = data.default_data_config(name)
  cfg.source = source
  cfg.data_dir = data_dir
  cfg.num_workers = 2
  if name == 'imagenet2012':
    cfg.image_size = 32
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _iter_kw(**kw):
  return dict(process_index=0, process_count=1, **kw)


# --------------------------------------------------------------------------
# TensorFlow is absent; the committed tfds files are what tfds build writes.
# --------------------------------------------------------------------------


def test_tensorflow_is_not_installed_here():
  assert importlib.util.find_spec('tensorflow') is None, (
    'these tests must show the tfds path works without TensorFlow'
  )


def test_tfds_fixtures_have_the_array_record_layout():
  for name, version, splits in [
    ('cifar10', '3.0.2', ('train', 'test')),
    ('imagenet2012', '5.1.0', ('train', 'validation')),
  ]:
    files = set(os.listdir(os.path.join(TFDS_DIR, name, version)))
    expected = {'dataset_info.json', 'features.json', 'label.labels.txt'} | {
      f'{name}-{s}.array_record-00000-of-00001' for s in splits
    }
    assert files == expected, (name, files)


# --------------------------------------------------------------------------
# CIFAR-10 binary.
# --------------------------------------------------------------------------


def _write_cifar(directory, counts, seed=0):
  """Writes data_batch_1..5.bin and test_batch.bin; returns their records."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  names = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
  out = {}
  for name, n in zip(names, counts):
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    rows = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)
    rows.tofile(os.path.join(directory, name))
    out[name] = (labels, images)
  return out


def test_cifar_binary_reads_records_chw_to_hwc(tmp_path):
  bin_dir = tmp_path / 'cifar-10-batches-bin'
  written = _write_cifar(bin_dir, [2, 3, 1, 1, 2, 4])
  for data_dir in (bin_dir, tmp_path):  # The directory or its parent.
    cfg = _config('cifar10', 'cifar_binary', str(data_dir))
    train = data.get_source(cfg, 'train')
    test = data.get_source(cfg, 'test')
    assert (len(train), len(test)) == (9, 4)
    labels = np.concatenate([written[f'data_batch_{i}.bin'][0] for i in (1, 2)])
    images = np.concatenate([written[f'data_batch_{i}.bin'][1] for i in (1, 2)])
    for i in range(5):  # data_batch_1 then data_batch_2, in file order.
      assert train[i]['label'] == labels[i]
      # Pixel (y, x) of channel c is byte 1 + c*1024 + y*32 + x.
      np.testing.assert_array_equal(
        train[i]['image'], images[i].transpose(1, 2, 0)
      )
      assert train[i]['image'][3, 5, 1] == images[i][1, 3, 5]
    lab, img = written['test_batch.bin']
    assert test[3]['label'] == lab[3]
    np.testing.assert_array_equal(test[3]['image'][..., 2], img[3][2])
    assert data.dataset_info(cfg) == data.DatasetInfo(10, (32, 32, 3), 9, 4)


def test_cifar_binary_from_the_tar_gz(tmp_path):
  bin_dir = tmp_path / 'x' / 'cifar-10-batches-bin'
  _write_cifar(bin_dir, [1, 1, 1, 1, 2, 3], seed=1)
  archive = tmp_path / 'cifar-10-binary.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(bin_dir, arcname='cifar-10-batches-bin')
  from_dir = data.get_source(
    _config('cifar10', 'cifar_binary', str(bin_dir)), 'train'
  )
  for path in (archive, tmp_path):  # The archive, or a directory with it.
    if path == tmp_path:
      shutil.rmtree(tmp_path / 'x')
    src = data.get_source(
      _config('cifar10', 'cifar_binary', str(path)), 'train'
    )
    assert len(src) == 6
    np.testing.assert_array_equal(src[5]['image'], from_dir[5]['image'])
    assert src[5]['label'] == from_dir[5]['label']


class _Exploit:
  """Unpickling this runs code: it creates the file `path`."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return (open, (self.path, 'w'))


def test_cifar_pickle_version_is_refused_never_unpickled(tmp_path):
  marker = tmp_path / 'code_ran'
  py_dir = tmp_path / 'cifar-10-batches-py'
  py_dir.mkdir()
  for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
    (py_dir / name).write_bytes(pickle.dumps(_Exploit(marker)))
  with tarfile.open(tmp_path / 'cifar-10-python.tar.gz', 'w:gz') as tar:
    tar.add(py_dir, arcname='cifar-10-batches-py')
  for path in (py_dir, tmp_path, tmp_path / 'cifar-10-python.tar.gz'):
    cfg = _config('cifar10', 'cifar_binary', str(path))
    with pytest.raises(ValueError, match='pickle version.*binary version'):
      data.get_source(cfg, 'train')
  assert not marker.exists()


def test_cifar_binary_bad_input_says_what_was_expected(tmp_path):
  cfg = _config('cifar10', 'cifar_binary', str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='does not exist; expected'):
    data.dataset_info(cfg)
  cfg.data_dir = str(tmp_path)
  (tmp_path / 'README').write_text('x')
  with pytest.raises(FileNotFoundError, match=r"found \['README'\]"):
    data.get_source(cfg, 'test')
  _write_cifar(tmp_path, [1] * 6)
  with open(tmp_path / 'test_batch.bin', 'ab') as f:
    f.write(b'\0' * 10)
  with pytest.raises(ValueError, match='not a positive multiple of the 3073'):
    data.get_source(cfg, 'test')
  with pytest.raises(ValueError, match=r"split='validation' is not valid"):
    data.get_source(cfg, 'validation')
  cfg.data_dir = ''
  with pytest.raises(ValueError, match="data.data_dir='' is not valid"):
    data.get_source(cfg, 'train')
  cfg.source = 'folder'
  with pytest.raises(ValueError, match=r"valid: \['tfds', 'cifar_binary'\]"):
    config_base.validate_data(cfg)


def test_cifar_binary_and_tfds_fixture_hold_the_same_examples():
  # tfds's cifar10 builder made the tfds fixture from these binary files: the
  # same (label, image) pairs must come out of both (tfds shuffles them).
  for split in ('train', 'test'):
    sets = []
    for source, data_dir in (('cifar_binary', CIFAR_BIN), ('tfds', TFDS_DIR)):
      src = data.get_source(_config('cifar10', source, data_dir), split)
      sets.append(
        sorted(
          (int(src[i]['label']), src[i]['image'].tobytes())
          for i in range(len(src))
        )
      )
    assert len(sets[0]) == {'train': 20, 'test': 8}[split]
    assert sets[0] == sets[1]
    assert len({label for label, _ in sets[0]}) > 5


# --------------------------------------------------------------------------
# Image folders.
# --------------------------------------------------------------------------


def test_tfds_imagenet_label_order_is_the_sorted_wordnet_ids():
  labels = open(_TFDS_LABELS).read().split()
  assert len(labels) == len(set(labels)) == 1000
  assert labels == sorted(labels)
  assert labels[0] == 'n01440764'  # tench


def test_folder_source_matches_the_tfds_fixture_of_the_same_jpegs():
  wnids = open(_TFDS_LABELS).read().split()
  for split in ('train', 'validation'):
    folder = data.get_source(_config('imagenet2012', 'folder', FOLDERS), split)
    tfds_src = data.get_source(_config('imagenet2012', 'tfds', TFDS_DIR), split)
    assert (
      len(folder) == len(tfds_src) == {'train': 24, 'validation': 12}[split]
    )
    assert list(folder.classes) == sorted(folder.classes)
    by_name = {}
    for i in range(len(folder)):
      ex = folder[i]
      by_name[os.path.basename(folder.path(i))] = ex
      # The label is the position of the example's class folder.
      assert folder.classes[ex['label']] == folder.path(i).split(os.sep)[-2]
    shapes = set()
    for i in range(len(tfds_src)):
      record = tfds_src[i]
      ex = by_name[record['file_name'].decode()]
      # tfds's label is the class's position among all 1,000 WordNet ids;
      # both name the same class.
      assert wnids[record['label']] == folder.classes[ex['label']]
      np.testing.assert_array_equal(
        preprocess._as_rgb(record['image']), ex['image']
      )
      shapes.add(ex['image'].shape)
    assert len(shapes) >= 5  # several sizes and aspect ratios


def test_imagenet_pipelines_on_folder_and_tfds_fixture_agree():
  # The same JPEGs through the real pipelines: identical eval batches
  # (sorted by label), and train batches of the right form from both.
  outs = {}
  for source, data_dir in (('folder', FOLDERS), ('tfds', TFDS_DIR)):
    cfg = _config('imagenet2012', source, data_dir)
    batches = list(ip.create_eval_iter(cfg, global_batch_size=8, **_iter_kw()))
    assert len(batches) == 2 and sum(b['mask'].sum() for b in batches) == 12
    images = np.concatenate([b['image'] for b in batches])[:12]
    outs[source] = sorted(x.tobytes() for x in images)
    train = _take(
      ip.create_train_iter(cfg, global_batch_size=8, seed=0, **_iter_kw()), 4
    )
    assert train[0]['image'].shape == (8, 32, 32, 3)
    assert train[0]['image'].dtype == np.uint8
    labels = np.concatenate([b['label'] for b in train])[:24]
    assert len(set(labels.tolist())) == 12  # An epoch holds every class.
  assert outs['folder'] == outs['tfds']


def test_folder_train_stream_is_deterministic_and_resumes():
  cfg = _config('imagenet2012', 'folder', FOLDERS)
  kw = _iter_kw(global_batch_size=4, seed=3)
  full = _take(ip.create_train_iter(cfg, **kw), 5)
  resumed = _take(ip.create_train_iter(cfg, start_step=3, **kw), 2)
  for a, b in zip(full[3:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # The augmentation is the tfds pipeline's, a function of (seed, position).
  src = data.get_source(cfg, 'train')
  labels = {src[i]['label']: i for i in range(len(src))}
  for batch in full[:2]:
    for image, label, position in zip(
      *(batch[k] for k in ('image', 'label', 'index'))
    ):
      candidates = [
        preprocess.preprocess_train(
          cfg, src[i]['image'], np.random.default_rng((3, int(position)))
        )
        for i in range(len(src))
        if src.path(i).split(os.sep)[-2] == src.classes[label]
      ]
      assert any(np.array_equal(image, c) for c in candidates)
  assert len(labels) == 12
  assert data.dataset_info(cfg) == data.DatasetInfo(1000, (32, 32, 3), 24, 12)


def test_worker_processes_give_the_same_batches():
  cfg = _config('imagenet2012', 'folder', FOLDERS, num_workers=1)
  kw = _iter_kw(global_batch_size=4, seed=1, start_step=2)
  threads = _take(ip.create_train_iter(cfg, **kw), 3)
  cfg.worker_processes = 2
  it = ip.create_train_iter(cfg, **kw)
  procs = _take(it, 3)
  it.close()
  for a, b in zip(threads, procs):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def _small_tree(root, classes=('b_cls', 'a_cls'), per_class=2, splits=None):
  from PIL import Image

  rng = np.random.default_rng(0)
  for split in splits or ('train', 'val'):
    for c in classes:
      os.makedirs(os.path.join(root, split, c), exist_ok=True)
      for i in range(per_class):
        pixels = rng.integers(0, 256, (12, 10 + i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, split, c, f'{i}.jpg'))
  return str(root)


def test_folder_tree_errors_say_what_was_expected_and_found(tmp_path):
  cfg = _config('imagenet2012', 'folder', str(tmp_path / 'none'))
  with pytest.raises(
    FileNotFoundError, match='no val/ or validation/ folder.*found no such'
  ):
    data.dataset_info(cfg)
  # A flat validation folder (the raw ILSVRC2012_img_val.tar layout).
  root = tmp_path / 'flat'
  _small_tree(root, splits=('train',))
  (root / 'val').mkdir()
  (root / 'val' / 'ILSVRC2012_val_00000001.JPEG').write_bytes(b'x')
  cfg.data_dir = str(root)
  with pytest.raises(ValueError, match='no class folders.*valprep'):
    data.dataset_info(cfg)
  # Class sets that differ between the splits would shift labels.
  root = tmp_path / 'differ'
  _small_tree(root, classes=('a', 'b'), splits=('train',))
  _small_tree(root, classes=('a', 'c'), splits=('val',))
  cfg.data_dir = str(root)
  with pytest.raises(ValueError, match=r"differ .*\['b', 'c'\]"):
    data.get_source(cfg, 'train')
  # An empty class folder.
  root = tmp_path / 'empty'
  _small_tree(root)
  os.makedirs(root / 'train' / 'c_cls')
  os.makedirs(root / 'val' / 'c_cls')
  cfg.data_dir = str(root)
  with pytest.raises(ValueError, match='c_cls has no images'):
    data.get_source(cfg, 'train')
  # Labels follow the sorted folder names, not the listing order.
  root = _small_tree(tmp_path / 'ok')
  src = data.get_source(_config('imagenet2012', 'folder', root), 'validation')
  assert src.classes == ('a_cls', 'b_cls')
  assert [src[i]['label'] for i in range(4)] == [0, 0, 1, 1]
  assert src.path(2).endswith(os.path.join('val', 'b_cls', '0.jpg'))


def test_corrupt_image_is_reported_and_skipped_only_when_asked(tmp_path):
  root = _small_tree(tmp_path / 't', per_class=3)
  bad = os.path.join(root, 'train', 'a_cls', '1.jpg')
  with open(bad, 'r+b') as f:
    f.truncate(40)  # A JPEG cut short.
  cfg = _config('imagenet2012', 'folder', root, num_workers=0)
  kw = _iter_kw(global_batch_size=6, seed=0)
  with pytest.raises(sources.CorruptImageError, match=f'{bad}.*skip'):
    _take(ip.create_train_iter(cfg, **kw), 1)
  cfg.corrupt_images = 'skip'
  batches = _take(ip.create_train_iter(cfg, **kw), 3)  # 3 epochs of 6.
  src = data.get_source(cfg, 'train')
  labels = np.concatenate([b['label'] for b in batches])
  # Example 1 (a_cls/1.jpg) is replaced by example 2 (a_cls/2.jpg): the
  # labels stay right (a_cls = 0), and the substitute's pixels are its own.
  assert sorted(labels[:6].tolist()) == [0, 0, 0, 1, 1, 1]
  again = _take(ip.create_train_iter(cfg, **kw), 3)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert src[2]['label'] == 0
  # Evaluation never skips: every example of the split counts.
  shutil.copy(bad, os.path.join(root, 'val', 'b_cls', '0.jpg'))
  with pytest.raises(sources.CorruptImageError, match='b_cls'):
    list(ip.create_eval_iter(cfg, global_batch_size=6, **_iter_kw()))


# --------------------------------------------------------------------------
# OpenCV's bicubic, reimplemented.
# --------------------------------------------------------------------------


def test_cv2_bicubic_matches_opencv():
  ref = np.load(os.path.join(REAL, 'cv2_bicubic_reference.npz'))
  i = 0
  while f'image_{i}' in ref:
    image, (w, h) = ref[f'image_{i}'], ref[f'size_{i}']
    out = preprocess.resize_cv2_bicubic(image, int(w), int(h))
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref[f'reference_{i}'])
    diff = out.astype(int) - ref[f'optimized_{i}']
    assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 0.1
    i += 1
  assert i == 3


def test_cv2_bicubic_against_float64_keys_kernel():
  # Away from the borders, output = sum of Keys(A=-0.75) weights x pixels.
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 40, 1), dtype=np.uint8)
  out = preprocess.resize_cv2_bicubic(image, 17, 13)[..., 0].astype(float)

  def keys(t):
    t, a = abs(t), -0.75
    if t <= 1:
      return (a + 2) * t**3 - (a + 3) * t**2 + 1
    return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

  def taps(d, scale):
    x = (d + 0.5) * scale - 0.5
    s = int(np.floor(x))
    return [(s + k, keys(x - (s + k))) for k in range(-1, 3)]

  for dy in range(2, 11):
    for dx in range(2, 15):
      v = sum(
        wy * wx * float(image[y, x, 0])
        for y, wy in taps(dy, 30 / 13)
        for x, wx in taps(dx, 40 / 17)
      )
      assert abs(out[dy, dx] - np.clip(v, 0, 255)) <= 1.0
  assert np.ptp(out) > 100


def test_eval_resize_cv2_is_the_imagenet_default():
  image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
  cfg = data.default_data_config('imagenet2012')
  assert cfg.eval_resize == 'cv2'
  out = preprocess.preprocess_eval(cfg, image)
  big = preprocess.resize_cv2_bicubic(image, 341, 256)
  np.testing.assert_array_equal(out, big[16:240, 58:282])
