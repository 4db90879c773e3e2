"""Predictions for a directory of images, into a CSV (CAAD-style).

``python -m fdjax.main --mode=predict --config=... --workdir=MODEL_DIR
--image_dir=imgs/ --output_csv=out.csv`` classifies every png/jpg/jpeg file
of a directory with a workdir's newest checkpoint and writes one
``filename,label`` line per image.

Per-file faults are named: an image that does not decode stops the run with
its path, or, with ``skip_bad=True`` (``--skip_bad_images``), is skipped and
listed at the end. Rows are written as their batch is computed, so a crash
keeps what was done, and the CSV is opened before any work. Image modes:
8-bit and bilevel greyscale, RGB, palette, YCbCr and CMYK are converted to
RGB; 16- and 32-bit integer greyscale (``I;16``, ``I``) are scaled from
their full range (65535), not saturated; alpha (``RGBA``, ``LA``,
transparent palettes) is composited over white. Other modes (e.g. float
``F``) are refused by name.
"""

import csv
import os
from typing import Any

from absl import logging
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image

from fdjax import checkpoints
from fdjax import data
from fdjax import evaluate
from fdjax import parallel
from fdjax import preprocess

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
_TO_RGB = ('1', 'L', 'P', 'RGB', 'YCbCr', 'CMYK', 'LAB', 'HSV')
_WITH_ALPHA = ('RGBA', 'LA', 'PA', 'RGBa', 'La')
_INTEGER_GREY = {'I;16': 65535, 'I;16L': 65535, 'I;16B': 65535, 'I': 65535}
SUPPORTED_MODES = _TO_RGB + _WITH_ALPHA + tuple(_INTEGER_GREY)


class ImageError(ValueError):
  """A bad input file or output path of prediction (one line, names it)."""


class Predictions(dict):
  """{filename: class} with `skipped`: [(filename, reason)] not predicted."""

  skipped: list[tuple[str, str]]

  def __init__(self, *args, skipped=(), **kwargs):
    super().__init__(*args, **kwargs)
    self.skipped = list(skipped)


def load_image(path: str) -> np.ndarray:
  """An image file as [H, W, 3] RGB: uint8, or float32 in [0, 1] (16-bit).

  Args:
    path: a PNG or JPEG file.

  Returns:
    uint8 for 8-bit images; float32 in [0, 1] for 16/32-bit greyscale.

  Raises:
    ImageError: the file does not decode (truncated, not an image) or has
      an unsupported mode; the message names the path.

  Examples:
    >>> import tempfile
    >>> from PIL import Image
    >>> path = tempfile.mkdtemp() + '/grey16.png'
    >>> Image.fromarray(np.full((2, 2), 32768, np.uint16)).save(path)
    >>> image = load_image(path)
    >>> image.dtype, image.shape, round(float(image.max()), 3)
    (dtype('float32'), (2, 2, 3), 0.5)
  """
  try:
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      if mode == 'P' and 'transparency' in im.info:
        im, mode = im.convert('RGBA'), 'RGBA'
      if mode in _INTEGER_GREY:
        grey = np.asarray(im).astype(np.float32)
        top = _INTEGER_GREY[mode]
        if grey.min() < 0 or grey.max() > top:
          raise ValueError(
            f'{mode} values outside 0..{top} ({grey.min():g}..{grey.max():g})'
          )
        return np.repeat((grey / top)[:, :, None], 3, axis=-1)
      if mode in _WITH_ALPHA:
        rgba = np.asarray(im.convert('RGBA')).astype(np.float32) / 255.0
        alpha = rgba[:, :, 3:]
        rgb = rgba[:, :, :3] * alpha + (1.0 - alpha)  # Over white.
        return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
      if mode in _TO_RGB:
        return np.asarray(im.convert('RGB'))
      raise ValueError(
        f'image mode {mode!r} is not supported; valid: '
        f'{", ".join(SUPPORTED_MODES)}'
      )
  except ValueError as e:
    raise ImageError(f'{path}: {e}') from None
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    # PIL: UnidentifiedImageError, 'image file is truncated', ...
    raise ImageError(f'{path}: does not decode as an image ({e})') from None


