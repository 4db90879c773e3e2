"""Tests of fdjax.denoise against independent float64 numpy/scipy references.

Run ``python tests/test_denoise.py`` to print each op's largest error against
its reference in bfloat16, float32 and float64.
"""

import itertools
import math

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
import scipy.ndimage

from fdjax import denoise

# --------------------------------------------------------------------------
# float64 references, written with plain loops (and scipy for the median).
# --------------------------------------------------------------------------


def _softmax(z):
  z = z - z.max()
  e = np.exp(z)
  return e / e.sum()


def ref_non_local(x, affinity, theta=None, phi=None):
  x = np.asarray(x, np.float64)
  theta = x if theta is None else np.asarray(theta, np.float64)
  phi = x if phi is None else np.asarray(phi, np.float64)
  n, h, w, c = x.shape
  d = theta.shape[-1]
  positions = list(itertools.product(range(h), range(w)))
  y = np.zeros_like(x)
  for b in range(n):
    for i in positions:
      s = np.array([np.dot(theta[b][i], phi[b][j]) for j in positions])
      if affinity == 'gaussian':
        f = _softmax(s / math.sqrt(d))
      else:
        f = s / (h * w)
      for weight, j in zip(f, positions):
        y[b][i] += weight * x[b][j]
  return y


def _window(i, j, h, w, size):
  r = size // 2
  return [
    (a, b)
    for a in range(i - r, i + r + 1)
    for b in range(j - r, j + r + 1)
    if 0 <= a < h and 0 <= b < w
  ]


def ref_bilateral(x, size, theta=None, phi=None):
  x = np.asarray(x, np.float64)
  theta = x if theta is None else np.asarray(theta, np.float64)
  phi = x if phi is None else np.asarray(phi, np.float64)
  n, h, w, c = x.shape
  d = theta.shape[-1]
  y = np.zeros_like(x)
  for b, i, j in itertools.product(range(n), range(h), range(w)):
    window = _window(i, j, h, w, size)
    s = np.array([np.dot(theta[b, i, j], phi[b, a, e]) for a, e in window])
    f = _softmax(s / math.sqrt(d))
    for weight, (a, e) in zip(f, window):
      y[b, i, j] += weight * x[b, a, e]
  return y


def ref_mean(x, size):
  x = np.asarray(x, np.float64)
  n, h, w, c = x.shape
  y = np.zeros_like(x)
  for b, i, j in itertools.product(range(n), range(h), range(w)):
    window = _window(i, j, h, w, size)
    y[b, i, j] = sum(x[b, a, e] for a, e in window) / len(window)
  return y


def ref_median(x, size):
  return scipy.ndimage.median_filter(
    np.asarray(x, np.float64), size=(1, size, size, 1), mode='reflect'
  )


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------

_TOL = {
  'float32': dict(rtol=2e-5, atol=2e-5),
  'float64': dict(rtol=1e-11, atol=1e-11),
}


def _normal(seed, shape):
  return np.random.default_rng(seed).normal(size=shape)


def _inputs(shape, d):
  """x, and theta/phi of width d (None: no embedding) as float64 numpy."""
  x = _normal(0, shape)
  if d is None:
    return x, None, None
  return x, _normal(1, shape[:-1] + (d,)), _normal(2, shape[:-1] + (d,))


def _jit_apply(dtype, fn, x, theta=None, phi=None):
  """Runs fn under jit in `dtype` (float64 with x64 on); numpy float64 out."""
  with jax.enable_x64(dtype == 'float64'):
    cast = lambda a: None if a is None else jnp.asarray(a, dtype)
    y = jax.jit(fn)(cast(x), cast(theta), cast(phi))
    assert y.dtype == jnp.dtype(dtype)
    return np.asarray(y.astype(jnp.float32 if dtype == 'bfloat16' else y.dtype))


def _embedded(name, **kwargs):
  """(x, theta, phi) -> y for the op `name` via the registry."""
  if denoise.uses_embedding(name):
    return lambda x, t, p: denoise.apply(name, x, theta=t, phi=p, **kwargs)
  return lambda x, t, p: denoise.apply(name, x, **kwargs)


# (shape, embedding width D or None) for non_local: without an embedding,
# (1, 2, 2, 8) makes (theta phi^T) x cheaper and (2, 5, 7, 4) theta (phi^T x);
# D = 2 < C and D = 6 > C (D = 6 at (1, 2, 2, 8) is also 'pairwise').
NON_LOCAL_SETTINGS = [
  ((1, 2, 2, 8), None),
  ((1, 2, 2, 8), 6),
  ((2, 5, 7, 4), None),
  ((2, 5, 7, 4), 2),
  ((2, 5, 7, 4), 6),
]
DTYPES = ['float32', 'float64']

