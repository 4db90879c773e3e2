"""Writes the real-data fixtures of tests/data/real/ with tfds's own builders.

Run by hand, once, with a venv that has TensorFlow (tfds's builders encode
with it; fdjax and its tests read the result without it):

  python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu \
      'tensorflow-datasets==4.9.10' scikit-learn
  /tmp/tf/bin/python tests/reference/make_data_fixtures.py

Writes, from crops of the two photos scikit-learn ships (china.jpg and
flower.jpg), under tests/data/real/:

* ``cifar-10-batches-bin/``: a tiny CIFAR-10 in the official binary format
  (data_batch_1..5.bin with 4 records each, test_batch.bin with 8,
  batches.meta.txt);
* ``imagenet/``: an image-folder tree ``train/WNID/WNID_9000k.JPEG`` (2 per
  class) and ``val/WNID/ILSVRC2012_val_0000000k.JPEG`` (the first 12
  validation images' classes, per tfds's validation_labels.txt), JPEGs of
  several sizes and aspect ratios, one of them grayscale;
* ``tfds/``: what ``tfds build --file_format=array_record`` writes for
  ``cifar10`` (3.0.2) and ``imagenet2012`` (5.1.0), made by running tfds's
  real builders on the two above (the CIFAR-10 download replaced by the
  tiny binary directory; the ImageNet manual_dir holding tars in the layout
  of ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar), statistics
  skipped.
"""

import argparse
import io
import os
import shutil
import tarfile
import tempfile

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imagenet2012 import (
  imagenet2012_dataset_builder as imagenet_builder,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'data')
OUT = os.path.normpath(os.path.join(ROOT, 'real'))
CIFAR_NAMES = (
  'airplane automobile bird cat deer dog frog horse ship truck'.split()
)
NUM_VAL = 12
# (height, width) of the JPEGs, cycled: landscape, portrait, square, thin.
SIZES = [
  (48, 64),
  (64, 48),
  (75, 100),
  (100, 75),
  (60, 60),
  (40, 110),
  (110, 40),
  (90, 120),
  (33, 47),
]


def _photos():
  return [np.asarray(im) for im in load_sample_images().images]


