"""Input-pipeline speed: `python -m fdjax.benchmark --mode=input`.

A benchmark, not a test. Prints

* the per-image cost of each stage of the ImageNet pipeline at 224x224 on
  one thread (JPEG decode, random-resized crop + bicubic resize, colour
  jitter, PCA lighting + flip + uint8; the eval resize with PIL and with the
  OpenCV reimplementation), which says what bounds the throughput;
* images/s of the ImageNet train and eval pipelines (`fdjax.input_pipeline`,
  the paper's augmentation) on the image-folder source and, given
  ``--input_tfds``, a tfds ArrayRecord source, with threads only and with 1
  and 2 grain worker processes (one thread each); the first batch (worker
  start) is not timed;
* the share of the quickstart's (configs/default.py) training-loop time
  spent waiting for the next batch, measured inside `fdjax.train.train`.

Without ``--input_folder`` it writes a tree of JPEGs like ImageNet's (crops
of scikit-learn's two sample photos at 500x375 and 375x500, quality 90;
ImageNet's average is about 400x350) to a temporary directory. A tfds copy of
such a tree needs TensorFlow to build: tests/reference/make_data_fixtures.py
--bench_tree=TREE --bench_out=DIR (then ``--input_tfds=DIR``).
"""

import contextlib
import importlib.util
import io
import os
import tempfile
import time
from typing import Any

import numpy as np
from PIL import Image

from fdjax import data
from fdjax import input_pipeline
from fdjax import preprocess
from fdjax import sources
from fdjax import train

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The first ImageNet classes (WordNet ids), so that tfds can build the tree.
_WNIDS = ('n01440764', 'n01443537', 'n01484850', 'n01491361')


def write_jpeg_tree(
  root: str,
  classes: int = len(_WNIDS),
  train_per_class: int = 24,
  val_per_class: int = 8,
) -> str:
  """Writes ROOT/{train,val}/CLASS/*.JPEG of ImageNet-like JPEGs."""
  from sklearn.datasets import load_sample_images  # Bundled photos.

  photos = load_sample_images().images
  rng = np.random.default_rng(0)
  k = 0
  for split, n in (('train', train_per_class), ('val', val_per_class)):
    for c in range(classes):
      wnid = _WNIDS[c]
      os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
      for i in range(n):
        photo = photos[k % len(photos)]
        w, h = (500, 375) if k % 3 else (375, 500)
        ch = int(rng.integers(300, photo.shape[0] + 1))
        cw = min(photo.shape[1], ch * w // h)
        top = int(rng.integers(0, photo.shape[0] - ch + 1))
        left = int(rng.integers(0, photo.shape[1] - cw + 1))
        crop = Image.fromarray(photo[top : top + ch, left : left + cw])
        name = (
          f'{wnid}_{i}.JPEG'
          if split == 'train'
          else f'ILSVRC2012_val_{k + 1:08d}.JPEG'
        )
        crop.resize((w, h), Image.Resampling.BICUBIC).save(
          os.path.join(root, split, wnid, name), quality=90
        )
        k += 1
  return root


def _per_image_ms(fn, items, repeats=2) -> float:
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    for item in items:
      fn(item)
    best = min(best, time.perf_counter() - start)
  return 1e3 * best / len(items)


def stage_costs(root: str, size: int = 224, n: int = 24) -> list[tuple]:
  """(stage, ms per image) on one thread, over n images of the tree."""
  src = sources.FolderSource(root, 'train')
  raw = []
  for i in range(min(n, len(src))):
    with open(src.path(i), 'rb') as f:
      raw.append(f.read())
  images = [np.asarray(Image.open(io.BytesIO(r)).convert('RGB')) for r in raw]
  rngs = [np.random.default_rng((0, i)) for i in range(len(images))]
  boxes = [
    preprocess._random_resized_crop_box(*im.shape[:2], rng, 0.08)
    for im, rng in zip(images, rngs)
  ]
  crops = [
    np.asarray(
      Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC, box=b),
      np.float32,
    )
    for im, b in zip(images, boxes)
  ]
  cfg = data.default_data_config('imagenet2012')
  cfg.image_size = size
  train_fn = preprocess.train_fn(cfg)
  rows = [
    (
      'JPEG decode (PIL, full size)',
      _per_image_ms(
        lambda r: np.asarray(Image.open(io.BytesIO(r)).convert('RGB')), raw
      ),
    ),
    (
      'random-resized crop + bicubic resize',
      _per_image_ms(
        lambda ib: Image.fromarray(ib[0]).resize(
          (size, size), Image.Resampling.BICUBIC, box=ib[1]
        ),
        list(zip(images, boxes)),
      ),
    ),
    (
      'colour jitter (3 ops, float32)',
      _per_image_ms(
        lambda c: preprocess._color_jitter(c, np.random.default_rng(0), 0.4),
        crops,
      ),
    ),
    (
      'PCA lighting + flip + uint8',
      _per_image_ms(
        lambda c: preprocess._to_uint8(
          preprocess._pca_lighting(c, np.random.default_rng(0), 0.1)[:, ::-1]
        ),
        crops,
      ),
    ),
    (
      'train augmentation, all of it (no decode)',
      _per_image_ms(lambda im: train_fn(im, np.random.default_rng(0)), images),
    ),
  ]
  for resize in preprocess.EVAL_RESIZES:
    cfg.eval_resize = resize
    fn = preprocess.eval_fn(cfg)
    rows.append(
      (f'eval resize 256 + crop 224 ({resize})', _per_image_ms(fn, images))
    )
  return rows


