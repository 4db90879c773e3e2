"""Image operations of the input pipeline (numpy and PIL, per example).

The training augmentation and the evaluation preprocessing of each dataset
(docs/data.md): for digits and CIFAR-10 a resize to ``image_size``, then a
random translation and flip; for ImageNet the paper's random-resized crop,
colour jitter, PCA lighting and flip, and the resize-then-centre-crop eval.
The augmentation of one example draws only from the generator it is given.
"""

from collections.abc import Callable
import functools
import math

import ml_collections
import numpy as np
from PIL import Image

RESIZE_METHODS = ('nearest', 'bilinear', 'bicubic')
# ImageNet eval resize: PIL's bicubic (antialiased: its kernel widens with
# the downscale factor) or OpenCV's cv2.INTER_CUBIC (fixed 4-tap kernel,
# A = -0.75), which the original used; 'cv2' is an exact numpy
# reimplementation of the latter (docs/data.md), OpenCV is not needed.
EVAL_RESIZES = ('pil', 'cv2')
_PIL_RESAMPLE = {
  'nearest': Image.Resampling.NEAREST,
  'bilinear': Image.Resampling.BILINEAR,
  'bicubic': Image.Resampling.BICUBIC,
}

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
    >>> from fdjax.data import default_data_config
    >>> cfg = default_data_config('cifar10')
    >>> img = np.full((32, 32, 3), 200, np.uint8)
    >>> out = preprocess_train(cfg, img, np.random.default_rng(0))
    >>> out.shape, out.dtype, float(out.max())
    ((32, 32, 3), dtype('float32'), 0.78...)
  """
  return train_fn(data_config)(image, rng)


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
    >>> from fdjax.data import default_data_config
    >>> cfg = default_data_config('imagenet2012')
    >>> preprocess_eval(cfg, np.zeros((300, 500, 3), np.uint8)).shape
    (224, 224, 3)
  """
  return eval_fn(data_config)(image)


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


def resize_float(image: np.ndarray, size: int, method: str) -> np.ndarray:
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
      # The mean grey level = the luma of the mean colour (one reduction).
      grey_mean = np.float32(image.reshape(-1, 3).mean(axis=0) @ _LUMA)
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
    image = _to_uint8(to_unit_float(image) * 255.0)
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


def _cv2_cubic_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
  """OpenCV's INTER_CUBIC taps along one axis: indices [dst, 4], int weights.

  As imgproc/src/resize.cpp: source coordinate ``(d + 0.5) * scale - 0.5``
  in float32, Keys' cubic with A = -0.75 in float32, weights rounded to
  multiples of 1/2048 (int16), indices clamped (border replicate).
  """
  scale = 1.0 / (dst / src)
  fx = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
  sx = np.floor(fx)
  x = fx - sx
  a, one = np.float32(-0.75), np.float32(1)
  x1 = x + one
  c0 = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a
  c1 = ((a + 2) * x - (a + 3)) * x * x + one
  c2 = ((a + 2) * (one - x) - (a + 3)) * (one - x) * (one - x) + one
  c3 = one - c0 - c1 - c2
  coeffs = np.stack([c0, c1, c2, c3], axis=-1).astype(np.float32)
  weights = np.rint(coeffs * np.float32(2048)).astype(np.int64)
  index = sx.astype(np.int64)[:, None] + np.arange(-1, 3)
  return np.clip(index, 0, src - 1), weights


