"""Auto-PGD (Croce & Hein, ICML 2020): APGD-CE, APGD-DLR and APGD-T.

APGD is PGD with momentum and a step size that adapts itself, with no
hyperparameter to tune besides the budget of iterations. These are the
attacks of AutoAttack, reproduced step by step from the authors' reference
code (``APGDAttack`` and ``APGDAttack_targeted``):

* Start: a point of the ball's surface (L-inf: uniform noise in [-1, 1]
  rescaled to max-norm ``epsilon``; L2: Gaussian noise rescaled to L2 norm
  ``epsilon``), clipped to ``bounds``; or a given ``x_init``.
* Step: ``z = P(x_k + eta_k * s(grad))`` with ``s`` the sign (L-inf) or the
  L2-normalised gradient, then ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)
  (x_k - x_{k-1}))`` with momentum ``a = 0.75`` (``a = 1`` at the first
  step, so ``x_1 = z``). The initial step is ``eta_0 = 2 epsilon``, one per
  example.
* Checkpoints (:func:`checkpoints`): windows of 22%, 19%, 16%, ... of the
  iterations (never shorter than 6%). At each, an example halves its step
  if the loss increased in at most ``rho`` of the window's steps, or if its
  step was not halved at the previous checkpoint and its best loss did not
  improve since then; it then restarts from its best-loss point (with the
  gradient there). As in the reference, the first window counts the first
  iterate's loss as an increase when it is positive (it is compared with an
  unwritten, zero, entry of the loss history).
* Success: an example is adversarial as soon as ANY point the attack
  evaluates is misclassified; the point returned is the last misclassified
  point evaluated, as in the reference. Restarts (and, for APGD-T, target
  classes) attack again only the examples not broken yet.

The losses are the cross-entropy, the difference of logits ratio (DLR,
:func:`dlr_loss`) and its targeted version (:func:`targeted_dlr_loss`),
with the reference's epsilons in the denominators. Their gradients follow
torch's order of operations (custom VJPs): the DLR gradient is exactly zero
where the loss is flat, as the reference's, and the cross-entropy keeps
its float32 precision at saturation. The gradient is that of the SUM of
per-example losses, so examples never interact: an attack's result does not
depend on the batch or its split over devices (up to the float rounding of
the model's batched ops), provided the caller passes GLOBAL
``example_ids`` (the random start of example i, restart r, is drawn from
``fold_in(fold_in(key, r), example_ids[i])``).

Under ``jax.jit`` ``epsilon`` (and ``rho``) may be traced; ``num_steps``,
``num_restarts``, ``num_target_classes``, ``norm`` and ``loss`` are static.
The iterations run in a ``jax.lax.fori_loop``, the restarts and target
classes in a ``jax.lax.while_loop`` that stops once every example is
broken. See :mod:`fdjax.attacks.gradient` for how to pass a Flax model as
``logits_fn`` and for data-parallel use.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdjax.attacks import apgd_losses
from fdjax.attacks import ball
from fdjax.attacks.apgd_losses import LOSSES
from fdjax.attacks.apgd_losses import TARGETED_LOSSES
from fdjax.attacks.apgd_losses import dlr_loss
from fdjax.attacks.apgd_losses import targeted_dlr_loss
from fdjax.attacks.ball import LogitsFn

# The reference's constants: the epsilon of its denominators (DLR losses,
# normalisations) and the fractions of iterations that set the checkpoint
# windows (first window, shortest window, decrease per checkpoint).
_TINY = 1e-12
_FIRST_WINDOW = 0.22
_MIN_WINDOW = 0.06
_WINDOW_DECREASE = 0.03
_MOMENTUM = 0.75

_LossFn = apgd_losses.LossFn
_LOSS_FNS = apgd_losses.LOSS_FNS
__all__ = (
  'LOSSES',
  'TARGETED_LOSSES',
  'apgd',
  'apgd_switch',
  'apgd_targeted',
  'checkpoints',
  'dlr_loss',
  'targeted_dlr_loss',
)


def _windows(num_steps: int) -> np.ndarray:
  """[num_steps] int32: the window length at each checkpoint, else 0."""
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}.')
  window = max(int(_FIRST_WINDOW * num_steps), 1)
  min_window = max(int(_MIN_WINDOW * num_steps), 1)
  decrease = max(int(_WINDOW_DECREASE * num_steps), 1)
  out = np.zeros(num_steps, np.int32)
  i = window - 1
  while i < num_steps:
    out[i] = window
    window = max(window - decrease, min_window)
    i += window
  return out


def checkpoints(num_steps: int) -> np.ndarray:
  """The iterations (0-based) after which APGD checks its step size.

  The first window is ``max(int(0.22 n), 1)`` iterations long; each next
  one is ``max(int(0.03 n), 1)`` shorter, but never shorter than
  ``max(int(0.06 n), 1)``: the reference's integer version of the paper's
  ``p_j = p_{j-1} + max(p_{j-1} - p_{j-2} - 0.03, 0.06)``.

  Args:
    num_steps: the number of iterations n >= 1, a Python int.

  Returns:
    Sorted int32 numpy array of iteration indices in [0, num_steps).

  Raises:
    ValueError: if num_steps < 1.

  Examples:
    >>> checkpoints(100).tolist()
    [21, 40, 56, 69, 79, 86, 92, 98]
  """
  return np.flatnonzero(_windows(int(num_steps))).astype(np.int32)


def _normalize(x: jax.Array, norm: str) -> jax.Array:
  """x / (||x|| + 1e-12) per example, as the reference normalises."""
  axes = ball.reduce_axes(x)
  if norm == 'linf':
    n = jnp.max(jnp.abs(x), axis=axes)
  else:
    n = jnp.sqrt(jnp.sum(jnp.square(x), axis=axes))
  return x / ball.per_example(n + _TINY, x)


def _project(x, x0, epsilon, norm, lo, hi):
  """The reference's projection onto the ball, then clipping to bounds."""
  if norm == 'linf':
    x = jnp.clip(x, x0 - epsilon, x0 + epsilon)
  else:
    d = x - x0
    n = ball.per_example(ball.l2_norm(d), d)
    x = x0 + _normalize(d, norm) * jnp.minimum(epsilon, n)
  return jnp.clip(x, lo, hi)