# (op name, kwargs, reference(x, theta, phi)) for every op and setting.
CASES = (
  [
    (
      'non_local',
      dict(affinity=a),
      lambda x, t, p, a=a: ref_non_local(x, a, t, p),
    )
    for a in ('gaussian', 'dot_product')
  ]
  + [
    ('bilateral', dict(size=s), lambda x, t, p, s=s: ref_bilateral(x, s, t, p))
    for s in (1, 3, 5)
  ]
  + [
    ('mean', dict(size=s), lambda x, t, p, s=s: ref_mean(x, s))
    for s in (1, 3, 5, 7)
  ]
  + [
    ('median', dict(size=s), lambda x, t, p, s=s: ref_median(x, s))
    for s in (1, 3, 5, 7)
  ]
  + [('null', {}, lambda x, t, p: x)]
)
CASE_IDS = [
  f'{name}-{"-".join(str(v) for v in kw.values())}' for name, kw, _ in CASES
]
# One setting per op (window 3) for the grad/vmap/bfloat16 tests.
T_CASES = [
  c for c in CASES if c[0] in ('non_local', 'null') or c[1]['size'] == 3
]
T_IDS = [CASE_IDS[CASES.index(c)] for c in T_CASES]


# --------------------------------------------------------------------------
# Numerics against the references, under jit.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  'shape,d,dtype',
  [(shape, d, 'float32') for shape, d in NON_LOCAL_SETTINGS]
  + [(shape, d, 'float64') for shape, d in NON_LOCAL_SETTINGS[1:4]],
)
@pytest.mark.parametrize('affinity', ['gaussian', 'dot_product'])
def test_non_local_matches_reference(affinity, shape, d, dtype):
  x, theta, phi = _inputs(shape, d)
  fn = lambda x, t, p: denoise.non_local_means(
    x, affinity=affinity, theta=t, phi=p
  )
  y = _jit_apply(dtype, fn, x, theta, phi)
  np.testing.assert_allclose(
    y, ref_non_local(x, affinity, theta, phi), **_TOL[dtype]
  )


def test_non_local_shapes_cover_both_associations():
  chosen = {
    denoise._cheaper_association(h * w, d or c, c)
    for (_, h, w, c), d in NON_LOCAL_SETTINGS
  }
  assert chosen == {'pairwise', 'channel'}
  # The original's rule for D == C: theta (phi^T x) exactly when C <= H*W.
  assert denoise._cheaper_association(16, 16, 16) == 'channel'
  assert denoise._cheaper_association(16, 17, 17) == 'pairwise'
  # Embedded (D = C/2) at res5 of a 224 ResNet: 7x7 positions, C = 2048.
  assert denoise._cheaper_association(49, 1024, 2048) == 'pairwise'
  assert denoise._cheaper_association(56 * 56, 128, 256) == 'channel'


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('d', [None, 3])
def test_dot_product_associations_agree(d, dtype):
  x, theta, phi = _inputs((2, 3, 5, 4), d)
  theta = x if theta is None else theta
  phi = x if phi is None else phi
  ref = ref_non_local(x, 'dot_product', theta, phi).reshape(2, 15, 4)
  outs = {}
  for association in ('pairwise', 'channel'):
    fn = lambda x, t, p, association=association: denoise._dot_product_affinity(
      t.reshape(2, 15, -1),
      p.reshape(2, 15, -1),
      x.reshape(2, 15, 4),
      association=association,
    ).reshape(x.shape)
    outs[association] = _jit_apply(dtype, fn, x, theta, phi).reshape(ref.shape)
    np.testing.assert_allclose(outs[association], ref, **_TOL[dtype])
  np.testing.assert_allclose(outs['pairwise'], outs['channel'], **_TOL[dtype])
  with pytest.raises(ValueError, match='association'):
    denoise._dot_product_affinity(
      jnp.ones((1, 2, 3)),
      jnp.ones((1, 2, 3)),
      jnp.ones((1, 2, 3)),
      association='x',
    )


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_gaussian_library_and_explicit_paths_agree(dtype):
  x, _, _ = _inputs((2, 3, 5, 4), None)
  ref = ref_non_local(x, 'gaussian').reshape(2, 15, 4)
  tol = _TOL['float32'] if dtype == 'float32' else dict(rtol=0, atol=0.1)
  outs = {}
  for use_library in (True, False):
    fn = lambda x, t, p, use_library=use_library: denoise._gaussian_attention(
      x.reshape(2, 15, 4),
      x.reshape(2, 15, 4),
      x.reshape(2, 15, 4),
      use_library=use_library,
    )
    outs[use_library] = _jit_apply(dtype, fn, x)
    np.testing.assert_allclose(outs[use_library], ref, **tol)
  np.testing.assert_allclose(outs[True], outs[False], **tol)

  # Gradients of the two paths agree too (float32).
  w = jnp.asarray(_normal(3, (2, 15, 4)), jnp.float32)
  v = jnp.asarray(x.reshape(2, 15, 4), jnp.float32)
  grads = [
    jax.jit(
      jax.grad(
        lambda v, u=u: jnp.sum(
          w * denoise._gaussian_attention(v, v, v, use_library=u)
        )
      )
    )(v)
    for u in (True, False)
  ]
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='D == C'):
    denoise._gaussian_attention(v[..., :2], v[..., :2], v, use_library=True)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('size,d', [(1, 2), (3, None), (3, 6), (5, 2)])