class Cycled:
  """The examples of ``source`` cycled to ``length`` (picklable)."""

  def __init__(self, source, length: int):
    self.source, self.length = source, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int):
    return self.source[int(index) % len(self.source)]


def pipeline_rate(
  source: str,
  data_dir: str,
  pipeline: str,
  processes: int,
  *,
  size: int = 224,
  batch: int = 32,
  batches: int = 8,
) -> float:
  """Images/s of one pipeline after its first batch."""
  cfg = data.default_data_config('imagenet2012')
  cfg.source, cfg.data_dir, cfg.image_size = source, data_dir, size
  cfg.worker_processes = processes
  cfg.num_workers = 1 if processes else 2
  cfg.prefetch = 2
  kw = dict(global_batch_size=batch, process_index=0, process_count=1)
  if pipeline == 'train':
    it = input_pipeline.create_train_iter(cfg, seed=0, **kw)
  else:
    # Eval visits the split once: cycle it to time more than one pass.
    source = Cycled(data.get_source(cfg, cfg.eval_split), batch * (batches + 1))
    it = input_pipeline.create_eval_iter(cfg, source=source, **kw)
  next(it)
  start = time.perf_counter()
  count = 0
  for _ in range(batches):
    b = next(it, None)
    if b is None:
      break
    count += len(b['label'])
  rate = count / (time.perf_counter() - start)
  with contextlib.suppress(AttributeError):
    it.close()
  return rate


@contextlib.contextmanager
def _timed_train_iter(waits: list):
  original = input_pipeline.create_train_iter

  def wrapped(*args, **kwargs):
    it = original(*args, **kwargs)

    class Timed:
      def __iter__(self):
        return self

      def __next__(self):
        start = time.perf_counter()
        try:
          return next(it)
        finally:
          waits.append((start, time.perf_counter() - start))

    return Timed()

  input_pipeline.create_train_iter = wrapped
  try:
    yield
  finally:
    input_pipeline.create_train_iter = original


def quickstart_wait_share(num_steps: int = 40) -> dict[str, Any]:
  """Waiting for input in the quickstart's training loop (after 2 steps)."""
  spec = importlib.util.spec_from_file_location(
    'default_config', os.path.join(_ROOT, 'configs', 'default.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.train.num_steps = num_steps
  config.train.checkpoint_every_steps = 10 * num_steps
  waits = []
  with tempfile.TemporaryDirectory() as workdir, _timed_train_iter(waits):
    train.train(config, workdir)
  # waits[k] is the call fetching batch k; the loop time from call 2 to the
  # last call spans steps 2..n-2, their waits are calls 3..n-1.
  starts = np.array([s for s, _ in waits])
  durations = np.array([d for _, d in waits])
  span = starts[-1] - starts[2]
  return {
    'steps_timed': len(waits) - 3,
    'batch': config.train.global_batch_size,
    'loop_s_per_step': span / (len(waits) - 3),
    'wait_s_per_step': durations[3:].sum() / (len(waits) - 3),
    'wait_share': durations[3:].sum() / span,
  }


def run(
  folder: str | None, tfds_dir: str | None, batch: int, batches: int
) -> str:
  """Runs the whole input benchmark and returns its report."""
  lines = []
  with tempfile.TemporaryDirectory() as tmp:
    if not folder:
      folder = write_jpeg_tree(os.path.join(tmp, 'tree'))
      lines.append(f'(a generated JPEG tree: {folder})')
    lines.append('\n== input: per-image cost on one thread, 224x224 ==')
    for stage, ms in stage_costs(folder):
      lines.append(f'{stage:44s} {ms:7.2f} ms')
    print('\n'.join(lines), flush=True)
    lines.append('\n== input: pipeline images/s, 224x224 ==')
    lines.append('source  pipeline  workers            img/s')
    targets = [('folder', folder)] + ([('tfds', tfds_dir)] if tfds_dir else [])
    for source, data_dir in targets:
      for pipeline in ('train', 'eval'):
        for processes in (0, 1, 2):
          rate = pipeline_rate(
            source, data_dir, pipeline, processes, batch=batch, batches=batches
          )
          who = f'{processes} proc x 1 thread' if processes else '2 threads'
          lines.append(f'{source:7s} {pipeline:9s} {who:17s} {rate:7.1f}')
          print(lines[-1], flush=True)
    if not tfds_dir:
      lines.append('(no --input_tfds: tfds rows skipped)')
  share = quickstart_wait_share()
  lines.append('\n== input: quickstart (configs/default.py) training loop ==')
  lines.append(
    f'{share["steps_timed"]} steps of batch {share["batch"]}: '
    f'{share["loop_s_per_step"] * 1e3:.1f} ms/step, waiting for input '
    f'{share["wait_s_per_step"] * 1e3:.2f} ms/step = '
    f'{100 * share["wait_share"]:.2f}% of the loop'
  )
  return '\n'.join(lines)
