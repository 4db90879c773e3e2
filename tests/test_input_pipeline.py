"""Tests of fdjax.input_pipeline: determinism, sharding, coverage, images.

Nothing here downloads: the tfds datasets are exercised through injected
random-access sources with tfds's record format.
"""

import itertools
import re

import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_digits

from fdjax import config_base
from fdjax import data
from fdjax import input_pipeline as ip
from fdjax import preprocess


def _take(it, n):
  return list(itertools.islice(it, n))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _random_source(n, size=6, seed=0):
  """n random uint8 images; label i identifies example i."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return data.ArraySource(images, np.arange(n))


def _small_config(image_size=6, **overrides):
  cfg = data.default_data_config('cifar10')
  cfg.image_size = image_size
  cfg.crop_padding = 2
  cfg.num_workers = 2
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


class FakeTfdsSource:
  """Random-access source shaped like tfds.data_source for imagenet2012.

  Records are dicts with a decoded uint8 HWC 'image' of varying size (one
  grayscale [H, W, 1]), an np.int64 'label' and a 'file_name'.
  """

  def __init__(self, n, seed=0):
    rng = np.random.default_rng(seed)
    self._records = []
    for i in range(n):
      h, w = rng.integers(40, 90, size=2)
      channels = 1 if i == 2 else 3
      image = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
      self._records.append(
        {
          'image': image,
          'label': np.int64(rng.integers(0, 1000)),
          'file_name': f'n0000_{i}.JPEG'.encode(),
        }
      )

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    return self._records[i]


# --------------------------------------------------------------------------
# Training stream: determinism, resumption, sharding, epochs.
# --------------------------------------------------------------------------


def test_same_seed_same_batches_and_seed_matters():
  src = _random_source(10)
  cfg = _small_config()
  kw = dict(global_batch_size=4, process_index=0, process_count=1, source=src)
  a = _take(ip.create_train_iter(cfg, seed=3, **kw), 4)
  b = _take(ip.create_train_iter(cfg, seed=3, **kw), 4)
  c = _take(ip.create_train_iter(cfg, seed=4, **kw), 4)
  _assert_batches_equal(a, b)
  assert any(
    not np.array_equal(x['label'], y['label']) for x, y in zip(a, c)
  ), 'a different seed should give a different order'
  assert a[0]['image'].shape == (4, 6, 6, 3)
  assert a[0]['image'].dtype == np.float32
  assert a[0]['label'].dtype == np.int32
  assert a[0]['index'].dtype == np.int64
  np.testing.assert_array_equal(
    np.concatenate([x['index'] for x in a]), np.arange(16)
  )


@pytest.mark.parametrize('process_count', [1, 2])
def test_resume_at_step_k_continues_exactly(process_count):
  src = _random_source(10)
  cfg = _small_config()
  for p in range(process_count):
    kw = dict(
      global_batch_size=4,
      seed=7,
      process_index=p,
      process_count=process_count,
      source=src,
    )
    full = _take(ip.create_train_iter(cfg, **kw), 7)
    resumed = _take(ip.create_train_iter(cfg, start_step=4, **kw), 3)
    _assert_batches_equal(full[4:], resumed)


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_shards_concatenate_to_global_batch(process_count):
  src = _random_source(11)
  cfg = _small_config()
  kw = dict(global_batch_size=8, seed=1, source=src)
  whole = _take(
    ip.create_train_iter(cfg, process_index=0, process_count=1, **kw), 3
  )
  shards = [
    _take(
      ip.create_train_iter(
        cfg, process_index=p, process_count=process_count, **kw
      ),
      3,
    )
    for p in range(process_count)
  ]
  for step in range(3):
    for k in whole[step]:
      np.testing.assert_array_equal(
        np.concatenate([s[step][k] for s in shards]), whole[step][k]
      )
    assert shards[0][step]['image'].shape[0] == 8 // process_count


def test_thread_count_does_not_change_batches():
  src = _random_source(9)
  kw = dict(
    global_batch_size=3, seed=2, process_index=0, process_count=1, source=src
  )
  a = _take(ip.create_train_iter(_small_config(num_workers=0), **kw), 5)
  b = _take(ip.create_train_iter(_small_config(num_workers=3), **kw), 5)
  _assert_batches_equal(a, b)


def test_every_example_once_per_epoch_and_epochs_differ():
  n = 10
  src = _random_source(n)
  it = ip.create_train_iter(
    _small_config(),
    global_batch_size=4,
    seed=0,
    process_index=0,
    process_count=1,
    source=src,
  )
  labels = np.concatenate([b['label'] for b in _take(it, 10)])  # 4 epochs
  epochs = labels.reshape(4, n)
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(n))
  assert len({tuple(e) for e in epochs}) == 4, 'each epoch its own order'


def test_augmentation_is_a_function_of_seed_and_position():
  src = _random_source(7)
  cfg = _small_config()
  seed = 5
  batches = _take(
    ip.create_train_iter(
      cfg,
      global_batch_size=4,
      seed=seed,
      start_step=2,
      process_index=1,
      process_count=2,
      source=src,
    ),
    3,
  )
  for b in batches:
    for image, label, position in zip(b['image'], b['label'], b['index']):
      expected = preprocess.preprocess_train(
        cfg,
        src[int(label)]['image'],
        np.random.default_rng((seed, int(position))),
      )
      np.testing.assert_array_equal(image, expected)
  np.testing.assert_array_equal(
    np.concatenate([b['index'] for b in batches]),
    [10, 11, 14, 15, 18, 19],
  )


def test_no_augmentation_gives_eval_images():
  src = _random_source(5)
  cfg = _small_config(augment=False)
  (b,) = _take(
    ip.create_train_iter(
      cfg,
      global_batch_size=5,
      seed=0,
      process_index=0,
      process_count=1,
      source=src,
    ),
    1,
  )
  for image, label in zip(b['image'], b['label']):
    np.testing.assert_allclose(image, src[int(label)]['image'] / 255.0)


# --------------------------------------------------------------------------
# Evaluation stream.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('process_count', [1, 3])
@pytest.mark.parametrize(
  'start_index,num_examples', [(0, None), (5, None), (4, 11), (17, None)]
)
def test_eval_covers_each_example_once(
  process_count, start_index, num_examples
):
  n = 17
  src = _random_source(n, seed=1)
  cfg = _small_config()
  per_process = [
    list(
      ip.create_eval_iter(
        cfg,
        global_batch_size=6,
        process_index=p,
        process_count=process_count,
        source=src,
        start_index=start_index,
        num_examples=num_examples,
      )
    )
    for p in range(process_count)
  ]
  end = n if num_examples is None else num_examples
  num_batches = -(-(end - start_index) // 6)
  # Every process runs the same number of steps (SPMD).
  assert [len(b) for b in per_process] == [num_batches] * process_count
  seen = []
  for step in range(num_batches):
    batch = {
      k: np.concatenate([per_process[p][step][k] for p in range(process_count)])
      for k in ('image', 'label', 'index', 'mask')
    }
    assert batch['mask'].dtype == bool
    assert batch['image'].shape == (6, 6, 6, 3)
    np.testing.assert_array_equal(
      batch['index'], start_index + step * 6 + np.arange(6)
    )
    np.testing.assert_array_equal(batch['mask'], batch['index'] < end)
    for image, label, index, mask in zip(*batch.values()):
      if mask:
        seen.append(int(index))
        assert label == index  # _random_source labels example i with i.
        np.testing.assert_allclose(image, src[int(index)]['image'] / 255.0)
      else:
        assert not image.any()
  assert seen == list(range(start_index, end))


def test_eval_bad_ranges_raise():
  src = _random_source(5)
  cfg = _small_config()
  kw = dict(global_batch_size=2, process_index=0, process_count=1, source=src)
  with pytest.raises(ValueError, match=r'num_examples .*\[1, 5\]'):
    ip.create_eval_iter(cfg, num_examples=6, **kw)
  with pytest.raises(ValueError, match=r'start_index .*\[0, 3\]'):
    ip.create_eval_iter(cfg, num_examples=3, start_index=4, **kw)


# --------------------------------------------------------------------------
# Config and argument validation.
# --------------------------------------------------------------------------


def test_bad_batch_and_process_arguments_raise():
  src = _random_source(5)
  cfg = _small_config()
  with pytest.raises(ValueError, match='multiple of the process count 3'):
    ip.create_train_iter(
      cfg,
      global_batch_size=8,
      seed=0,
      process_index=0,
      process_count=3,
      source=src,
    )
  with pytest.raises(ValueError, match=r'process_index must be in \[0, 2\)'):
    ip.create_eval_iter(
      cfg, global_batch_size=4, process_index=2, process_count=2, source=src
    )
  with pytest.raises(ValueError, match='seed'):
    ip.create_train_iter(
      cfg,
      global_batch_size=4,
      seed=-1,
      process_index=0,
      process_count=1,
      source=src,
    )


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('name', 'mnist', "valid: ['digits', 'cifar10', 'imagenet2012']"),
    ('image_dtype', 'float16', "valid: ['float32', 'uint8']"),
    ('resize_method', 'lanczos', "valid: ['nearest', 'bilinear', 'bicubic']"),
    ('train_split', 'validation', "valid: ['train', 'test']"),
    ('image_size', 0, 'positive integer'),
    ('crop_padding', -1, 'non-negative integer'),
    ('num_workers', -1, 'non-negative integer'),
    ('min_crop_area', 0.0, '(0, 1]'),
    ('lighting_std', -0.1, '>= 0'),
    ('source', 'folder', "valid: ['sklearn']"),
    ('corrupt_images', 'ignore', "valid: ['raise', 'skip']"),
    ('eval_resize', 'opencv', "valid: ['pil', 'cv2']"),
    ('worker_processes', -1, 'non-negative integer'),
  ],
)
def test_bad_config_values_raise(field, value, message):
  cfg = data.default_data_config('digits')
  cfg[field] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    config_base.validate_data(cfg)
  with pytest.raises(ValueError, match=re.escape(message)):  # At the start.
    ip.create_eval_iter(cfg, global_batch_size=8, num_examples=8)


def test_default_config_unknown_name_and_get_source_split():
  with pytest.raises(ValueError, match='imagenet2012'):
    data.default_data_config('imagenet')
  with pytest.raises(ValueError, match=r"valid: \['train', 'test'\]"):
    data.get_source(data.default_data_config('digits'), 'validation')


def test_array_source_validates():
  with pytest.raises(ValueError, match='same length'):
    data.ArraySource(np.zeros((3, 2, 2, 3)), [0, 1])
  with pytest.raises(ValueError, match='integers'):
    data.ArraySource(np.zeros((2, 2, 2, 3)), [0.5, 1.0])


# --------------------------------------------------------------------------
# Datasets.
# --------------------------------------------------------------------------


def test_digits_default_loads_real_data_split_1500_297():
  cfg = data.default_data_config()
  assert cfg.name == 'digits'
  train = data.get_source(cfg, 'train')
  test = data.get_source(cfg, 'test')
  assert (len(train), len(test)) == (1500, 297)
  pairs = [
    (t[i]['image'], t[i]['label']) for t in (train, test) for i in range(len(t))
  ]
  images = np.stack([p[0] for p in pairs])
  labels = np.array([p[1] for p in pairs])
  assert images.shape == (1797, 8, 8, 3) and images.dtype == np.float32
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  # The two splits are a permutation of sklearn's digits, scaled by 1/16.
  ref = load_digits()
  key = lambda im, lab: (int(lab), (im * 16).round().astype(int).tobytes())
  ours = sorted(key(im[..., 0], lab) for im, lab in zip(images, labels))
  theirs = sorted(key(im / 16, lab) for im, lab in zip(ref.images, ref.target))
  assert ours == theirs
  assert set(labels[1500:]) == set(range(10))  # every class in the test split
  info = data.dataset_info(cfg)
  assert info == data.DatasetInfo(10, (8, 8, 3), 1500, 297)


def test_digits_resized_and_uint8():
  cfg = data.default_data_config('digits')
  cfg.image_size = 16
  cfg.image_dtype = 'uint8'
  (b,) = _take(
    ip.create_train_iter(
      cfg, global_batch_size=8, seed=0, process_index=0, process_count=1
    ),
    1,
  )
  assert b['image'].shape == (8, 16, 16, 3) and b['image'].dtype == np.uint8
  assert b['image'].max() > 200  # [0, 255] scale, not [0, 1]
  assert data.dataset_info(cfg).image_shape == (16, 16, 3)


def test_digits_augmentation_translates_and_never_flips():
  cfg = data.default_data_config('digits')
  image = np.random.default_rng(0).uniform(0.1, 1.0, (8, 8, 3))
  image = image.astype(np.float32)
  padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
  shifts = {
    (dy, dx): padded[dy : dy + 8, dx : dx + 8]
    for dy in range(3)
    for dx in range(3)
  }
  used = set()
  for position in range(40):
    out = preprocess.preprocess_train(
      cfg, image, np.random.default_rng((0, position))
    )
    assert out.shape == (8, 8, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    match = [s for s, v in shifts.items() if np.array_equal(out, v)]
    assert len(match) == 1, 'output must be an unflipped translation'
    used.add(match[0])
  assert len(used) == 9


def test_cifar_flip_happens_half_the_time():
  cfg = _small_config(crop_padding=0)
  image = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
  flips = 0
  for position in range(200):
    out = preprocess.preprocess_train(
      cfg, image, np.random.default_rng((0, position))
    )
    if np.allclose(out, image[:, ::-1] / 255.0):
      flips += 1
    else:
      np.testing.assert_allclose(out, image / 255.0)
  assert 70 < flips < 130


def test_tfds_datasets_without_data(tmp_path):
  cfg = data.default_data_config('cifar10')
  cfg.data_dir = str(tmp_path)
  assert data.dataset_info(cfg) == data.DatasetInfo(
    10, (32, 32, 3), 50000, 10000
  )
  cfg = data.default_data_config('imagenet2012')
  cfg.data_dir = str(tmp_path)
  assert data.dataset_info(cfg) == data.DatasetInfo(
    1000, (224, 224, 3), 1281167, 50000
  )
  with pytest.raises(FileNotFoundError, match='tfds build imagenet2012'):
    data.get_source(cfg, 'validation')
  cfg.train_split = 'train[:10%]'
  with pytest.raises(ValueError, match='not prepared'):
    data.dataset_info(cfg)


# --------------------------------------------------------------------------
# ImageNet preprocessing.
# --------------------------------------------------------------------------


def _imagenet_config(image_size=32):
  cfg = data.default_data_config('imagenet2012')
  cfg.image_size = image_size
  cfg.num_workers = 2
  return cfg


def test_imagenet_pipeline_on_fake_tfds_source():
  src = FakeTfdsSource(10)
  cfg = _imagenet_config()
  kw = dict(process_index=0, process_count=1, source=src)
  a = _take(ip.create_train_iter(cfg, global_batch_size=4, seed=0, **kw), 3)
  b = _take(ip.create_train_iter(cfg, global_batch_size=4, seed=0, **kw), 3)
  _assert_batches_equal(a, b)
  assert a[0]['image'].shape == (4, 32, 32, 3)
  assert a[0]['image'].dtype == np.uint8
  assert {int(x) for x in np.concatenate([x['label'] for x in a])} <= {
    int(src[i]['label']) for i in range(10)
  }
  evals = list(ip.create_eval_iter(cfg, global_batch_size=4, **kw))
  assert len(evals) == 3 and int(sum(e['mask'].sum() for e in evals)) == 10
  got = np.concatenate([e['image'] for e in evals])[:10]
  for i in range(10):
    np.testing.assert_array_equal(
      got[i], preprocess.preprocess_eval(cfg, src[i]['image'])
    )
  np.testing.assert_array_equal(
    np.concatenate([e['label'] for e in evals])[:10],
    [src[i]['label'] for i in range(10)],
  )
  # The grayscale record comes out as three equal channels.
  np.testing.assert_array_equal(got[2][..., 0], got[2][..., 1])


def test_imagenet_train_crops_differ_by_position_not_by_call():
  image = np.random.default_rng(0).integers(0, 256, (80, 120, 3), np.uint8)
  src = data.ArraySource([image] * 6, [0] * 6)
  cfg = _imagenet_config()
  kw = dict(
    global_batch_size=6, seed=11, process_index=0, process_count=1, source=src
  )
  (a,) = _take(ip.create_train_iter(cfg, **kw), 1)
  (b,) = _take(ip.create_train_iter(cfg, **kw), 1)
  np.testing.assert_array_equal(a['image'], b['image'])
  images = [x.tobytes() for x in a['image']]
  assert len(set(images)) == 6, 'each position gets its own augmentation'
  cfg.image_dtype = 'float32'
  out = preprocess.preprocess_train(cfg, image, np.random.default_rng(0))
  assert out.dtype == np.float32 and out.shape == (32, 32, 3)
  assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() > 0.5


def test_random_resized_crop_box_statistics():
  rng = np.random.default_rng(0)
  h, w = 300, 400
  areas, aspects = [], []
  for _ in range(500):
    left, top, right, bottom = preprocess._random_resized_crop_box(
      h, w, rng, 0.08
    )
    assert 0 <= left < right <= w and 0 <= top < bottom <= h
    bw, bh = right - left, bottom - top
    areas.append(bw * bh / (h * w))
    aspects.append(bw / bh)
  areas, aspects = np.array(areas), np.array(aspects)
  assert areas.min() > 0.07 and areas.max() <= 1.0
  assert areas.min() < 0.15 and areas.max() > 0.8
  assert aspects.min() > 0.74 and aspects.max() < 1.35
  # log-uniform aspect: the log-aspect is symmetric about 0.
  assert abs(np.median(np.log(aspects))) < 0.05


def test_random_resized_crop_falls_back_to_centre_crop():
  # A 10 x 1000 strip admits no crop of aspect <= 4/3 with area >= 8%.
  box = preprocess._random_resized_crop_box(
    10, 1000, np.random.default_rng(0), 0.08
  )
  assert box == (493, 0, 506, 10)  # 13 x 10 (aspect 4/3), centred
  box = preprocess._random_resized_crop_box(
    1000, 10, np.random.default_rng(0), 0.08
  )
  assert box == (0, 493, 10, 506)  # 10 x 13 (aspect 3/4), centred


def test_color_jitter_matches_float64_reference():
  rng = np.random.default_rng(3)
  image = rng.uniform(1, 254, (5, 7, 3)).astype(np.float32)
  strength = 0.4
  out = preprocess._color_jitter(image, np.random.default_rng(9), strength)
  # Reference: same draws, float64, per-pixel loops.
  ref_rng = np.random.default_rng(9)
  ref = image.astype(np.float64)
  weights = (0.299, 0.587, 0.114)
  for op in ref_rng.permutation(3):
    a = 1.0 + ref_rng.uniform(-strength, strength)
    grey = np.zeros(ref.shape[:2])
    for i, j in np.ndindex(*grey.shape):
      grey[i, j] = sum(wk * ref[i, j, k] for k, wk in enumerate(weights))
    if op == 0:
      ref = ref * a
    elif op == 1:
      ref = ref * a + grey.mean() * (1 - a)
    else:
      ref = ref * a + grey[:, :, None] * (1 - a)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-3)
  assert not np.allclose(out, image, atol=1)


def test_color_jitter_on_grey_image_is_only_brightness():
  # Contrast and saturation leave a uniform grey image unchanged.
  image = np.full((4, 4, 3), 100.0, np.float32)
  for seed in range(5):
    out = preprocess._color_jitter(image, np.random.default_rng(seed), 0.4)
    assert np.ptp(out) < 1e-3
    assert 60 - 1e-3 <= out[0, 0, 0] <= 140 + 1e-3


def test_pca_lighting_matches_float64_reference():
  image = np.random.default_rng(0).uniform(0, 255, (3, 3, 3))
  image = image.astype(np.float32)
  out = preprocess._pca_lighting(image, np.random.default_rng(4), 0.1)
  alpha = np.random.default_rng(4).normal(0.0, 0.1, size=3)
  eigval = [0.2175, 0.0188, 0.0045]
  eigvec = [  # rows R, G, B; columns are eigenvectors
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
  ]
  offset = [
    255.0 * sum(eigvec[c][j] * alpha[j] * eigval[j] for j in range(3))
    for c in range(3)
  ]
  np.testing.assert_allclose(
    out - image, np.broadcast_to(offset, (3, 3, 3)), rtol=1e-5, atol=1e-4
  )
  assert np.abs(offset).max() > 0.1
  # The eigenvectors are (nearly) orthonormal, as a PCA basis must be.
  np.testing.assert_allclose(np.array(eigvec).T @ eigvec, np.eye(3), atol=1e-4)


def _gradient_image(width, height):
  y, x = np.mgrid[0:height, 0:width]
  image = np.stack(
    [x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], -1
  )
  return image.astype(np.uint8)


@pytest.mark.parametrize(
  'width,height,resized,offset',
  [
    (512, 384, (341, 256), (58, 16)),  # landscape: left 58, top 16
    (384, 512, (256, 341), (16, 58)),  # portrait
  ],
)
def test_imagenet_eval_preprocessing_against_pil(
  width, height, resized, offset
):
  image = _gradient_image(width, height)
  cfg = data.default_data_config('imagenet2012')
  cfg.eval_resize = 'pil'
  out = preprocess.preprocess_eval(cfg, image)
  # Independent computation: PIL bicubic to shorter side 256, crop 224.
  big = Image.fromarray(image).resize(resized, Image.Resampling.BICUBIC)
  left, top = offset
  expected = np.asarray(big.crop((left, top, left + 224, top + 224)))
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)
  cfg.image_dtype = 'float32'
  np.testing.assert_allclose(
    preprocess.preprocess_eval(cfg, image), expected / 255.0, rtol=1e-6
  )


def test_imagenet_eval_scales_with_image_size():
  # image_size 112 -> shorter side round(112 * 256 / 224) = 128.
  image = _gradient_image(200, 100)
  cfg = _imagenet_config(image_size=112)
  cfg.eval_resize = 'pil'
  out = preprocess.preprocess_eval(cfg, image)
  big = Image.fromarray(image).resize((256, 128), Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(out, np.asarray(big)[8:120, 72:184])
