"""AutoAttack (Croce & Hein, ICML 2020): the per-example worst case of four.

The standard version runs APGD-CE, APGD-T (9 targets), FAB-T (9 targets)
and Square (5,000 queries) in that order, each only on the points that are
still robust; a point counts as robust only if it survives all of them. The
version ``'plus'`` adds APGD-DLR and untargeted FAB with 5 restarts;
``'rand'``, for randomised defences, runs APGD-CE and APGD-DLR with every
gradient averaged over 20 draws of the model's randomness (expectation over
transformation); ``'custom'`` runs any list of the reference's attack
names. A randomised model is passed as ``logits_fn(params, x, key)`` with
``randomized=True``; JAX models are otherwise deterministic functions.

The driver runs on the host: it gathers the still-robust points into
fixed-size batches (padded by repeating a point and discarding the copies),
so every attack compiles once per batch size and a second call compiles
nothing. Each attack's randomness is folded per global example id (and per
attack), so the result of a point does not depend on which other points
share its batch, on the batch size or on the device count.

A returned adversarial image is kept only when the model, evaluated again
on it, misclassifies it and it lies inside the ball and bounds: the result
never claims a success that is not one.
"""

from collections.abc import Callable
from collections.abc import Sequence
from concurrent import futures
import dataclasses
import functools
import math
import threading
import time
from typing import Any
from typing import NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from fdjax import parallel
from fdjax.attacks import apgd as apgd_lib
from fdjax.attacks import ball
from fdjax.attacks import fab as fab_lib
from fdjax.attacks import square as square_lib
from fdjax.attacks import versions
from fdjax.attacks.versions import ATTACK_NAMES as ATTACK_NAMES
from fdjax.attacks.versions import CPU_COMPILER_OPTIONS as CPU_COMPILER_OPTIONS
from fdjax.attacks.versions import RANDOMIZED_ATTACKS as RANDOMIZED_ATTACKS
from fdjax.attacks.versions import VERSION_ATTACKS as VERSION_ATTACKS
from fdjax.attacks.versions import VERSIONS as VERSIONS
from fdjax.attacks.versions import attack_settings as attack_settings
from fdjax.attacks.versions import resolve_attacks as resolve_attacks

_FUNCTIONS = {
  'apgd-ce': apgd_lib.apgd,
  'apgd-dlr': apgd_lib.apgd,
  'apgd-t': apgd_lib.apgd_targeted,
  'fab': fab_lib.fab,
  'fab-t': fab_lib.fab_targeted,
  'square': square_lib.square,
}


class AutoAttackResult(NamedTuple):
  """What `AutoAttack` returns.

  Attributes:
    adversarial: the adversarial images, shape and dtype of the images (the
      clean image where no attack succeeded).
    broken_by: [batch] int: 0 if the clean image is misclassified, k >= 1
      if the k-th attack of `attacks` broke it first, -1 if it is robust.
    attacks: the attack names, in the order run.
    robust_accuracy: {'clean': ..., name: accuracy after that attack
      (cumulative)}, in the order run.
    checks: the reference's warnings as checks, {name: {'status': 'ok' or
      'warn', 'message': ...}}: 'randomness' (several forward passes of one
      batch agree), 'logits' (the outputs do not look like probabilities),
      'zero_gradients' (the DLR loss has a gradient at every clean point),
      'classes' (enough classes for the targeted attacks), 'square' (the
      score-based Square broke no point the gradient attacks missed, a sign
      of masked gradients). See `CHECKS`.
  """

  adversarial: np.ndarray | None
  broken_by: np.ndarray
  attacks: tuple[str, ...]
  robust_accuracy: dict[str, float]
  checks: dict[str, dict[str, str]] | None = None


CHECKS = ('randomness', 'logits', 'zero_gradients', 'classes', 'square')
"""The names of `AutoAttackResult.checks`."""


def _check(ok: bool, ok_message: str, warn_message: str) -> dict[str, str]:
  if ok:
    return {'status': 'ok', 'message': ok_message}
  return {'status': 'warn', 'message': warn_message}


