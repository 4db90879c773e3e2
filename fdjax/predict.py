"""Predictions for a directory of images, into a CSV (CAAD-style).

``python -m fdjax.main --mode=predict --config=... --workdir=MODEL_DIR
--image_dir=imgs/ --output_csv=out.csv`` classifies every png/jpg/jpeg file
of a directory with a workdir's newest checkpoint and writes one
``filename,label`` line per image.
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
  labels = []
  for start in range(0, len(names), batch_size):
    chunk = names[start : start + batch_size]
    images = np.zeros((batch_size, image_size, image_size, 3), np.float32)
    for i, name in enumerate(chunk):
      with Image.open(os.path.join(image_dir, name)) as im:
        rgb = np.asarray(im.convert('RGB'))
      images[i] = preprocess.preprocess_eval(dc, rgb)
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
  model, variables, _, _ = checkpoints.load_model(config, workdir)
  out = predict_directory(
    model,
    variables,
    image_dir,
    output_csv,
    image_size=config.data.image_size,
    batch_size=config.eval.global_batch_size,
    crop_fraction=config.data.get('eval_crop_fraction', 224 / 256),
  )
  return out