def test_bilateral_matches_reference(size, d, dtype):
  x, theta, phi = _inputs((2, 5, 7, 3), d)
  fn = lambda x, t, p: denoise.bilateral_filter(x, size=size, theta=t, phi=p)
  y = _jit_apply(dtype, fn, x, theta, phi)
  np.testing.assert_allclose(
    y, ref_bilateral(x, size, theta, phi), **_TOL[dtype]
  )


def test_bilateral_excludes_outside_positions():
  # With constant logits the weights are uniform over in-image positions:
  # the bilateral filter must equal the mean filter, corners included (zero
  # padding would pull the corners towards zero).
  x = _normal(0, (1, 4, 5, 2))
  zeros = np.zeros((1, 4, 5, 3))
  y = _jit_apply('float64', _embedded('bilateral', size=3), x, zeros, zeros)
  np.testing.assert_allclose(y, ref_mean(x, 3), rtol=1e-12, atol=1e-12)


# Windows smaller than, equal to and larger than the (odd-sized) image.
WINDOW_CASES = [
  (1, (2, 5, 7, 3)),
  (3, (2, 5, 7, 3)),
  (5, (2, 5, 7, 3)),
  (5, (1, 2, 3, 2)),
  (7, (1, 2, 3, 2)),
]


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('size,shape', WINDOW_CASES)
def test_mean_matches_reference(size, shape, dtype):
  x = _normal(0, shape)
  y = _jit_apply(dtype, _embedded('mean', size=size), x)
  np.testing.assert_allclose(y, ref_mean(x, size), **_TOL[dtype])


def test_mean_corner_divides_by_in_image_count():
  x = np.full((1, 3, 4, 1), 2.0)
  y = _jit_apply('float32', _embedded('mean', size=3), x)
  np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize(
  'size,shape,dtype',
  [c + ('float32',) for c in WINDOW_CASES] + [WINDOW_CASES[1] + ('float64',)],
)
def test_median_matches_reference(size, shape, dtype):
  x = _normal(0, shape)
  y = _jit_apply(dtype, _embedded('median', size=size), x)
  # The median is one of the inputs: exact in any dtype.
  np.testing.assert_array_equal(y, ref_median(x.astype(dtype), size))


# --------------------------------------------------------------------------
# Transformations: grad, vmap; dtypes.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('name,kwargs,ref', T_CASES, ids=T_IDS)
def test_gradients_finite_and_nonzero(name, kwargs, ref):
  del ref
  x, theta, phi = (
    jnp.asarray(a, jnp.float32) for a in _inputs((2, 5, 7, 4), 2)
  )
  w = jnp.asarray(_normal(3, x.shape), jnp.float32)
  fn = _embedded(name, **kwargs)
  if not denoise.uses_embedding(name):
    theta = phi = None
  argnums = (0, 1, 2) if theta is not None else 0
  grads = jax.jit(
    jax.grad(lambda x, t, p: jnp.sum(w * fn(x, t, p)), argnums=argnums)
  )(x, theta, phi)
  for g in jax.tree.leaves(grads):
    assert g.dtype == jnp.float32
    assert np.all(np.isfinite(g))
    assert np.any(np.abs(g) > 1e-3)


