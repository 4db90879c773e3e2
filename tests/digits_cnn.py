"""A small CNN on scikit-learn's digits, for timing AutoAttack against the
reference on a model whose attack steps cost more than a tiny MLP's.

Two 3x3 convolutions (16 and 32 channels, ReLU, 2x2 average pooling) and a
dense layer, on the digits of `digits_mlp.data()`. The weights are
committed (`weights`); `train_weights` is the short Adam fit (in JAX) that
made them. Convolution kernels are HWIO (NHWC images); a framework with
NCHW images transposes them to OIHW and flattens the last feature map in
HWC order.
"""

import functools
import os

import numpy as np

WEIGHTS_FILE = os.path.join(
  os.path.dirname(os.path.abspath(__file__)),
  'data',
  'autoattack',
  'digits_cnn_weights.npz',
)
NAMES = ('c1', 'b1', 'c2', 'b2', 'w3', 'b3')


@functools.cache
def weights() -> dict[str, np.ndarray]:
  """{'c1' [3,3,1,16], 'b1', 'c2' [3,3,16,32], 'b2', 'w3' [128,10], 'b3'}."""
  with np.load(WEIGHTS_FILE) as f:
    return {k: f[k] for k in NAMES}


def logits_fn(w, conv_impl: str = 'matmul'):
  """x [N, 8, 8, 1] -> logits [N, 10] in JAX.

  conv_impl: 'matmul' (`fdjax.layers.conv_as_matmul`, how fdjax's models
  compute convolutions on CPU) or 'xla' (`lax.conv_general_dilated`).
  """
  import jax  # The reference's venv has no JAX.
  import jax.numpy as jnp

  from fdjax import layers

  def conv(x, k, b):
    if conv_impl == 'matmul':
      y = layers.conv_as_matmul(x, k)
    else:
      y = jax.lax.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )
    return jnp.maximum(y + b, 0.0)

  def pool(x):
    n, h, wd, c = x.shape
    return x.reshape(n, h // 2, 2, wd // 2, 2, c).mean(axis=(2, 4))

  def fn(x):
    h = pool(conv(x, w['c1'], w['b1']))
    h = pool(conv(h, w['c2'], w['b2']))
    return h.reshape(h.shape[0], -1) @ w['w3'] + w['b3']

  return fn


def train_weights(steps: int = 400, seed: int = 0) -> dict[str, np.ndarray]:
  """The Adam fit that produced `weights()` (full-batch, 1,500 digits)."""
  import digits_mlp
  import jax
  import jax.numpy as jnp
  import optax

  x, y, _, _ = digits_mlp.data()
  keys = jax.random.split(jax.random.key(seed), 3)
  w = {
    'c1': jax.random.normal(keys[0], (3, 3, 1, 16)) * (2 / 9) ** 0.5,
    'b1': jnp.zeros(16),
    'c2': jax.random.normal(keys[1], (3, 3, 16, 32)) * (2 / 144) ** 0.5,
    'b2': jnp.zeros(32),
    'w3': jax.random.normal(keys[2], (128, 10)) * (1 / 128) ** 0.5,
    'b3': jnp.zeros(10),
  }
  tx = optax.adam(3e-3)
  opt = tx.init(w)

  def loss(w):
    logits = logits_fn(w, 'xla')(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(w, opt):
    g = jax.grad(loss)(w)
    updates, opt = tx.update(g, opt)
    return optax.apply_updates(w, updates), opt

  for _ in range(steps):
    w, opt = step(w, opt)
  return {k: np.asarray(v, np.float32) for k, v in w.items()}