def resize_cv2_bicubic(
  image: np.ndarray,
  width: int,
  height: int,
  crop: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
  """``cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)``.

  An exact numpy reimplementation of OpenCV's uint8 path as its portable
  build runs it (``cv2.setUseOptimized(False)``): rows first with integer
  weights in 1/2048, then columns with OpenCV's 128-bit vector loop in
  float32 (``((S3*b3 + S2*b2) + S1*b1) + S0*b0``, rounded half to even) and
  its scalar fixed-point loop (shift by 22) for the last ``W*C mod 8``
  values of each row. The integer sums are exact in float32 (below 2**24).
  Checked against cv2 in tests/test_sources.py. With OpenCV's optimised
  paths (IPP, AVX2; on by default) a few percent of the values come out one
  level apart (docs/data.md).

  Args:
    image: uint8 ``[H, W, C]``.
    width, height: the output size.
    crop: ``(top, left, crop_height, crop_width)``: compute only this window
      of the output (each output pixel depends only on its own taps).

  Returns:
    uint8 ``[height, width, C]``, or the crop window of it.
  """
  channels = image.shape[2]
  top, left, out_h, out_w = crop or (0, 0, height, width)
  if image.shape[:2] == (height, width):
    return image[top : top + out_h, left : left + out_w].copy()
  xi, xw = _cv2_cubic_taps(image.shape[1], width)
  yi, yw = _cv2_cubic_taps(image.shape[0], height)
  xi, xw = xi[left : left + out_w], xw[left : left + out_w]
  yi, yw = yi[top : top + out_h], yw[top : top + out_h]
  src = image.astype(np.float32)
  weights = xw.astype(np.float32)[:, :, None]
  rows = src[:, xi[:, 0]] * weights[:, 0]
  for k in (1, 2, 3):
    rows += src[:, xi[:, k]] * weights[:, k]
  rows = rows.reshape(rows.shape[0], -1)  # [H, out_w * C], exact integers
  beta = yw.astype(np.float32) * np.float32(1 / (2048 * 2048))
  out = rows[yi[:, 3]] * beta[:, 3:4]
  for k in (2, 1, 0):
    out += rows[yi[:, k]] * beta[:, k : k + 1]
  out = np.rint(out)
  # Values past the last full 8-wide vector of an output row: fixed point.
  column = (left + np.arange(out_w))[:, None] * channels + np.arange(channels)
  tail = np.flatnonzero(column.reshape(-1) >= width * channels // 8 * 8)
  if tail.size:
    taps = rows[:, tail].astype(np.int64)[yi]  # [out_h, 4, tail]
    fixed = np.einsum('hkw,hk->hw', taps, yw)
    out[:, tail] = (fixed + (1 << 21)) >> 22
  out = np.clip(out, 0, 255).astype(np.uint8)
  return out.reshape(out_h, out_w, channels)


def _imagenet_eval(
  image: np.ndarray,
  *,
  size: int,
  crop_fraction: float,
  dtype: np.dtype,
  resize: str = 'pil',
) -> np.ndarray:
  """Resizes the shorter side to size / crop_fraction, then centre-crops."""
  image = _as_rgb(image)
  if image.dtype != np.uint8:
    image = _to_uint8(to_unit_float(image) * 255.0)
  h, w = image.shape[:2]
  short = int(round(size / crop_fraction))
  scale = short / min(h, w)
  new_w = max(size, int(round(w * scale)))
  new_h = max(size, int(round(h * scale)))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  if resize == 'cv2':
    out = resize_cv2_bicubic(image, new_w, new_h, (top, left, size, size))
  else:
    resized = Image.fromarray(image).resize(
      (new_w, new_h), Image.Resampling.BICUBIC
    )
    out = np.asarray(resized)[top : top + size, left : left + size]
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
  image = resize_float(to_unit_float(_as_rgb(image)), size, method)
  image = _pad_crop_flip(image, rng, padding, flip)
  return _from_float01(np.ascontiguousarray(image), dtype)


def _small_eval(
  image: np.ndarray, *, size: int, method: str, dtype: np.dtype
) -> np.ndarray:
  image = resize_float(to_unit_float(_as_rgb(image)), size, method)
  return _from_float01(np.ascontiguousarray(image), dtype)


def train_fn(
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


def eval_fn(c: ml_collections.ConfigDict) -> Callable[..., np.ndarray]:
  dtype = np.dtype(c.image_dtype)
  if c.name == 'imagenet2012':
    fn = functools.partial(
      _imagenet_eval,
      size=c.image_size,
      crop_fraction=c.eval_crop_fraction,
      dtype=dtype,
      resize=c.get('eval_resize', 'pil'),
    )
  else:
    fn = functools.partial(
      _small_eval, size=c.image_size, method=c.resize_method, dtype=dtype
    )
  # Same call signature as the train transform; eval ignores the rng.
  return lambda image, rng=None: fn(image)


def to_unit_float(images):
  """uint8 [0, 255] or float [0, 1] images -> float32 in [0, 1].

  Works on numpy and JAX arrays alike (``astype`` and a division only), so
  the host pipeline and the jitted step functions share it.

  Examples:
    >>> to_unit_float(np.array([0, 255], np.uint8)).tolist()
    [0.0, 1.0]
  """
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(255.0)
  return images.astype(np.float32)
