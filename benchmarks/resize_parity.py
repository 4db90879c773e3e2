"""How much the ImageNet eval resize matters: PIL bicubic vs OpenCV's.

  python benchmarks/resize_parity.py [--arch=ResNetDenoise --depth=50]

The original evaluated with tensorpack's ResizeShortestEdge(256,
cv2.INTER_CUBIC) then a 224 centre crop; fdjax's ``data.eval_resize``
chooses PIL's bicubic ('pil') or the exact reimplementation of OpenCV's
('cv2', `fdjax.preprocess.resize_cv2_bicubic`). On the two photos
scikit-learn ships (china.jpg, flower.jpg, 427x640) this prints the pixel
statistics of the difference of the two 224x224 eval images (0..255 scale)
and the logits of a converted model with deterministic synthetic weights
(tests/tensorpack_weights.py, the original release's variable layout, via
`fdjax.convert.convert_variables`) on both: the largest logit difference,
relative to the spread of the logits, whether the top-1 / top-5 agree, and
the logit change of the resize relative to the change between the photos
(random weights make a network far less input-sensitive than a trained one,
so read the logit figures as a lower bound).
"""

import argparse
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_sample_images

from fdjax import convert
from fdjax import data
from fdjax import models
from fdjax import preprocess

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
import tensorpack_weights  # noqa: E402


def eval_images(image, size=224):
  cfg = data.default_data_config('imagenet2012')
  cfg.image_size = size
  out = {}
  for resize in preprocess.EVAL_RESIZES:
    cfg.eval_resize = resize
    out[resize] = preprocess.preprocess_eval(cfg, image)
  return out


def pixel_stats(a, b):
  d = a.astype(np.float64) - b.astype(np.float64)
  rms = np.sqrt(np.mean(d**2))
  return {
    'mean_abs': np.abs(d).mean(),
    'rms': rms,
    'max_abs': np.abs(d).max(),
    'frac_differ': (d != 0).mean(),
    'frac_gt_4': (np.abs(d) > 4).mean(),
    'psnr_db': 20 * np.log10(255 / rms),
  }


def synthetic_model(arch, depth):
  model = models.create_model(**convert.model_settings(arch, depth))
  abstract = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )
  shapes = {
    convert.tensorpack_name(path): leaf.shape
    for path, leaf in flax.traverse_util.flatten_dict(abstract).items()
  }
  arrays = tensorpack_weights.synthetic_weights(shapes)
  return model, convert.convert_variables(arrays, model)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--arch', default='ResNetDenoise')
  parser.add_argument('--depth', type=int, default=50)
  args = parser.parse_args()
  names = ('china.jpg', 'flower.jpg')
  photos = load_sample_images().images
  batches = {r: [] for r in preprocess.EVAL_RESIZES}
  print('pixels, 0..255, PIL bicubic vs OpenCV INTER_CUBIC, 224x224 eval:')
  for name, photo in zip(names, photos):
    images = eval_images(photo)
    stats = pixel_stats(images['pil'], images['cv2'])
    print(
      f'  {name} {photo.shape}: '
      + ', '.join(f'{k} {v:.4g}' for k, v in stats.items())
    )
    for r, im in images.items():
      batches[r].append(im)
  model, variables = synthetic_model(args.arch, args.depth)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  logits = {
    r: np.asarray(apply(variables, jnp.asarray(np.stack(b))), np.float64)
    for r, b in batches.items()
  }
  print(f'logits of {args.arch}-{args.depth} with synthetic converted weights:')
  for i, name in enumerate(names):
    a, b = logits['pil'][i], logits['cv2'][i]
    d = np.abs(a - b)
    top5 = lambda x: set(np.argsort(-x)[:5])
    print(
      f'  {name}: max |dlogit| {d.max():.4g}, mean {d.mean():.4g}, logit '
      f'std {a.std():.4g} (max/std {d.max() / a.std():.3g}); top-1 '
      f'{int(a.argmax())} vs {int(b.argmax())}; top-5 overlap '
      f'{len(top5(a) & top5(b))}/5; softmax L1 '
      f'{np.abs(jax.nn.softmax(a) - jax.nn.softmax(b)).sum():.3g}'
    )
  # A random network is far less input-sensitive than a trained one: scale
  # by how far apart its logits of two different photos are.
  between = np.abs(logits['cv2'][0] - logits['cv2'][1]).mean()
  within = np.abs(logits['cv2'] - logits['pil']).mean(axis=1)
  print(
    '  mean |dlogit| resize / between the two photos: '
    + ', '.join(f'{n} {w / between:.3g}' for n, w in zip(names, within))
  )


if __name__ == '__main__':
  main()