def _crop(photos, rng, h, w):
  photo = photos[rng.integers(len(photos))]
  ch = int(rng.integers(h, photo.shape[0] // 2))
  cw = min(photo.shape[1], int(round(ch * w / h)))
  top = int(rng.integers(0, photo.shape[0] - ch + 1))
  left = int(rng.integers(0, photo.shape[1] - cw + 1))
  crop = Image.fromarray(photo[top : top + ch, left : left + cw])
  return crop.resize((w, h), Image.Resampling.BICUBIC)


def _jpeg(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format='JPEG', quality=75)
  return buf.getvalue()


def write_cifar_binary(photos, rng):
  out = os.path.join(OUT, 'cifar-10-batches-bin')
  os.makedirs(out, exist_ok=True)
  files = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
  label = 0
  for name in files:
    records = []
    for _ in range(8 if name.startswith('test') else 4):
      image = np.asarray(_crop(photos, rng, 32, 32))
      chw = image.transpose(2, 0, 1).reshape(-1)
      records.append(np.concatenate([[label % 10], chw]).astype(np.uint8))
      label += 3
    np.stack(records).tofile(os.path.join(out, name))
  with open(os.path.join(out, 'batches.meta.txt'), 'w') as f:
    f.write('\n'.join(CIFAR_NAMES) + '\n\n')
  return out


def write_imagenet_folders(photos, rng):
  labels_path = tfds.core.tfds_path(
    'datasets/imagenet2012/validation_labels.txt'
  )
  val_labels = open(labels_path).read().split()[:NUM_VAL]
  classes = sorted(set(val_labels))
  out = os.path.join(OUT, 'imagenet')
  shutil.rmtree(out, ignore_errors=True)
  k = 0

  def save(path):
    nonlocal k
    h, w = SIZES[k % len(SIZES)]
    image = _crop(photos, rng, h, w)
    if k == 5:
      image = image.convert('L')  # ImageNet has grayscale JPEGs too.
    k += 1
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(_jpeg(image))

  for wnid in classes:
    for i in range(2):
      name = f'{wnid}_{900001 + i}.JPEG'
      assert name not in set(imagenet_builder.CMYK_IMAGES) | set(
        imagenet_builder.PNG_IMAGES
      )
      save(os.path.join(out, 'train', wnid, name))
  for i, wnid in enumerate(val_labels):
    save(os.path.join(out, 'val', wnid, f'ILSVRC2012_val_{i + 1:08d}.JPEG'))
  return out


def _imagenet_manual_dir(folders, manual):
  """ILSVRC2012_img_train.tar (a tar of per-class tars), ..._val.tar."""
  train = os.path.join(folders, 'train')
  with tarfile.open(os.path.join(manual, 'ILSVRC2012_img_train.tar'), 'w') as t:
    for wnid in sorted(os.listdir(train)):
      inner = os.path.join(manual, f'{wnid}.tar')
      with tarfile.open(inner, 'w') as c:
        for name in sorted(os.listdir(os.path.join(train, wnid))):
          c.add(os.path.join(train, wnid, name), arcname=name)
      t.add(inner, arcname=f'{wnid}.tar')
      os.remove(inner)
  val = os.path.join(folders, 'val')
  with tarfile.open(os.path.join(manual, 'ILSVRC2012_img_val.tar'), 'w') as t:
    for wnid in sorted(os.listdir(val)):
      for name in sorted(os.listdir(os.path.join(val, wnid))):
        t.add(os.path.join(val, wnid, name), arcname=name)


def build_imagenet_tfds(imagenet_dir, data_dir):
  with tempfile.TemporaryDirectory() as manual:
    _imagenet_manual_dir(imagenet_dir, manual)
    builder = tfds.builder(
      'imagenet2012', data_dir=data_dir, file_format='array_record'
    )
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        manual_dir=manual, compute_stats=tfds.download.ComputeStatsMode.SKIP
      )
    )


def build_tfds(cifar_dir, imagenet_dir):
  data_dir = os.path.join(OUT, 'tfds')
  shutil.rmtree(data_dir, ignore_errors=True)
  config = tfds.download.DownloadConfig(
    compute_stats=tfds.download.ComputeStatsMode.SKIP
  )
  # cifar10's builder downloads cifar-10-binary.tar.gz and extracts it: hand
  # it the directory holding the tiny cifar-10-batches-bin/ instead.
  original = tfds.download.DownloadManager.download_and_extract
  tfds.download.DownloadManager.download_and_extract = lambda self, url: (
    os.path.dirname(cifar_dir)
  )
  try:
    builder = tfds.builder(
      'cifar10', data_dir=data_dir, file_format='array_record'
    )
    builder.download_and_prepare(download_config=config)
  finally:
    tfds.download.DownloadManager.download_and_extract = original
  build_imagenet_tfds(imagenet_dir, data_dir)
  shutil.rmtree(os.path.join(data_dir, 'downloads'), ignore_errors=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--bench_tree')
  parser.add_argument('--bench_out')
  args = parser.parse_args()
  if args.bench_tree:
    build_imagenet_tfds(args.bench_tree, args.bench_out)
    return
  rng = np.random.default_rng(0)
  photos = _photos()
  cifar_dir = write_cifar_binary(photos, rng)
  imagenet_dir = write_imagenet_folders(photos, rng)
  build_tfds(cifar_dir, imagenet_dir)
  total = 0
  for dirpath, _, files in os.walk(OUT):
    for f in files:
      total += os.path.getsize(os.path.join(dirpath, f))
  print(f'wrote {OUT}: {total / 1e3:.0f} kB, tfds {tfds.__version__}')


if __name__ == '__main__':
  main()