def _random_start(key, x0, epsilon, norm, example_ids, lo, hi):
  """A point of the ball's surface (the reference's start), clipped."""
  keys = ball.example_keys(key, example_ids)
  shape = x0.shape[1:]
  if norm == 'linf':
    draw = lambda k: jax.random.uniform(k, shape, x0.dtype, -1.0, 1.0)
  else:
    draw = lambda k: jax.random.normal(k, shape, x0.dtype)
  t = jax.vmap(draw)(keys)
  return jnp.clip(x0 + epsilon * _normalize(t, norm), lo, hi)


def _run(
  logits_fn: LogitsFn,
  loss_fn: _LossFn,
  x0: jax.Array,
  labels: jax.Array,
  targets: jax.Array,
  x_start: jax.Array,
  epsilon: jax.Array,
  norm: str,
  lo: jax.Array,
  hi: jax.Array,
  num_steps: int,
  rho: Any,
  trace: bool = False,
  eot_iter: int = 1,
  model_key: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """One APGD run from x_start (the reference's attack_single_run).

  With ``model_key`` the model is randomised, ``logits_fn(x, key)``, and
  every evaluation averages the gradient over ``eot_iter`` draws of its
  randomness (expectation over transformation); the loss and the
  prediction are those of the last draw, as in the reference.

  Returns a dict: 'x_best' (the best-loss point), 'loss_best', 'x_adv' (the
  last misclassified point evaluated, else x_start), 'is_adv' [batch] bool,
  'step' (the final step sizes) and, with trace, 'losses' [num_steps + 1,
  batch] (the loss at x_start and at every iterate) and 'iterates' (those
  points).
  """
  batch = x0.shape[0]
  dtype = x0.dtype
  windows = jnp.asarray(_windows(num_steps))
  epsilon = jnp.asarray(epsilon, dtype)
  rho = jnp.asarray(rho, jnp.float32)

  def objective(x, key):
    out = logits_fn(x) if model_key is None else logits_fn(x, key)
    logits = ball.check_logits(out, batch).astype(jnp.float32)
    losses = loss_fn(logits, labels, targets)
    return jnp.sum(losses), (losses, logits)

  value_and_grad = jax.value_and_grad(objective, has_aux=True)

  def evaluate(x, i):
    """Loss, gradient and correctness at x, the i-th evaluation."""

    def draw(j):
      if model_key is None:
        return value_and_grad(x, None)
      k = jax.random.fold_in(jax.random.fold_in(model_key, i), j)
      return value_and_grad(x, k)

    (_, (losses, logits)), grad = draw(0)
    if eot_iter > 1:

      def more(j, c):
        g, _, _ = c
        (_, (losses, logits)), g_j = draw(j)
        return g + g_j, losses, logits

      grad, losses, logits = jax.lax.fori_loop(
        1, eot_iter, more, (grad, losses, logits)
      )
      grad = grad / eot_iter
    correct = jnp.argmax(logits, axis=-1) == labels
    return losses, grad.astype(dtype), correct

  loss, grad, correct = evaluate(x_start, 0)
  state = dict(
    x=x_start,
    x_prev=x_start,
    grad=grad,
    x_best=x_start,
    grad_best=grad,
    loss_best=loss,
    x_adv=x_start,
    robust=correct,
    step=jnp.full((batch,), 2.0, dtype) * epsilon,
    # The reference compares the first loss of the first window with an
    # unwritten (zero) entry of its loss history.
    loss_prev=jnp.zeros_like(loss),
    num_increases=jnp.zeros((batch,), jnp.int32),
    loss_best_checked=loss,
    reduced_checked=jnp.ones((batch,), bool),
  )
  if trace:
    state['losses'] = jnp.zeros((num_steps + 1, batch), loss.dtype)
    state['losses'] = state['losses'].at[0].set(loss)
    state['iterates'] = jnp.zeros((num_steps + 1,) + x0.shape, dtype)
    state['iterates'] = state['iterates'].at[0].set(x_start)

  def body(i, s):
    x, momentum = s['x'], jnp.where(i > 0, _MOMENTUM, 1.0).astype(dtype)
    step = ball.per_example(s['step'], x)
    if norm == 'linf':
      z = _project(x + step * jnp.sign(s['grad']), x0, epsilon, norm, lo, hi)
    else:
      z = _project(
        x + step * _normalize(s['grad'], norm), x0, epsilon, norm, lo, hi
      )
    x_new = x + (z - x) * momentum + (x - s['x_prev']) * (1.0 - momentum)
    x_new = _project(x_new, x0, epsilon, norm, lo, hi)

    loss, grad, correct = evaluate(x_new, i + 1)
    wrong = ball.per_example(~correct, x)
    s = dict(s)
    s['robust'] = s['robust'] & correct
    s['x_adv'] = jnp.where(wrong, x_new, s['x_adv'])
    improved = loss > s['loss_best']
    better = ball.per_example(improved, x)
    s['x_best'] = jnp.where(better, x_new, s['x_best'])
    s['grad_best'] = jnp.where(better, grad, s['grad_best'])
    s['loss_best'] = jnp.where(improved, loss, s['loss_best'])
    num_increases = s['num_increases'] + (loss > s['loss_prev'])
    s['loss_prev'] = loss
    if trace:
      s['losses'] = s['losses'].at[i + 1].set(loss)
      s['iterates'] = s['iterates'].at[i + 1].set(x_new)

    # Checkpoint: halve the step of examples whose loss rarely increased or
    # whose best loss stalled, and send them back to their best point.
    window = windows[i]
    check = window > 0
    oscillates = num_increases.astype(jnp.float32) <= (
      window.astype(jnp.float32) * rho
    )
    stalled = ~s['reduced_checked'] & (s['loss_best_checked'] >= s['loss_best'])
    reduce = check & (oscillates | stalled)
    s['reduced_checked'] = jnp.where(
      check, oscillates | stalled, s['reduced_checked']
    )
    s['loss_best_checked'] = jnp.where(
      check, s['loss_best'], s['loss_best_checked']
    )
    s['num_increases'] = jnp.where(check, 0, num_increases)
    s['step'] = jnp.where(reduce, s['step'] / 2.0, s['step'])
    back = ball.per_example(reduce, x)
    s['x_prev'] = x
    s['x'] = jnp.where(back, s['x_best'], x_new)
    s['grad'] = jnp.where(back, s['grad_best'], grad)
    return s

  s = jax.lax.fori_loop(0, num_steps, body, state)
  out = dict(
    x_best=s['x_best'],
    loss_best=s['loss_best'],
    x_adv=s['x_adv'],
    is_adv=~s['robust'],
    step=s['step'],
  )
  if trace:
    out['losses'] = s['losses']
    out['iterates'] = s['iterates']
  return out


def _attack(
  logits_fn: LogitsFn,
  key: jax.Array | None,
  images: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  choices: tuple[tuple[str, int, int | None], ...],
  choice: jax.typing.ArrayLike,
  *,
  epsilon: jax.typing.ArrayLike,
  norm: str,
  num_steps: int,
  rho: Any,
  bounds: tuple[Any, Any],
  example_ids: jax.typing.ArrayLike | None,
  x_init: jax.typing.ArrayLike | None,
  eot_iter: int = 1,
  model_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Runs the configuration ``choices[choice]`` with its restarts.

  `choices` is a static tuple of (loss, num_restarts, num_target_classes):
  APGD where num_target_classes is None, else APGD-T. With one choice the
  program holds that attack alone; with several, the (traced) index
  `choice` picks the one to run, and one program runs any of them.
  """
  if not choices:
    raise ValueError('choices must hold at least one configuration, got ().')
  for loss, _, targets in choices:
    valid = LOSSES if targets is None else TARGETED_LOSSES
    if loss not in valid:
      kind = 'APGD' if targets is None else 'APGD-T'
      raise ValueError(f'unknown {kind} loss {loss!r}; valid: {valid}.')
  ball.check_norm(norm)
  lo, hi = ball.check_bounds(bounds)
  images, labels, example_ids = ball.check_batch(images, labels, example_ids)
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f'num_steps must be a Python int >= 1, got {num_steps!r}.')
  for _, restarts, _ in choices:
    if not isinstance(restarts, (int, np.integer)) or restarts < 1:
      raise ValueError(
        f'num_restarts must be a Python int >= 1, got {restarts!r}.'
      )
  if x_init is None and key is None:
    raise ValueError('a random start needs a key; got key=None.')
  if not isinstance(eot_iter, (int, np.integer)) or eot_iter < 1:
    raise ValueError(f'eot_iter must be a Python int >= 1, got {eot_iter!r}.')
  batch = images.shape[0]
  dtype = jnp.promote_types(images.dtype, jnp.float32)
  x0 = images.astype(dtype)
  epsilon = jnp.asarray(epsilon, dtype)
  lo = jnp.asarray(lo, dtype)
  hi = jnp.asarray(hi, dtype)
  if x_init is not None:
    x_init = jnp.asarray(x_init)
    if x_init.shape != images.shape:
      raise ValueError(
        f'x_init must have the shape of images {images.shape}, got '
        f'{x_init.shape}.'
      )
    x_init = _project(x_init.astype(dtype), x0, epsilon, norm, lo, hi)

  if model_key is None:
    clean_logits = logits_fn(x0)
  else:
    clean_logits = logits_fn(x0, jax.random.fold_in(model_key, 2**32 - 1))
  clean_logits = ball.check_logits(clean_logits, batch)
  num_classes = clean_logits.shape[-1]
  robust = jnp.argmax(clean_logits, axis=-1) == labels
  for _, _, targets in choices:
    if targets is not None and (
      not isinstance(targets, (int, np.integer))
      or not 1 <= targets <= num_classes - 1
    ):
      raise ValueError(
        f'num_target_classes must be a Python int in [1, {num_classes - 1}], '
        f'got {targets!r}.'
      )
  targeted = any(t is not None for _, _, t in choices)
  # Classes by increasing clean logit: the target of the k-th target class
  # (k = 1, 2, ...) is the class with the (k + 1)-th largest clean logit.
  ranking = jnp.argsort(clean_logits, axis=-1) if targeted else None
  if len(choices) == 1:
    ((loss, num_restarts, num_target_classes),) = choices
    loss_fn = _LOSS_FNS[loss]
    is_targeted = num_target_classes is not None
    num_runs = num_restarts * (num_target_classes or 1)
  else:
    table = lambda values: jnp.asarray(values, jnp.int32)[choice]
    num_restarts = table([r for _, r, _ in choices])
    num_runs = table([r * (t or 1) for _, r, t in choices])
    is_targeted = table([t is not None for _, _, t in choices]) > 0
    fns = [_LOSS_FNS[name] for name, _, _ in choices]
    loss_fn = lambda *args: jax.lax.switch(choice, fns, *args)

  def cond(c):
    run, robust, _ = c
    return (run < num_runs) & jnp.any(robust)

  def body(c):
    run, robust, adv = c
    if ranking is None:
      targets = labels
    else:
      rank = jnp.maximum(num_classes - 2 - run // num_restarts, 0)
      targets = jnp.where(is_targeted, jnp.take(ranking, rank, axis=1), labels)
    if x_init is None:
      x_start = _random_start(
        jax.random.fold_in(key, run), x0, epsilon, norm, example_ids, lo, hi
      )
    else:
      x_start = x_init
    r = _run(
      logits_fn,
      loss_fn,
      x0,
      labels,
      targets,
      x_start,
      epsilon,
      norm,
      lo,
      hi,
      num_steps,
      rho,
      eot_iter=eot_iter,
      model_key=None
      if model_key is None
      else jax.random.fold_in(model_key, run),
    )
    broken = robust & r['is_adv']
    adv = jnp.where(ball.per_example(broken, adv), r['x_adv'], adv)
    return run + 1, robust & ~broken, adv

  _, robust, adv = jax.lax.while_loop(
    cond, body, (jnp.zeros((), jnp.int32), robust, x0)
  )
  adv = jax.lax.stop_gradient(adv.astype(images.dtype))
  return adv, jax.lax.stop_gradient(~robust)


def apgd(
  logits_fn: LogitsFn,
  key: jax.Array | None,
  images: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  epsilon: jax.typing.ArrayLike,
  norm: str = 'linf',
  loss: str = 'ce',
  num_steps: int = 100,
  num_restarts: int = 1,
  rho: Any = 0.75,
  bounds: tuple[Any, Any] = (0.0, 1.0),
  example_ids: jax.typing.ArrayLike | None = None,
  x_init: jax.typing.ArrayLike | None = None,
  eot_iter: int = 1,
  model_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Untargeted Auto-PGD, APGD-CE or APGD-DLR, under L-inf or L2.

  Ascends the cross-entropy or the DLR loss of the true labels with
  momentum and an adaptive step size (see the module docstring), from a
  random point of the ball's surface, ``num_restarts`` times for the
  examples not broken yet. Examples the model already misclassifies are
  not attacked (they are returned clean, with ``is_adv`` True).

  Args:
    logits_fn: maps a [batch, ...] image batch to [batch, num_classes]
      logits, e.g. ``lambda x: model.apply(variables, x, train=False)``.
    key: a PRNG key for the random starts; may be None with ``x_init``.
    images: [batch, ...] clean images, a float dtype, inside ``bounds``.
    labels: [batch] integer true labels.
    epsilon: radius of the ball (may be traced).
    norm: ``'linf'`` or ``'l2'``.
    loss: ``'ce'`` (softmax cross-entropy) or ``'dlr'`` (:func:`dlr_loss`,
      needs >= 3 classes); computed in float32.
    num_steps: iterations per restart, a Python int >= 1.
    num_restarts: number of runs, a Python int >= 1.
    rho: the fraction of loss increases in a checkpoint window below which
      (at most) the step is halved.
    bounds: (lo, hi) valid pixel range; scalars or arrays broadcasting
      against the images.
    example_ids: [batch] integer GLOBAL ids of the examples, for the random
      starts; defaults to ``arange(batch)``.
    x_init: optional [batch, ...] start point used instead of the random
      start (by every restart), projected onto the ball and ``bounds``.
    eot_iter: gradient samples averaged per iteration (expectation over
      transformation, for randomised models; AutoAttack's 'rand' uses 20).
    model_key: for a randomised model: ``logits_fn(x, key)`` is then called
      with keys derived from it (restart, iteration, sample); None: the
      model is deterministic, ``logits_fn(x)``.

  Returns:
    ``(adv_images, is_adv)``: the adversarial images (same shape and dtype
    as ``images``; the clean image where nothing succeeded) and [batch]
    bool, True where ``adv_images`` is misclassified.

  Raises:
    ValueError: for an unknown norm or loss, bounds without lo < hi, bad
      shapes, num_steps or num_restarts < 1, or no key without ``x_init``.

  Examples:
    >>> w = jnp.array([[1.0, -1.0], [-2.0, 2.0]])
    >>> logits_fn = lambda x: x.reshape(len(x), -1) @ w
    >>> x = jnp.array([[[0.5, 0.3]], [[0.9, 0.1]]])
    >>> adv, is_adv = apgd(logits_fn, jax.random.key(0), x, jnp.array([1, 0]),
    ...                    epsilon=0.1, num_steps=5)
    >>> is_adv.tolist()
    [True, False]
    >>> bool(jnp.abs(adv - x).max() <= 0.1 + 1e-6)
    True
  """
  return _attack(
    logits_fn,
    key,
    images,
    labels,
    ((loss, num_restarts, None),),
    0,
    epsilon=epsilon,
    norm=norm,
    num_steps=num_steps,
    rho=rho,
    bounds=bounds,
    example_ids=example_ids,
    x_init=x_init,
    eot_iter=eot_iter,
    model_key=model_key,
  )


def apgd_targeted(
  logits_fn: LogitsFn,
  key: jax.Array | None,
  images: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  epsilon: jax.typing.ArrayLike,
  norm: str = 'linf',
  loss: str = 'dlr-targeted',
  num_steps: int = 100,
  num_target_classes: int = 9,
  num_restarts: int = 1,
  rho: Any = 0.75,
  bounds: tuple[Any, Any] = (0.0, 1.0),
  example_ids: jax.typing.ArrayLike | None = None,
  x_init: jax.typing.ArrayLike | None = None,
  eot_iter: int = 1,
  model_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """APGD-T: Auto-PGD on the targeted DLR loss, target after target.

  For k = 1 .. ``num_target_classes``, the examples not broken yet are
  attacked ``num_restarts`` times towards the class with the (k + 1)-th
  largest clean logit. Success is any misclassification (not necessarily
  as the target), as in AutoAttack.

  Args:
    logits_fn: maps images to [batch, num_classes] logits.
    key: a PRNG key for the random starts; may be None with ``x_init``.
    images: [batch, ...] clean float images inside ``bounds``.
    labels: [batch] integer true labels.
    epsilon: radius of the ball (may be traced).
    norm: ``'linf'`` or ``'l2'``.
    loss: ``'dlr-targeted'`` (:func:`targeted_dlr_loss`, needs >= 4
      classes) or ``'ce-targeted'`` (minus the cross-entropy of the target).
    num_steps: iterations per run, a Python int >= 1.
    num_target_classes: number of target classes, in [1, num_classes - 1].
    num_restarts: runs per target class, a Python int >= 1.
    rho: as in :func:`apgd`.
    bounds: (lo, hi) valid pixel range.
    example_ids: [batch] global example ids; the run of target class k,
      restart r draws its start from ``fold_in(fold_in(key, (k - 1) *
      num_restarts + r), id)``.
    x_init: optional start point instead of the random starts.
    eot_iter: as in :func:`apgd`.
    model_key: as in :func:`apgd`.

  Returns:
    ``(adv_images, is_adv)`` as :func:`apgd`.

  Raises:
    ValueError: as :func:`apgd`, or num_target_classes out of range.

  Examples:
    >>> w = jnp.array([[1.0, -1.0, 0.0, 0.2], [-2.0, 2.0, 0.1, 0.0]])
    >>> logits_fn = lambda x: x.reshape(len(x), -1) @ w
    >>> x = jnp.array([[[0.5, 0.45]], [[0.9, 0.1]]])
    >>> adv, is_adv = apgd_targeted(
    ...     logits_fn, jax.random.key(0), x, jnp.array([1, 0]), epsilon=0.1,
    ...     num_steps=5, num_target_classes=3)
    >>> is_adv.tolist()
    [True, False]
  """
  return _attack(
    logits_fn,
    key,
    images,
    labels,
    ((loss, num_restarts, num_target_classes),),
    0,
    epsilon=epsilon,
    norm=norm,
    num_steps=num_steps,
    rho=rho,
    bounds=bounds,
    example_ids=example_ids,
    x_init=x_init,
    eot_iter=eot_iter,
    model_key=model_key,
  )


def apgd_switch(
  logits_fn: LogitsFn,
  key: jax.Array | None,
  images: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  choice: jax.typing.ArrayLike,
  *,
  choices: tuple[tuple[str, int, int | None], ...],
  epsilon: jax.typing.ArrayLike,
  norm: str = 'linf',
  num_steps: int = 100,
  rho: Any = 0.75,
  bounds: tuple[Any, Any] = (0.0, 1.0),
  example_ids: jax.typing.ArrayLike | None = None,
  x_init: jax.typing.ArrayLike | None = None,
  eot_iter: int = 1,
  model_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """APGD or APGD-T, whichever of `choices` the traced `choice` picks.

  One compiled program for several configurations: AutoAttack runs
  APGD-CE and APGD-T (and APGD-DLR) through it, so the model's forward and
  backward pass inside the iterations is compiled once, not once per
  attack. ``choices[i] = (loss, num_restarts, num_target_classes)`` runs
  as ``apgd(..., loss=loss, num_restarts=num_restarts)`` when
  ``num_target_classes`` is None, else as ``apgd_targeted(...,
  loss=loss, num_restarts=num_restarts,
  num_target_classes=num_target_classes)``, with the same random starts.

  Args:
    logits_fn, key, images, labels: as :func:`apgd`.
    choice: an int32 scalar (may be traced), the index into `choices`.
    choices: a static tuple of (loss, num_restarts, num_target_classes).
    epsilon, norm, num_steps, rho, bounds, example_ids, x_init, eot_iter,
      model_key: as :func:`apgd`, shared by all the choices.

  Returns:
    ``(adv_images, is_adv)`` as :func:`apgd`.

  Raises:
    ValueError: as :func:`apgd` and :func:`apgd_targeted`, for any of the
      choices; or empty `choices`.

  Examples:
    >>> w = jnp.array([[1.0, -1.0, 0.0, 0.2], [-2.0, 2.0, 0.1, 0.0]])
    >>> logits_fn = lambda x: x.reshape(len(x), -1) @ w
    >>> x = jnp.array([[[0.5, 0.45]], [[0.9, 0.1]]])
    >>> choices = (('ce', 1, None), ('dlr-targeted', 1, 3))
    >>> adv, is_adv = apgd_switch(logits_fn, jax.random.key(0), x,
    ...     jnp.array([1, 0]), 1, choices=choices, epsilon=0.1, num_steps=5)
    >>> is_adv.tolist()
    [True, False]
  """
  return _attack(
    logits_fn,
    key,
    images,
    labels,
    tuple((str(c[0]), c[1], c[2]) for c in choices),
    jnp.asarray(choice, jnp.int32),
    epsilon=epsilon,
    norm=norm,
    num_steps=num_steps,
    rho=rho,
    bounds=bounds,
    example_ids=example_ids,
    x_init=x_init,
    eot_iter=eot_iter,
    model_key=model_key,
  )
