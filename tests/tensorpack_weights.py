"""Deterministic synthetic weights in the original release's npz layout.

Shared by `test_convert.py` and the (uncommitted) script that ran the
original TensorFlow/tensorpack code to make `tests/data/*.npz`. Numpy only,
so that both environments can import it.
"""

import zlib

import numpy as np


def synthetic_weight(
  name: str, shape: tuple[int, ...], seed: int = 0
) -> np.ndarray:
  """One float32 array for the tensorpack variable `name`.

  The values depend only on (seed, name, shape), never on which other
  variables exist, and are scaled so that a randomly weighted deep network
  keeps finite, non-degenerate activations in inference mode:

  * conv kernels `.../W` [kh, kw, in, out]: N(0, 2 / (kh * kw * out)) (the
    original's variance-scaling(2, fan_out) initialiser), except the
    non-local embeddings `embedding_theta|phi/W`: N(0, 1 / (kh * kw * in)),
    so that the Gaussian affinities are neither uniform nor one-hot;
  * `linear/W`: N(0, 0.01^2); `linear/b`: N(0, 0.1^2);
  * BatchNorm gamma and moving variance U(0.5, 1.5), beta and moving mean
    N(0, 0.1^2); but the gamma of the last BN of every residual branch
    (`conv3/bn`, the original initialises it to zero) and of every denoising
    block (`.../conv/bn`) U(0.1, 0.5), so that activations do not grow by
    a constant factor per block, and U(0.1, 0.5) / C for the C-channel
    blocks `non_local/conv/bn` of ResNeXtDenoiseAll (their dot product
    without embedding is cubic in the features and sums over C channels).

  Args:
    name: the variable's name without ':0', e.g. 'conv0/bn/gamma'.
    shape: its shape.
    seed: an int selecting the draw.

  Returns:
    A float32 array of `shape`.

  Raises:
    ValueError: a name of none of the kinds above.

  Examples:
    >>> synthetic_weight('linear/b', (3,)).dtype
    dtype('float32')
    >>> bool((synthetic_weight('conv0/bn/gamma', (64,)) >= 0.5).all())
    True
  """
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  shape = tuple(int(s) for s in shape)
  # float32 draws: a ResNeXt-101 has 127M values.
  normal = lambda std: rng.standard_normal(shape, np.float32) * np.float32(std)
  uniform = lambda lo, hi: (
    rng.random(shape, np.float32) * np.float32(hi - lo) + np.float32(lo)
  )
  if name == 'linear/W':
    x = normal(0.01)
  elif name == 'linear/b':
    x = normal(0.1)
  elif name.endswith(('/embedding_theta/W', '/embedding_phi/W')):
    x = normal(np.sqrt(1.0 / (shape[0] * shape[1] * shape[2])))
  elif name.endswith('/W') and len(shape) == 4:
    x = normal(np.sqrt(2.0 / (shape[0] * shape[1] * shape[3])))
  elif name.endswith('/non_local/conv/bn/gamma'):
    x = uniform(0.1, 0.5) / np.float32(shape[0])
  elif name.endswith(('/conv3/bn/gamma', '/conv/bn/gamma')):
    x = uniform(0.1, 0.5)
  elif name.endswith(('/bn/gamma', '/bn/variance/EMA')):
    x = uniform(0.5, 1.5)
  elif name.endswith(('/bn/beta', '/bn/mean/EMA')):
    x = normal(0.1)
  else:
    raise ValueError(f'no synthetic recipe for variable {name!r} {shape}')
  return np.asarray(x, np.float32)


def synthetic_weights(
  shapes: dict[str, tuple[int, ...]], seed: int = 0
) -> dict[str, np.ndarray]:
  """`synthetic_weight` for every (name, shape) of `shapes`.

  Args:
    shapes: variable name (without ':0') -> shape.
    seed: an int selecting the draw.

  Returns:
    name -> float32 array.

  Examples:
    >>> w = synthetic_weights({'linear/W': (4, 2), 'linear/b': (2,)})
    >>> sorted(w), w['linear/W'].shape
    (['linear/W', 'linear/b'], (4, 2))
  """
  return {
    name: synthetic_weight(name, shape, seed)
    for name, shape in sorted(shapes.items())
  }
