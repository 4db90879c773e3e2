"""A small MLP on scikit-learn's digits, for checks against reference code.

The same weights run in fdjax (`logits_fn`) and in any other framework
(`weights()` returns plain numpy arrays), so attacks can be compared with a
reference implementation on identical models and examples. Training is
scikit-learn's deterministic L-BFGS, about a second on one core.

Images are [N, 8, 8, 1] float32 in [0, 1] (NHWC; with one channel the
flattening order is the same as NCHW's).
"""

import functools

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


@functools.cache
def weights(hidden: int = 32) -> dict[str, np.ndarray]:
  """{'w1' [64, hidden], 'b1', 'w2' [hidden, 10], 'b2'} float32."""
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