def open_output(output_csv: str):
  """Opens the CSV for writing before any work (one line when it cannot).

  Raises:
    ImageError: `output_csv` is a directory or cannot be written.
  """
  if os.path.isdir(output_csv):
    raise ImageError(
      f'output_csv={output_csv!r} is a directory; valid: a file path.'
    )
  try:
    os.makedirs(os.path.dirname(os.path.abspath(output_csv)), exist_ok=True)
    return open(output_csv, 'w', newline='')
  except OSError as e:
    raise ImageError(
      f'output_csv={output_csv!r} cannot be written ({e.strerror or e}).'
    ) from None


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


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
    raise ImageError(f'image_dir={image_dir!r} is not a directory.')
  names = sorted(
    f
    for f in os.listdir(image_dir)
    if f.lower().endswith(IMAGE_EXTENSIONS)
    and os.path.isfile(os.path.join(image_dir, f))
  )
  if not names:
    raise ImageError(
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
  skip_bad: bool = False,
) -> Predictions:
  """Classifies every image of a directory into a CSV (CAAD-style).

  Each png/jpg/jpeg file is decoded to RGB (`load_image`) and given the
  ImageNet eval
  preprocessing of `fdjax.input_pipeline` (shorter side resized to
  `image_size / crop_fraction` with bicubic interpolation, central
  `image_size` square). The CSV has one line `filename,label` per image (no
  header), in file-name order, with the predicted class index, written
  batch by batch as the predictions are made.

  Args:
    model: a Flax module applied as `model.apply(variables, x, train=False)`.
    variables: its variables.
    image_dir: the directory of images.
    output_csv: the CSV file to write (process 0 writes).
    image_size: the model's input size.
    batch_size: images per step (rounded up to a multiple of the devices).
    crop_fraction: centre-crop fraction (224/256 as the original).
    mesh: devices to use (default: this process's devices).
    skip_bad: skip the files that do not decode (warned about one by one and
      listed at the end, in `Predictions.skipped`) instead of stopping.

  Returns:
    `Predictions`: {filename: predicted class}, and `skipped`.

  Raises:
    ValueError: no images, an invalid image_size/batch_size, an unwritable
      output_csv (before any work), or a file that does not decode (its
      path; unless skip_bad).

  Examples:
    >>> import tempfile
    >>> from PIL import Image
    >>> import jax.numpy as jnp
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
  if not _is_int(image_size) or image_size < 1:
    raise ValueError(f'image_size={image_size!r} must be a positive integer.')
  if not _is_int(batch_size) or batch_size < 1:
    raise ValueError(f'batch_size={batch_size!r} must be a positive integer.')
  names = list_images(image_dir)
  is_main = jax.process_index() == 0
  csv_file = open_output(output_csv) if is_main else None
  mesh = parallel.make_mesh(jax.local_devices()) if mesh is None else mesh
  num_devices = mesh.devices.size
  batch_size = -(-batch_size // num_devices) * num_devices
  dc = data.default_data_config('imagenet2012')
  dc.image_size = int(image_size)
  dc.eval_crop_fraction = float(crop_fraction)
  dc.image_dtype = 'float32'  # As the eval input: shares its compile.
  predict = evaluate.compiled(model, mesh, 2).predict
  replicated = parallel.replicate(
    jax.tree.map(np.asarray, jax.device_get(variables)), mesh
  )
  sharding = NamedSharding(mesh, P(parallel.AXIS))
  out = Predictions()
  try:
    writer = csv.writer(csv_file) if is_main else None
    for chunk, images, skipped in _batches(
      image_dir, names, batch_size, image_size, dc, skip_bad
    ):
      out.skipped.extend(skipped)
      if chunk:
        pred = predict(replicated, jax.device_put(images, sharding))
        for name, label in zip(chunk, np.asarray(pred)[: len(chunk)]):
          out[name] = int(label)
          if writer is not None:
            writer.writerow([name, int(label)])
        if csv_file is not None:
          csv_file.flush()
      logging.info('predicted %d/%d images', len(out), len(names))
  finally:
    if csv_file is not None:
      csv_file.close()
  if out.skipped:
    logging.warning(
      'Skipped %d of %d files that do not decode: %s',
      len(out.skipped),
      len(names),
      '; '.join(f'{n} ({r})' for n, r in out.skipped),
    )
  return out


def _batches(image_dir, names, batch_size, image_size, dc, skip_bad):
  """Yields (names, [batch_size, size, size, 3] images, skipped) batches."""
  chunk, skipped = [], []
  images = np.zeros((batch_size, image_size, image_size, 3), np.float32)
  for i, name in enumerate(names):
    try:
      rgb = load_image(os.path.join(image_dir, name))
    except ValueError as e:
      if not skip_bad:
        raise ImageError(
          f'{e} (pass --skip_bad_images to skip such files)'
        ) from None
      logging.warning('Skipping %s', e)
      skipped.append((name, str(e).split(': ', 1)[-1]))
    else:
      images[len(chunk)] = preprocess.preprocess_eval(dc, rgb)
      chunk.append(name)
    if len(chunk) == batch_size or i == len(names) - 1:
      yield chunk, images, skipped
      chunk, skipped = [], []
      images = np.zeros_like(images)


def run_predict(
  config: ml_collections.ConfigDict,
  workdir: str,
  image_dir: str,
  output_csv: str,
  *,
  skip_bad: bool = False,
) -> Predictions:
  """`--mode=predict`: a workdir's newest checkpoint on a directory of images.

  Args:
    config: an fdjax config (`data.image_size`, `data.eval_crop_fraction`,
      `eval.global_batch_size`; `model` when the checkpoint lacks meta).
    workdir: a directory with `checkpoints/`.
    image_dir: the images to classify.
    output_csv: the CSV to write (`filename,label` lines).
    skip_bad: skip (and list) the files that do not decode.

  Returns:
    `Predictions`: {filename: predicted class}, and `skipped`.
  """
  list_images(image_dir)  # Before loading the model: inputs, then output.
  open_output(output_csv).close()
  model, variables, _, _ = checkpoints.load_model(config, workdir)
  out = predict_directory(
    model,
    variables,
    image_dir,
    output_csv,
    image_size=config.data.image_size,
    batch_size=config.eval.global_batch_size,
    crop_fraction=config.data.get('eval_crop_fraction', 224 / 256),
    skip_bad=skip_bad,
  )
  return out