@pytest.mark.parametrize('name,kwargs,ref', T_CASES, ids=T_IDS)
def test_gradients_match_finite_differences(name, kwargs, ref):
  del ref
  with jax.enable_x64(True):
    x, theta, phi = (jnp.asarray(a) for a in _inputs((1, 3, 4, 2), 3))
    fn = _embedded(name, **kwargs)
    if denoise.uses_embedding(name):
      check_grads(jax.jit(fn), (x, theta, phi), order=1, modes=('rev',))
    else:
      check_grads(
        jax.jit(lambda x: fn(x, None, None)), (x,), order=1, modes=('rev',)
      )


@pytest.mark.parametrize('name,kwargs,ref', T_CASES, ids=T_IDS)
def test_vmap_matches_reference(name, kwargs, ref):
  x, theta, phi = _inputs((3, 2, 4, 5, 4), 2)  # vmapped over the first axis
  if not denoise.uses_embedding(name):
    theta = phi = None
  fn = _embedded(name, **kwargs)
  ys = _jit_apply('float32', jax.vmap(fn), x, theta, phi)
  for i in range(x.shape[0]):
    t, p = (None, None) if theta is None else (theta[i], phi[i])
    np.testing.assert_allclose(ys[i], ref(x[i], t, p), **_TOL['float32'])


@pytest.mark.parametrize('name,kwargs,ref', T_CASES, ids=T_IDS)
def test_bfloat16_returns_bfloat16(name, kwargs, ref):
  x, theta, phi = _inputs((2, 5, 7, 4), 2)
  if not denoise.uses_embedding(name):
    theta = phi = None
  fn = _embedded(name, **kwargs)
  y = _jit_apply('bfloat16', fn, x, theta, phi)  # checks the dtype
  # Reference on the bf16-rounded inputs; the rest is bf16 rounding of the
  # output and of intermediates (up to ~1% each).
  rounded = [
    None if a is None else np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
    for a in (x, theta, phi)
  ]
  expected = ref(*rounded)
  np.testing.assert_allclose(
    y, expected, rtol=0.02, atol=0.02 * np.abs(expected).max()
  )
  # Mixed dtypes: the result has x's dtype.
  if theta is not None:
    y = jax.eval_shape(
      fn,
      jnp.asarray(x, jnp.bfloat16),
      jnp.asarray(theta, jnp.float32),
      jnp.asarray(phi, jnp.float32),
    )
    assert y.dtype == jnp.bfloat16


# --------------------------------------------------------------------------
# Registry and validation.
# --------------------------------------------------------------------------


def test_registry():
  assert sorted(denoise.DENOISE_OPS) == [
    'bilateral',
    'mean',
    'median',
    'non_local',
    'null',
  ]
  assert denoise.get('non_local') is denoise.non_local_means
  assert denoise.get('bilateral') is denoise.bilateral_filter
  assert denoise.get('mean') is denoise.mean_filter
  assert denoise.get('median') is denoise.median_filter
  assert denoise.get('null') is denoise.null
  assert [
    n for n in sorted(denoise.DENOISE_OPS) if denoise.uses_embedding(n)
  ] == [
    'bilateral',
    'non_local',
  ]
  with pytest.raises(TypeError):
    denoise.DENOISE_OPS['foo'] = denoise.null  # read-only


@pytest.mark.parametrize('bad', ['foo', 'Mean', '', None])
def test_unknown_op_message(bad):
  message = (
    f'Unknown denoise op {bad!r}; valid ops: '
    'bilateral, mean, median, non_local, null'
  )
  with pytest.raises(ValueError) as info:
    denoise.get(bad)
  assert str(info.value) == message
  with pytest.raises(ValueError, match='Unknown denoise op'):
    denoise.uses_embedding(bad)
  with pytest.raises(ValueError, match='Unknown denoise op'):
    denoise.apply(bad, jnp.ones((1, 2, 2, 1)))


def test_apply_passes_each_op_only_its_arguments(monkeypatch):
  calls = []
  fakes = {
    name: lambda x, _name=name, **kw: calls.append((_name, x, kw)) or x
    for name in denoise.DENOISE_OPS
  }
  monkeypatch.setattr(denoise, 'DENOISE_OPS', fakes)
  kw = dict(affinity='dot_product', size=5, theta='t', phi='p')
  for name in ('non_local', 'bilateral'):
    denoise.apply(name, 'x', **kw)
  for name in ('mean', 'median', 'null'):
    denoise.apply(name, 'x', affinity='dot_product', size=5)
  assert calls == [
    ('non_local', 'x', dict(affinity='dot_product', theta='t', phi='p')),
    ('bilateral', 'x', dict(size=5, theta='t', phi='p')),
    ('mean', 'x', dict(size=5)),
    ('median', 'x', dict(size=5)),
    ('null', 'x', {}),
  ]
  for name in ('mean', 'median', 'null'):
    with pytest.raises(ValueError, match='takes no theta/phi'):
      denoise.apply(name, 'x', theta='t')


