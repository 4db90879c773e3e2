"""Data parallelism shared by the attack and the train step.

fdjax uses plain data parallelism over a 1-D device mesh whose only axis is
named ``'data'`` (:data:`AXIS`). A *per-device* function -- one that sees its
own shard of the batch and talks to the other devices only through
``jax.lax.psum``/``pmean``/``axis_index`` over ``'data'`` -- is turned into a
function of *global* arrays by :func:`data_parallel`, with either of two
backends that give the same results:

* ``'shard_map'`` (default): ``jax.shard_map`` over the mesh. Jit-able by the
  caller, works with multi-host global arrays.
* ``'pmap'``: ``jax.pmap`` over the mesh's devices; global arrays are
  reshaped to ``[devices, per_device, ...]`` and back around the call.

Semantics follow ``pmap`` in both backends: ``jax.grad`` of a per-device loss
with respect to a replicated argument gives the *per-device* gradient, and
the caller averages it explicitly with ``jax.lax.pmean(g, 'data')``. (For the
shard_map backend this is why it runs with ``check_vma=False``: with
``check_vma=True`` JAX would sum such gradients over devices by itself.)
Outputs declared replicated (``P()``) are taken from the first device and are
not checked for equality across devices, so make them replicated with
``psum``/``pmean`` (or compute them from replicated inputs only).

Typical use::

  mesh = parallel.make_mesh()
  step = parallel.data_parallel(
      per_device_step, mesh=mesh,
      in_specs=(P(), P('data'), P()), out_specs=(P(), P()))
  state, metrics = jax.jit(step, donate_argnums=0)(state, batch, key)
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

AXIS = 'data'
"""Name of the data-parallel mesh axis (use it in ``psum``/``pmean``)."""

BACKENDS = ('shard_map', 'pmap')


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Returns a 1-D mesh over ``devices`` with the single axis ``'data'``.

  The axis type is ``Auto`` (plain data parallelism, no explicit sharding in
  types).

  Args:
    devices: the devices to use, in order; all of ``jax.devices()`` if None.

  Returns:
    A ``jax.sharding.Mesh`` of shape ``{'data': len(devices)}``.

  Raises:
    ValueError: if ``devices`` is empty.

  Examples:
    >>> mesh = make_mesh(jax.devices()[:1])
    >>> dict(mesh.shape)
    {'data': 1}
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError('make_mesh needs at least one device, got none.')
  return jax.sharding.Mesh(
    np.array(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
  )


def check_divisible(
  global_batch: int, num_devices: int, what: str = 'global batch size'
) -> None:
  """Raises ValueError unless ``global_batch`` is a multiple of ``num_devices``.

  Args:
    global_batch: the size of the axis that is split across devices.
    num_devices: the number of devices it is split across.
    what: how to name ``global_batch`` in the error message.

  Raises:
    ValueError: if ``global_batch % num_devices != 0``.

  Examples:
    >>> check_divisible(16, 8)
    >>> check_divisible(12, 8)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: global batch size 12 does not divide by the 8 devices; ...
  """
  if num_devices < 1:
    raise ValueError(f'num_devices must be >= 1, got {num_devices}.')
  if global_batch % num_devices:
    raise ValueError(
      f'{what} {global_batch} does not divide by the {num_devices} '
      f'devices; use a multiple of {num_devices}'
    )


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def _spec_is_sharded(spec: Any) -> bool:
  """True for P('data', None, ...), False for P() / P(None, ...)."""
  if not isinstance(spec, P):
    raise ValueError(
      f'data_parallel specs must be PartitionSpec leaves, P({AXIS!r}) or '
      f'P(), got {spec!r}.'
    )
  entries = tuple(spec)
  if all(e is None for e in entries):
    return False
  if entries[0] == AXIS and all(e is None for e in entries[1:]):
    return True
  raise ValueError(
    f'data_parallel supports only P({AXIS!r}) (split the leading axis) '
    f'and P() (replicated), got {spec!r}.'
  )


def _sharded_mask(specs: Any, tree: Any, what: str) -> Any:
  """Broadcasts the spec prefix ``specs`` to a bool per leaf of ``tree``."""
  for spec in jax.tree.leaves(specs, is_leaf=_is_spec):
    _spec_is_sharded(spec)
  try:
    return jax.tree.map(
      lambda s, sub: jax.tree.map(lambda _: _spec_is_sharded(s), sub),
      specs,
      tree,
      is_leaf=_is_spec,
    )
  except ValueError as e:
    raise ValueError(
      f'data_parallel {what} {specs!r} is not a pytree prefix of the '
      f'structure it describes: {e}'
    ) from e


def _check_args(mask: Any, args: Any, num_devices: int) -> None:
  for sharded, x in zip(jax.tree.leaves(mask), jax.tree.leaves(args)):
    if not sharded:
      continue
    shape = np.shape(x)
    if not shape:
      raise ValueError(
        f'an argument with spec P({AXIS!r}) must have a leading batch '
        'axis, got a scalar.'
      )
    check_divisible(shape[0], num_devices)


def data_parallel(
  fn: Callable[..., Any],
  *,
  mesh: jax.sharding.Mesh,
  in_specs: Any,
  out_specs: Any,
  backend: str = 'shard_map',
  check_vma: bool = False,
) -> Callable[..., Any]:
  """Wraps a per-device function so that it takes and returns global arrays.

  Args:
    fn: the per-device function. Positional arguments only. Inside it,
      ``jax.lax.axis_index('data')``, ``psum``/``pmean`` over ``'data'`` work
      the same way with both backends.
    mesh: a mesh from :func:`make_mesh` (axis ``'data'``).
    in_specs: a pytree prefix of the argument tuple whose leaves are
      ``P('data')`` (split the leading axis across devices) or ``P()``
      (replicated), as for ``jax.shard_map``.
    out_specs: the same for the outputs of ``fn``.
    backend: ``'shard_map'`` or ``'pmap'``.
    check_vma: shard_map's check that every ``P()`` output is really the
      same on all devices. With it on, the gradient with respect to a
      replicated input is summed over devices by JAX itself; differentiate
      with respect to ``jax.lax.pcast(x, 'data', to='varying')`` to get
      per-device gradients (as fdjax's train step does). Off by default, so
      that a per-device function means the same under both backends.

  Returns:
    A function of the global arguments. Every ``P('data')`` argument must have
    a leading axis divisible by the number of devices; ``P('data')`` outputs
    are concatenated over devices, ``P()`` outputs come from the first
    device. The shard_map version can be wrapped in ``jax.jit`` (with
    ``donate_argnums`` as the caller wishes).

  Raises:
    ValueError: for an unknown backend, a mesh without the ``'data'`` axis or
      (when called) specs other than ``P('data')``/``P()`` or a leading axis
      that does not divide by the number of devices.

  Examples:
    >>> import jax.numpy as jnp
    >>> mesh = make_mesh(jax.devices()[:1])
    >>> f = data_parallel(
    ...     lambda x: (2 * x, jax.lax.pmean(x.sum(), 'data')),
    ...     mesh=mesh, in_specs=P('data'), out_specs=(P('data'), P()))
    >>> y, total = f(jnp.arange(4.0))
    >>> y.tolist(), float(total)
    ([0.0, 2.0, 4.0, 6.0], 6.0)
  """
  if backend not in BACKENDS:
    raise ValueError(
      f'unknown data_parallel backend {backend!r}; valid: {BACKENDS}.'
    )
  if tuple(mesh.axis_names) != (AXIS,):
    raise ValueError(
      f'data_parallel needs a 1-D mesh with axis {AXIS!r} (make_mesh), '
      f'got axes {mesh.axis_names}.'
    )
  num_devices = mesh.devices.size
  if isinstance(in_specs, list):
    in_specs = tuple(in_specs)

  if backend == 'shard_map':
    mapped = jax.shard_map(
      fn,
      mesh=mesh,
      in_specs=in_specs,
      out_specs=out_specs,
      check_vma=check_vma,
    )

    def call_shard_map(*args):
      mask = _sharded_mask(in_specs, args, 'in_specs')
      _check_args(mask, args, num_devices)
      return mapped(*args)

    return call_shard_map

  devices = list(mesh.devices.flat)
  pmapped = {}  # One jax.pmap per in_axes, so that its compile cache is hit.

  def call_pmap(*args):
    mask = _sharded_mask(in_specs, args, 'in_specs')
    _check_args(mask, args, num_devices)
    split = jax.tree.map(
      lambda s, x: x.reshape((num_devices, -1) + x.shape[1:]) if s else x,
      mask,
      args,
    )
    in_axes = tuple(jax.tree.map(lambda s: 0 if s else None, m) for m in mask)
    leaves, treedef = jax.tree.flatten(in_axes, is_leaf=lambda x: x is None)
    cache_key = (treedef, tuple(leaves))
    if cache_key not in pmapped:
      pmapped[cache_key] = jax.pmap(
        fn, axis_name=AXIS, in_axes=in_axes, devices=devices
      )
    out = pmapped[cache_key](*split)
    out_mask = _sharded_mask(out_specs, out, 'out_specs')
    return jax.tree.map(
      lambda s, y: y.reshape((-1,) + y.shape[2:]) if s else y[0],
      out_mask,
      out,
    )

  return call_pmap


def jit_data_parallel(
  fn: Callable[..., Any],
  *,
  mesh: jax.sharding.Mesh,
  in_specs: Any,
  out_specs: Any,
  backend: str = 'shard_map',
  donate_argnums: int | Sequence[int] = (),
  check_vma: bool = True,
) -> Callable[..., Any]:
  """:func:`data_parallel`, compiled: ``jax.jit`` for shard_map, pmap as is.

  The one place that knows how each backend compiles, so callers build
  their step functions the same way for both.

  Args:
    fn: the per-device function (positional arguments only).
    mesh: a mesh from :func:`make_mesh`.
    in_specs: as :func:`data_parallel`.
    out_specs: as :func:`data_parallel`.
    backend: ``'shard_map'`` or ``'pmap'``.
    donate_argnums: arguments whose buffers the shard_map version may reuse
      (e.g. the train state).
    check_vma: as :func:`data_parallel`; on by default here (fdjax's own
      step functions are written for it).

  Returns:
    The compiled function of global arrays.

  Examples:
    >>> import jax.numpy as jnp
    >>> mesh = make_mesh(jax.devices()[:1])
    >>> f = jit_data_parallel(lambda x: 2 * x, mesh=mesh,
    ...                       in_specs=P('data'), out_specs=P('data'))
    >>> f(jnp.arange(2.0)).tolist()
    [0.0, 2.0]
  """
  mapped = data_parallel(
    fn,
    mesh=mesh,
    in_specs=in_specs,
    out_specs=out_specs,
    backend=backend,
    check_vma=check_vma,
  )
  if backend == 'shard_map':
    return jax.jit(mapped, donate_argnums=donate_argnums)
  return mapped


def shard_batch(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a batch on the mesh, split along its leading axis.

  In a single process ``tree`` holds the global batch. With several
  processes each passes its own (process-local) part, and the parts are
  assembled into global arrays in process order.

  Args:
    tree: a pytree of arrays with a common leading batch axis.
    mesh: a mesh from :func:`make_mesh`.

  Returns:
    The same pytree of ``jax.Array`` with sharding
    ``NamedSharding(mesh, P('data'))``.

  Raises:
    ValueError: if a leading axis does not divide by the devices it is split
      across.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = shard_batch(jnp.zeros((4, 3)), make_mesh(jax.devices()[:1]))
    >>> x.sharding.spec
    P('data',)
  """
  sharding = NamedSharding(mesh, P(AXIS))
  if jax.process_count() == 1:
    for x in jax.tree.leaves(tree):
      check_divisible(np.shape(x)[0], mesh.devices.size)
    return jax.device_put(tree, sharding)
  local = len(mesh.local_devices)
  for x in jax.tree.leaves(tree):
    check_divisible(np.shape(x)[0], local, 'per-process batch size')
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, x), tree
  )


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a pytree on every device of the mesh (``NamedSharding`` ``P()``).

  Args:
    tree: a pytree of arrays (e.g. parameters or a key), the same on every
      process.
    mesh: a mesh from :func:`make_mesh`.

  Returns:
    The same pytree of replicated ``jax.Array``.

  Examples:
    >>> import jax.numpy as jnp
    >>> w = replicate(jnp.ones(3), make_mesh(jax.devices()[:1]))
    >>> w.sharding.is_fully_replicated
    True
  """
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  # Several processes: device_put takes the global sharding from host
  # values only (each process gives the same), not from arrays already on
  # one of its devices.
  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key
    ):
      data = put(np.asarray(jax.random.key_data(x)))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)

  return jax.tree.map(put, tree)