def _within_ball(adv, images, epsilon, norm, bounds, tol=1e-5):
  delta = (adv - images).reshape(len(adv), -1).astype(np.float64)
  if norm == 'linf':
    dist = np.abs(delta).max(axis=1)
  else:
    dist = np.sqrt((delta**2).sum(axis=1))
  lo, hi = bounds
  inside = np.all(
    (adv >= np.asarray(lo) - tol) & (adv <= np.asarray(hi) + tol),
    axis=tuple(range(1, adv.ndim)),
  )
  return (dist <= epsilon * (1 + tol) + tol) & inside


@dataclasses.dataclass(eq=False)
class AutoAttack:
  """AutoAttack of a model, compiled once per attack and batch size.

  ``logits_fn(params, x)`` takes the model's parameters as an argument (so
  new weights of the same model do not recompile) and images in pixel space
  within ``bounds``; for a plain ``f(x)`` pass ``lambda _, x: f(x)`` and
  ``params=None``.

  Attributes:
    logits_fn: ``(params, images) -> [batch, num_classes]`` logits.
    epsilon: radius of the ball, in pixel units.
    norm: 'linf' or 'l2'.
    version: 'standard', 'plus', 'rand' or 'custom'.
    attacks: the names for version 'custom'.
    batch_size: points per attack call (the still-robust points are packed
      into batches of this size).
    bounds: (lo, hi) pixel range.
    settings: per-attack overrides of `attack_settings`, e.g.
      ``{'square': {'num_queries': 1000}}``.
    mesh: a `fdjax.parallel.make_mesh()` mesh to split every attack batch
      over (``batch_size`` must divide by its devices); None runs on the
      default device. With several processes every process makes the same
      call with the same (global) images; each attacks its devices' share.
      A point's result does not depend on the device count (its randomness
      is folded by its example id).
    compile_ahead: compile the attacks ahead, two at a time in threads,
      while earlier ones run (XLA compiles without the GIL): the first
      attack's programs at the start of a call, and before each attack the
      later attacks' for the sizes its points would need (an attack only
      runs on points the ones before it left robust). Same results; a
      first call takes less wall time.
    tail_buckets: pad an attack's last (or only) batch of ``m`` points to
      the smallest power-of-two multiple of the device count that holds
      them (at most `batch_size`) instead of to `batch_size`: the later
      attacks of a small evaluation then compute on a third of the points
      a full batch would, at the price of at most one more compiled
      program per attack and size.
    compiler_options: XLA compiler options per attack name, e.g.
      ``{'square': {'xla_backend_optimization_level': 1}}`` ({} compiles
      every attack with XLA's defaults); None: `CPU_COMPILER_OPTIONS` when
      the devices are CPUs, the defaults elsewhere.
    randomized: the model is randomised: ``logits_fn(params, x, key)``.
      The APGD attacks (`RANDOMIZED_ATTACKS`) then draw its randomness per
      batch from the attack's key (so, unlike a deterministic model's, a
      point's result depends on its batch), and success is checked on one
      draw with a fixed key, ``jax.random.key(0)``.

  Examples:
    >>> w = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
    >>> aa = AutoAttack(lambda _, x: x @ w, epsilon=0.3, version='custom',
    ...                 attacks=['apgd-ce'], batch_size=2)
    >>> x = jnp.array([[0.6, 0.4], [0.9, 0.1]])
    >>> r = aa(None, jax.random.key(0), x, jnp.array([0, 0]))
    >>> r.broken_by.tolist(), r.robust_accuracy['apgd-ce']
    ([1, -1], 0.5)
  """

  logits_fn: Callable[[Any, jax.Array], jax.Array]
  epsilon: float
  norm: str = 'linf'
  version: str = 'standard'
  attacks: Sequence[str] | None = None
  batch_size: int = 500
  bounds: tuple[Any, Any] = (0.0, 1.0)
  settings: dict[str, dict[str, Any]] | None = None
  mesh: jax.sharding.Mesh | None = None
  randomized: bool = False
  compile_ahead: bool = True
  tail_buckets: bool = True
  compiler_options: dict[str, dict[str, Any]] | None = None

  def __post_init__(self):
    ball.check_norm(self.norm)
    ball.check_bounds(self.bounds)
    self.names = resolve_attacks(self.version, self.attacks)
    if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
      raise ValueError(
        f'batch_size={self.batch_size!r} is not valid; valid: an integer >= 1.'
      )
    if not (math.isfinite(self.epsilon) and self.epsilon > 0):
      raise ValueError(
        f'epsilon={self.epsilon!r} is not valid; valid: a number > 0.'
      )
    unknown = sorted(set(self.settings or {}) - set(ATTACK_NAMES))
    if unknown:
      raise ValueError(
        f'settings for {unknown} are not valid; valid: {list(ATTACK_NAMES)}.'
      )
    if self.randomized:
      other = [n for n in self.names if n not in RANDOMIZED_ATTACKS]
      if other:
        raise ValueError(
          f'attacks {other} cannot run on a randomized model; valid: '
          f"{list(RANDOMIZED_ATTACKS)} (e.g. version='rand')."
        )
    if self.mesh is not None:
      parallel.check_divisible(
        self.batch_size, self.mesh.devices.size, 'AutoAttack batch_size'
      )
    self._compiled = {}
    self._ahead = {}
    self._lock = threading.Lock()
    self._pool = futures.ThreadPoolExecutor(max_workers=2)
    self._predict = self._jit(
      lambda params, x: jnp.argmax(self.model_fn(params)(x), -1), 1
    )

  def model_fn(self, params: Any) -> Callable[[jax.Array], jax.Array]:
    """``x -> logits`` of the model (one fixed draw if randomized)."""
    if self.randomized:
      return lambda x: self.logits_fn(params, x, jax.random.key(0))
    return functools.partial(self.logits_fn, params)

  def _jit(
    self,
    fn: Callable[..., Any],
    num_replicated: int,
    compiler_options: dict[str, Any] | None = None,
  ) -> Callable:
    """jit of ``fn(*replicated, *batched)``, split over `mesh` if any."""
    jit = functools.partial(jax.jit, compiler_options=compiler_options or None)
    if self.mesh is None:
      return jit(fn)

    def spec(x):
      return P(parallel.AXIS) if x else P()

    def call(*args):
      specs = tuple(spec(i >= num_replicated) for i in range(len(args)))
      mapped = parallel.data_parallel(
        fn, mesh=self.mesh, in_specs=specs, out_specs=P(parallel.AXIS)
      )
      return mapped(*args)

    return jit(call)

  def _put(self, *batch: np.ndarray) -> tuple[Any, ...]:
    """A batch placed for `_jit`'s functions: split over the mesh, from the
    same global batch on every process."""
    if self.mesh is None:
      return batch
    sharded = NamedSharding(self.mesh, P(parallel.AXIS))
    return tuple(
      jax.make_array_from_callback(x.shape, sharded, lambda i, x=x: x[i])
      for x in batch
    )

  def _get(self, x: jax.Array) -> np.ndarray:
    if self.mesh is None or jax.process_count() == 1:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def kwargs(self, name: str) -> dict[str, Any]:
    """The keyword arguments attack `name` runs with (the targeted attacks'
    targets capped at the model's classes minus one once a call has seen
    its outputs, as the reference does)."""
    kw = attack_settings(self.version, name)
    kw.update((self.settings or {}).get(name, {}))
    classes = getattr(self, '_num_classes', None)
    if 'num_target_classes' in kw and classes is not None:
      kw['num_target_classes'] = min(kw['num_target_classes'], classes - 1)
    return kw

  def xla_options(self, name: str) -> dict[str, Any]:
    """The XLA compiler options attack `name` compiles with: its entry of
    `compiler_options`, else (None) `CPU_COMPILER_OPTIONS` on CPU."""
    if self.compiler_options is not None:
      return dict(self.compiler_options.get(name, {}))
    devices = jax.devices() if self.mesh is None else self.mesh.devices.flat
    if all(d.platform == 'cpu' for d in devices):
      return dict(CPU_COMPILER_OPTIONS.get(name, {}))
    return {}

  def _first_checks(self, params, x, y, m) -> dict[str, dict[str, str]]:
    """The checks made on one batch before the attacks (see `CHECKS`);
    its first `m` points are real, the others repeat them."""
    if not hasattr(self, '_probe'):

      def probe(params, key, x, y):
        if self.randomized:
          out = lambda z, k: self.logits_fn(params, z, k)
        else:
          out = lambda z, k: self.logits_fn(params, z)
        logits = out(x, key)
        other = out(x, jax.random.fold_in(key, 1))  # Another draw.
        # DLR needs 3 classes; with fewer the check uses the cross-entropy.
        if logits.shape[-1] >= 3:
          loss = apgd_lib.dlr_loss
        else:
          loss = lambda z, t: (
            -jnp.take_along_axis(jax.nn.log_softmax(z), t[:, None], axis=1)[
              :, 0
            ]
          )
        grad = jax.grad(
          lambda z: jnp.sum(loss(out(z, key).astype(jnp.float32), y))
        )(x)
        grad_max = jnp.max(jnp.abs(grad.reshape(len(x), -1)), axis=1)
        return logits, other, grad_max

      self._probe = self._jit(probe, 2)
    checks = {}
    args = (params, self._replicate(jax.random.key(1)), *self._put(x, y))
    logits, other, grad_max = (self._get(a) for a in self._probe(*args))
    if not self.randomized:
      # A second execution (a deterministic JAX function can still differ
      # between runs on backends with non-deterministic reductions).
      other = self._get(self._probe(*args)[0])
    change = np.abs(other - logits).max()
    if self.randomized:
      checks['randomness'] = _check(
        change > 0,
        'two draws of the randomised model differ',
        'two draws of the model with different keys give the same logits: '
        "it looks deterministic, and version='rand' only repeats work",
      )
    else:
      checks['randomness'] = _check(
        change == 0,
        'two forward passes give the same logits',
        f'two forward passes differ (by up to {change:.3g}): a '
        "randomised model needs randomized=True and version='rand'",
      )
    sums = logits.astype(np.float64).sum(-1)
    probs = (logits.min() >= 0) and np.allclose(sums, 1.0, atol=1e-4)
    checks['logits'] = _check(
      not probs,
      'the outputs are not probabilities',
      'the outputs are in [0, 1] and sum to 1: they look like probabilities, '
      'and the attacks need logits',
    )
    grad_max = grad_max[:m]
    zero = int(np.sum(grad_max == 0))
    checks['zero_gradients'] = _check(
      zero == 0,
      'the loss (DLR) has a non-zero gradient at every clean point checked',
      f'the loss (DLR) has a zero gradient at {zero} of {len(grad_max)} clean '
      'points: the gradient attacks cannot move them (masked gradients?)',
    )
    classes = logits.shape[-1]
    self._num_classes = classes
    wanted = max(
      [
        attack_settings(self.version, n).get('num_target_classes', 0)
        for n in self.names
      ]
      + [v.get('num_target_classes', 0) for v in (self.settings or {}).values()]
    )
    checks['classes'] = _check(
      wanted <= classes - 1,
      f'{classes} classes: enough for the targeted attacks',
      f'the targeted attacks ask for {wanted} target classes but the model '
      f'has {classes} classes; they run with {classes - 1}',
    )
    return checks

  def _program(self, name: str) -> tuple[Any, Callable[..., Any], Any]:
    """(cache key, jitted ``run(params, key, choice, images, labels, ids)``,
    its `choice` argument, placed) of attack `name`.

    The APGD attacks of the call that differ only in their loss, restarts
    and target classes (APGD-CE and APGD-T in the standard version) share
    one program (`apgd.apgd_switch`), which `choice` steers: the model's
    forward and backward pass is compiled once for all of them.
    """
    kwargs, options = self.kwargs(name), self.xla_options(name)
    group, choice = [name], 0
    if name in versions.APGD_ATTACKS:
      same = lambda other: (
        versions.apgd_shared(self.kwargs(other)) == versions.apgd_shared(kwargs)
        and self.xla_options(other) == options
      )
      group = [n for n in self.names if n in versions.APGD_ATTACKS and same(n)]
      choice = group.index(name)
    if len(group) > 1:
      choices = tuple(versions.apgd_choice(self.kwargs(n)) for n in group)
      shared = versions.apgd_shared(kwargs)
      cache_key = ('apgd', choices, tuple(sorted(shared.items())))
      fn = functools.partial(apgd_lib.apgd_switch, choices=choices, **shared)
    else:
      cache_key = (name, tuple(sorted(kwargs.items())))
      fn = functools.partial(_FUNCTIONS[name], **kwargs)
      fn = functools.partial(_ignore_choice, fn)
    cache_key += (tuple(sorted(options.items())),)
    if cache_key not in self._compiled:

      def run(params, key, choice, images, labels, ids):
        extra = {}
        logits_fn = functools.partial(self.logits_fn, params)
        if self.randomized:
          key, extra['model_key'] = jax.random.split(key)
        return fn(
          logits_fn,
          key,
          images,
          labels,
          choice,
          epsilon=self.epsilon,
          norm=self.norm,
          bounds=self.bounds,
          example_ids=ids,
          **extra,
        )

      self._compiled[cache_key] = self._jit(run, 3, options)
    return (
      cache_key,
      self._compiled[cache_key],
      self._replicate(np.int32(choice)),
    )

  def compiled(self, name: str) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """The jitted ``attack(params, key, images, labels, ids)`` of `name`."""
    _, jitted, choice = self._program(name)
    return lambda params, key, *batch: jitted(params, key, choice, *batch)

  def _compile_ahead(self, name: str, params, key, size: int, like) -> Any:
    """A future of attack `name`'s program lowered and compiled for
    batches of `size` points shaped like the (one-point) `like` images,
    called as ``attack(params, key, images, labels, ids)``; cached by
    program and size (the attacks that share a program share it)."""
    cache_key, jitted, choice = self._program(name)
    signature = (cache_key, size)
    with self._lock:
      if signature not in self._ahead:
        sharding = None
        if self.mesh is not None:
          sharding = NamedSharding(self.mesh, P(parallel.AXIS))

        def spec(shape, dtype):
          dtype = jax.dtypes.canonicalize_dtype(dtype)
          return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        args = (
          params,
          key,
          choice,
          spec((size,) + like.shape[1:], like.dtype),
          spec((size,), np.int32),
          spec((size,), np.int32),
        )
        self._ahead[signature] = self._pool.submit(
          lambda: jitted.lower(*args).compile()
        )
      future = self._ahead[signature]
    return _Bound(future, choice)

  def _tail_size(self, m: int) -> int:
    if not self.tail_buckets:
      return self.batch_size
    unit = 1 if self.mesh is None else self.mesh.devices.size
    size = unit * (1 << max(math.ceil(math.log2(-(-m // unit))), 0))
    return min(size, self.batch_size)

  def predict(self, params: Any, images: np.ndarray) -> np.ndarray:
    """Argmax predictions of float images in batches of `batch_size`."""
    params = self._replicate(params)
    out = []
    for idx, m in _chunks(np.arange(len(images)), self.batch_size):
      x = _as_float(np.asarray(images[idx]))
      out.append(self._get(self._predict(params, *self._put(x)))[:m])
    return np.concatenate(out) if out else np.zeros(0, np.int32)

  def _replicate(self, tree: Any) -> Any:
    return tree if self.mesh is None else parallel.replicate(tree, self.mesh)

  def __call__(
    self,
    params: Any,
    key: jax.Array,
    images: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    example_ids: jax.typing.ArrayLike | None = None,
    on_batch: Callable[..., None] | None = None,
    completed: dict[str, Sequence[Sequence[int]]] | None = None,
    return_adversarial: bool = True,
  ) -> AutoAttackResult:
    """Attacks the points; see the class docstring.

    Args:
      params: the first argument of `logits_fn`.
      key: PRNG key; attack k draws from ``fold_in(key, index of its name
        in ATTACK_NAMES)``, folded again per example id.
      images: [N, ...] images within `bounds`, float or uint8 (uint8
        images are divided by 255 batch by batch, for bounds (0, 1)); or
        any object with ``len()`` whose ``images[index_array]`` gives
        those images (e.g. one that reads and preprocesses them from
        disk), so that only a batch at a time is in memory.
      labels: [N] integer labels.
      example_ids: [N] global ids (default ``arange(N)``).
      on_batch: called after every attack batch as ``on_batch(name,
        batch, points, broken, todo, robust)``: the batch's index within
        the attack, its (real) point indices, those it broke, how many
        points the attack has in all, and how many are still robust.
      completed: batches already done in an earlier, interrupted run, as
        ``{name: [points broken by batch 0, by batch 1, ...]}`` (what
        `on_batch` reported): they are not run again, and their points
        count as broken (their adversarial image is then the clean one).
        The batches of an attack depend only on the attacks before it, so
        a resumed run ends with the same `broken_by` as an uninterrupted
        one.
      return_adversarial: False returns ``adversarial=None`` and keeps no
        image of the whole set in memory (for large evaluations that need
        only `broken_by`).

    Returns:
      An `AutoAttackResult`.
    """
    labels = np.asarray(labels)
    if example_ids is None:
      example_ids = np.arange(len(labels))
    example_ids = np.asarray(example_ids)
    if not hasattr(images, '__getitem__') or isinstance(images, jax.Array):
      images = np.asarray(images)
    if len(images) != len(labels) or example_ids.shape != labels.shape:
      raise ValueError(
        f'images ({len(images)}), labels {labels.shape} and example_ids '
        f'{example_ids.shape} must have the same length.'
      )

    def fetch(idx):
      return _as_float(np.asarray(images[idx]))

    n = len(labels)
    params = self._replicate(params)
    key = self._replicate(key)
    clean = self.predict(params, images)
    probe = np.resize(np.arange(n), self.batch_size) if n else None
    checks = (
      self._first_checks(
        params, fetch(probe), labels[probe], min(n, self.batch_size)
      )
      if n
      else {}
    )
    broken_by = np.where(clean == labels, -1, 0).astype(np.int32)
    adv = {} if return_adversarial else None
    accuracy = {'clean': float(np.mean(broken_by == -1)) if n else math.nan}
    attack_keys = {
      name: jax.random.fold_in(key, ATTACK_NAMES.index(name))
      for name in self.names
    }
    like = fetch(np.zeros(1, np.int64)) if n else None
    for k, name in enumerate(self.names, start=1):
      todo = np.flatnonzero(broken_by == -1)
      if self.compile_ahead:
        # This attack's programs first; then the later attacks' for the
        # same points (an upper bound of theirs): after the first attack
        # (which breaks the most) for its sizes, before it only the full
        # batches of a set that spans several (one batch's survivors fit
        # a smaller program, compiled once they are known).
        full, tail = divmod(len(todo), self.batch_size)
        sizes = [self.batch_size] if full else []
        sizes += [self._tail_size(tail)] if tail else []
        for later in self.names[k - 1 :]:
          for j, size in enumerate(sizes):
            if later == name or k > 1 or (j == 0 and full >= 2):
              self._compile_ahead(later, params, attack_keys[later], size, like)
      attack_key = attack_keys[name]
      done_before = list((completed or {}).get(name, ()))
      start = time.perf_counter()
      chunks = _chunks(todo, self.batch_size, self._tail_size)
      for b, (idx, m) in enumerate(chunks):
        real = idx[:m]
        if b < len(done_before):
          hit = np.asarray(done_before[b], np.int64)
          broken_by[hit] = k
          continue
        x = fetch(idx)
        attack = self.compiled(name)
        if self.compile_ahead:
          attack = self._compile_ahead(
            name, params, attack_key, len(idx), like
          ).result()
        out, _ = attack(
          params,
          attack_key,
          *self._put(
            x, labels[idx].astype(np.int32), example_ids[idx].astype(np.int32)
          ),
        )
        out = self._get(out)[:m]
        pred = self.predict(params, out)
        ok = (pred != labels[real]) & _within_ball(
          out, x[:m], self.epsilon, self.norm, self.bounds
        )
        if adv is not None:
          adv.update(zip(real[ok].tolist(), out[ok]))
        broken_by[real[ok]] = k
        if on_batch is not None:
          robust = int(np.sum(broken_by == -1))
          on_batch(name, b, real, real[ok], len(todo), robust)
      accuracy[name] = float(np.mean(broken_by == -1)) if n else math.nan
      logging.info(
        'autoattack %s: robust accuracy %.2f%% (%d points attacked in %.1f s)',
        name,
        100 * accuracy[name],
        len(todo),
        time.perf_counter() - start,
      )
    if adv is not None:
      adv = _assemble(fetch, n, self.batch_size, adv)
    if 'square' in self.names and n:
      by_square = int(np.sum(broken_by == self.names.index('square') + 1))
      others = [a for a in self.names if a != 'square']
      checks['square'] = _check(
        by_square == 0 or not others,
        'Square broke no point that the gradient attacks left robust',
        f'Square (no gradients) broke {by_square} points that '
        f'{", ".join(others)} left robust: the gradients may be masked',
      )
    for name, c in checks.items():
      if c['status'] == 'warn':
        logging.warning('AutoAttack check %s: %s', name, c['message'])
    return AutoAttackResult(adv, broken_by, self.names, accuracy, checks)


def _ignore_choice(fn, logits_fn, key, images, labels, choice, **kwargs):
  del choice
  return fn(logits_fn, key, images, labels, **kwargs)


class _Bound:
  """A future of a compiled program with its `choice` argument bound."""

  def __init__(self, future: futures.Future, choice: Any):
    self._future, self._choice = future, choice

  def result(self) -> Callable[..., Any]:
    exe, choice = self._future.result(), self._choice
    return lambda params, key, *batch: exe(params, key, choice, *batch)


def _as_float(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x


def _assemble(fetch, n, batch_size, adv) -> np.ndarray:
  """The clean images with the successful adversarial ones put in."""
  parts = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(n, start + batch_size))
    x = np.array(fetch(idx), copy=True)
    for j, i in enumerate(idx.tolist()):
      if i in adv:
        x[j] = adv[i]
    parts.append(x)
  if parts:
    return np.concatenate(parts)
  return np.zeros((0,) + np.shape(fetch(np.zeros(0, np.int64)))[1:], np.float32)


def _chunks(
  idx: np.ndarray, size: int, tail_size: Callable[[int], int] | None = None
):
  """(batch of indices, how many are real): batches of `size`, the last one
  padded (by repeating its first index) to `size`, or to ``tail_size(m)``
  for its `m` points."""
  for start in range(0, len(idx), size):
    chunk = idx[start : start + size]
    m = len(chunk)
    padded = size if m == size or tail_size is None else tail_size(m)
    if m < padded:
      chunk = np.concatenate([chunk, np.full(padded - m, chunk[0])])
    yield chunk, m


@functools.lru_cache(maxsize=8)
def _cached(logits_fn, epsilon, norm, version, attacks, batch_size, bounds):
  return AutoAttack(
    lambda _, x: logits_fn(x),
    epsilon=epsilon,
    norm=norm,
    version=version,
    attacks=attacks,
    batch_size=batch_size,
    bounds=bounds,
  )


def autoattack(
  logits_fn: ball.LogitsFn,
  key: jax.Array,
  images: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  epsilon: float,
  norm: str = 'linf',
  version: str = 'standard',
  attacks: Sequence[str] | None = None,
  batch_size: int = 500,
  bounds: tuple[float, float] = (0.0, 1.0),
  example_ids: jax.typing.ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """AutoAttack of ``logits_fn(x)``: adversarial images and who broke each.

  The compiled attacks are kept for the same ``logits_fn`` object and
  settings (a small cache), so calling this twice with the same function
  compiles nothing the second time. Models whose weights change should use
  `AutoAttack` with the weights as ``params``.

  Args:
    logits_fn: maps [batch, ...] images to [batch, num_classes] logits.
    key: PRNG key.
    images: [N, ...] float images within `bounds`.
    labels: [N] integer labels.
    epsilon: radius of the ball.
    norm: 'linf' or 'l2'.
    version: 'standard', 'plus', 'rand' or 'custom'.
    attacks: names for 'custom' (`ATTACK_NAMES`).
    batch_size: points per attack call.
    bounds: (lo, hi) pixel range (Python numbers).
    example_ids: [N] global example ids.

  Returns:
    ``(adversarial_images, broken_by)``; see `AutoAttackResult`.

  Examples:
    >>> w = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
    >>> x = jnp.array([[0.6, 0.4], [0.9, 0.1]])
    >>> adv, broken_by = autoattack(lambda x: x @ w, jax.random.key(0), x,
    ...     jnp.array([0, 0]), epsilon=0.3, version='custom',
    ...     attacks=['apgd-ce'], batch_size=2)
    >>> broken_by.tolist()
    [1, -1]
  """
  aa = _cached(
    logits_fn,
    float(epsilon),
    norm,
    version,
    None if attacks is None else tuple(attacks),
    int(batch_size),
    tuple(float(b) for b in bounds),
  )
  result = aa(None, key, images, labels, example_ids=example_ids)
  return result.adversarial, result.broken_by