def test_apply_runs_the_real_op():
  x = _normal(0, (1, 3, 4, 2))
  y = _jit_apply('float64', _embedded('median', size=3), x)
  np.testing.assert_array_equal(y, ref_median(x, 3))
  assert denoise.null(jnp.ones((1, 2, 2, 1)), size=3, theta=1).shape == (
    1,
    2,
    2,
    1,
  )


_X = jnp.ones((1, 3, 4, 2))


@pytest.mark.parametrize(
  'call,match',
  [
    (lambda: denoise.non_local_means(jnp.ones((3, 4, 2))), 'rank-4'),
    (lambda: denoise.mean_filter(jnp.ones((1, 1, 3, 4, 2))), 'rank-4'),
    (lambda: denoise.median_filter(jnp.ones((1, 3, 4, 2), jnp.int32)), 'float'),
    (lambda: denoise.null(jnp.ones((3, 4))), 'rank-4'),
    (lambda: denoise.mean_filter(jnp.ones((1, 0, 4, 2))), 'non-empty'),
    (lambda: denoise.non_local_means(_X, affinity='softmax'), 'affinity'),
    (lambda: denoise.apply('non_local', _X, affinity='dot'), 'affinity'),
    (lambda: denoise.mean_filter(_X, size=2), 'positive odd int'),
    (lambda: denoise.median_filter(_X, size=0), 'positive odd int'),
    (lambda: denoise.bilateral_filter(_X, size=-3), 'positive odd int'),
    (lambda: denoise.mean_filter(_X, size=3.0), 'positive odd int'),
    (lambda: denoise.mean_filter(_X, size=True), 'positive odd int'),
    (lambda: denoise.apply('median', _X, size=4), 'positive odd int'),
    (
      lambda: denoise.non_local_means(_X, theta=jnp.ones((1, 3, 5, 1))),
      'same N, H, W',
    ),
    (
      lambda: denoise.bilateral_filter(_X, phi=jnp.ones((2, 3, 4, 2))),
      'same N, H, W',
    ),
    (
      lambda: denoise.non_local_means(
        _X, theta=jnp.ones((1, 3, 4, 1)), phi=jnp.ones((1, 3, 4, 2))
      ),
      'same channel count',
    ),
    (
      lambda: denoise.bilateral_filter(_X, theta=jnp.ones((1, 3, 4, 5))),
      'same channel count',
    ),
    (
      lambda: denoise.non_local_means(_X, theta=jnp.ones((3, 4, 1))),
      'theta must be a rank-4',
    ),
  ],
)
def test_invalid_inputs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_theta_alone_defaults_phi_to_x():
  x, theta, _ = _inputs((1, 3, 4, 2), 2)
  y = _jit_apply('float64', _embedded('non_local'), x, theta, None)
  np.testing.assert_allclose(
    y, ref_non_local(x, 'gaussian', theta, x), rtol=1e-11, atol=1e-11
  )


# --------------------------------------------------------------------------
# Error report: python tests/test_denoise.py
# --------------------------------------------------------------------------


def _error_report():
  """Prints each op's largest error against its reference, per dtype."""
  x, theta, phi = _inputs((2, 5, 7, 4), 2)
  rows = []
  for (name, kwargs, ref), embed in itertools.product(CASES, (False, True)):
    if embed and not denoise.uses_embedding(name):
      continue
    t, p = (theta, phi) if embed else (None, None)
    label = CASE_IDS[CASES.index((name, kwargs, ref))] + (
      '+emb' if embed else ''
    )
    for dtype in ('bfloat16', 'float32', 'float64'):
      inputs = [
        None if a is None else a.astype(jnp.dtype(dtype)).astype(np.float64)
        for a in (x, t, p)
      ]
      expected = ref(*inputs)
      y = _jit_apply(dtype, _embedded(name, **kwargs), x, t, p)
      err = np.abs(y - expected).max()
      rows.append((label, dtype, err, err / np.abs(expected).max()))
  print(f'{"op":28s} {"dtype":9s} {"max abs err":>12s} {"/ max|ref|":>12s}')
  for label, dtype, err, rel in rows:
    print(f'{label:28s} {dtype:9s} {err:12.3e} {rel:12.3e}')


if __name__ == '__main__':
  _error_report()
