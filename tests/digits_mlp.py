"""A small MLP on scikit-learn's digits, for checks against reference code.

The same weights run in fdjax (`logits_fn`) and in any other framework
(`weights()` returns plain numpy arrays), so attacks can be compared with a
reference implementation on identical models and examples. The weights
are committed (`weights`); `train_weights` is the scikit-learn L-BFGS fit
that made them.

Images are [N, 8, 8, 1] float32 in [0, 1] (NHWC; with one channel the
flattening order is the same as NCHW's).
"""

import functools
import os

import numpy as np


@functools.cache
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(x_train, y_train, x_test, y_test): 1,500 / 297 digits in [0, 1]."""
  from sklearn.datasets import load_digits

  d = load_digits()
  x = (d.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm], y[perm]
  return x[:1500], y[:1500], x[1500:], y[1500:]


WEIGHTS_FILE = os.path.join(
  os.path.dirname(os.path.abspath(__file__)),
  'data',
  'autoattack',
  'digits_mlp_weights.npz',
)


@functools.cache
def weights() -> dict[str, np.ndarray]:
  """{'w1' [64, 32], 'b1', 'w2' [32, 10], 'b2'} float32, as committed.

  The fit itself (`train_weights`) depends on the BLAS thread count (about
  1e-2 between one and two threads), so the weights the reference outputs
  were computed with are committed and loaded here.
  """
  with np.load(WEIGHTS_FILE) as f:
    return {k: f[k] for k in ('w1', 'b1', 'w2', 'b2')}


def train_weights(hidden: int = 32) -> dict[str, np.ndarray]:
  """The scikit-learn fit that produced `weights()` (on two BLAS threads)."""
  from sklearn.neural_network import MLPClassifier

  x, y, _, _ = data()
  clf = MLPClassifier(
    hidden_layer_sizes=(hidden,),
    solver='lbfgs',
    alpha=1e-3,
    max_iter=300,
    random_state=0,
  )
  clf.fit(x.reshape(len(x), -1), y)
  w1, w2 = clf.coefs_
  b1, b2 = clf.intercepts_
  return {
    k: np.asarray(v, np.float32)
    for k, v in dict(w1=w1, b1=b1, w2=w2, b2=b2).items()
  }


def logits_fn(w: dict[str, np.ndarray]):
  """x [N, 8, 8, 1] -> logits [N, 10] in JAX."""
  import jax.numpy as jnp  # The reference's venv has no JAX.

  def fn(x):
    h = jnp.maximum(x.reshape(x.shape[0], -1) @ w['w1'] + w['b1'], 0.0)
    return h @ w['w2'] + w['b2']

  return fn
