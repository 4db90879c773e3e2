"""Transfer (black-box) attackers: MI-FGSM, DI-FGSM, TI-FGSM and ensembles.

The attackers of the paper's Table 2 and of the CAAD 2018 defense track
were the winning methods of the NIPS 2017 / CAAD competitions, run on a
source model (or an ensemble of them) whose adversarial images are then
given to the defender. They are iterative FGSM with up to three additions,
combined freely in :func:`transfer_attack`:

* **MI** (momentum, Dong et al. 2018, "Boosting adversarial attacks with
  momentum"): ``g <- mu * g + grad / ||grad||_1`` (per example), and the
  step follows ``sign(g)``. The original code divides by the mean absolute
  value instead of the L1 norm; per example that is the same vector times
  the pixel count, so the signs, and the attack, are identical.
* **DI** (diverse inputs, Xie et al. 2019, "Improving transferability of
  adversarial examples with input diversity"): with probability ``p`` per
  example and step, the gradient is taken at a transformed image: resized
  (nearest neighbour) to ``rnd x rnd`` with ``rnd`` uniform in ``[S, R)``,
  ``R = round(S * diversity_scale)`` (330/299 in the original), placed at a
  uniform random offset on an ``R x R`` canvas of zeros, and the canvas
  resized back (nearest neighbour) to ``S x S``, so that the model sees the
  size it takes (what the authors did for models of a fixed input size).
  The draws of example i at step t come from ``fold_in(fold_in(key,
  example_ids[i]), t)``: independent of the batch split. The original draws
  one transformation per batch; per example is the same distribution for
  each image and keeps the attack of an image independent of its batch.
* **TI** (translation-invariant, Dong et al. 2019, "Evading defenses to
  transferable adversarial examples by translation-invariant attacks"): the
  gradient is convolved (depthwise, zero padding, 'SAME') with a normalised
  ``k x k`` Gaussian before the normalisation and the momentum. The
  authors' kernel (``gkern(15, nsig=3)``) is ``ti_sigma = (k - 1) / 6``,
  the default.

The step size is ``epsilon / num_steps`` (the papers'), the threat model is
L-inf around the clean images intersected with ``bounds``, there is no
random start, and the last iterate is returned. Targeted attacks descend the
loss of the targets, untargeted ones ascend the loss of the true labels, as
`fdjax.attacks.pgd`. Epsilon, step size, step count, momentum and the
diversity probability may be traced (one compile serves a sweep), the loop
is a ``fori_loop``, and the functions work under ``jit`` and
`fdjax.parallel.data_parallel` (pass GLOBAL example ids).
"""

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdjax.attacks import ball
from fdjax.attacks import gradient
from fdjax.attacks import paper
from fdjax.attacks.ball import LogitsFn

DIVERSITY_SCALE = 330 / 299
"""The original DI's canvas: 299-pixel images padded to 330."""


def canvas_size(size: int, diversity_scale: float) -> int:
  """``R = round(size * diversity_scale)``: DI's canvas for ``size`` pixels.

  Raises:
    ValueError: when R <= size (no room for a random resize).

  Examples:
    >>> canvas_size(299, DIVERSITY_SCALE), canvas_size(8, 1.25)
    (330, 10)
  """
  canvas = int(round(size * float(diversity_scale)))
  if canvas <= size:
    raise ValueError(
      f'diversity_scale={diversity_scale!r} leaves no room to resize '
      f'{size}-pixel images (canvas {canvas} <= {size}); valid: a scale with '
      f'round({size} * scale) > {size}, e.g. {(size + 2) / size:.3g}.'
    )
  return canvas


def diversity_draws(
  key: jax.Array,
  step: jax.typing.ArrayLike,
  example_ids: jax.Array,
  size: int,
  canvas: int,
  prob: jax.typing.ArrayLike,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """DI's random draws of one step, per example.

  Example i uses ``fold_in(fold_in(key, example_ids[i]), step)``.

  Args:
    key: the attack's diversity key.
    step: the step index (may be traced).
    example_ids: [batch] global example ids.
    size: the image size S.
    canvas: the canvas size R > S (:func:`canvas_size`).
    prob: the probability of transforming (may be traced).

  Returns:
    ``(rnd, top, left, apply)``, each [batch]: the resized size in [S, R),
    the offsets in [0, R - rnd) and whether the transform is applied.
  """

  def one(k):
    k = jax.random.fold_in(k, step)
    k_rnd, k_top, k_left, k_coin = jax.random.split(k, 4)
    rnd = jax.random.randint(k_rnd, (), size, canvas)
    top = jax.random.randint(k_top, (), 0, canvas - rnd)
    left = jax.random.randint(k_left, (), 0, canvas - rnd)
    return rnd, top, left, jax.random.uniform(k_coin) < prob

  return jax.vmap(one)(ball.example_keys(key, example_ids))


def diverse_inputs(
  images: jax.Array,
  rnd: jax.Array,
  top: jax.Array,
  left: jax.Array,
  apply: jax.Array,
  canvas: int,
) -> jax.Array:
  """DI's transform for given draws (see the module docstring).

  Output pixel ``i`` reads canvas pixel ``u = floor(i * R / S)``, which is
  image pixel ``floor((u - top) * S / rnd)`` when ``top <= u < top + rnd``
  and zero otherwise (TF's nearest-neighbour resize, no corner alignment);
  the same along the width with ``left``.

  Args:
    images: [batch, S, S, C] images.
    rnd, top, left, apply: [batch] draws (:func:`diversity_draws`).
    canvas: the canvas size R.

  Returns:
    [batch, S, S, C]: the transformed images where ``apply``, the images
    themselves elsewhere. Differentiable in ``images``.
  """
  size = images.shape[1]
  u = jnp.arange(size) * canvas // size  # Canvas row of each output row.

  def one(x, rnd, top, left, apply):
    def axis_map(offset):
      pos = u - offset
      inside = (pos >= 0) & (pos < rnd)
      src = jnp.clip(jnp.where(inside, pos, 0) * size // rnd, 0, size - 1)
      return src, inside

    rows, row_in = axis_map(top)
    cols, col_in = axis_map(left)
    out = x[rows][:, cols]
    mask = (row_in[:, None] & col_in[None, :]).astype(x.dtype)
    return jnp.where(apply, out * mask[..., None], x)

  return jax.vmap(one)(images, rnd, top, left, apply)


def gaussian_kernel(size: int, sigma: float | None = None) -> np.ndarray:
  """TI's normalised 2-D Gaussian, ``size x size`` (numpy float32).

  ``w(a, b) ~ exp(-(a^2 + b^2) / (2 sigma^2))`` for offsets ``a, b`` in
  ``[-(size-1)/2, (size-1)/2]``, summing to 1; ``sigma`` defaults to
  ``(size - 1) / 6``, the authors' ``gkern(size, nsig=3)``.

  Raises:
    ValueError: an even or non-positive size, or sigma <= 0.

  Examples:
    >>> k = gaussian_kernel(3, 1.0)
    >>> round(float(k.sum()), 6), k.shape, bool(k[1, 1] == k.max())
    (1.0, (3, 3), True)
  """
  if not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
    raise ValueError(
      f'ti_kernel_size={size!r} is not valid; valid: an odd integer >= 1.'
    )
  if size == 1:
    return np.ones((1, 1), np.float32)
  if sigma is None:
    sigma = (size - 1) / 6.0
  ok = isinstance(sigma, (int, float)) and math.isfinite(sigma)
  if not (ok and sigma > 0):
    raise ValueError(f'ti_sigma={sigma!r} is not valid; valid: a number > 0.')
  a = np.arange(size) - (size - 1) / 2.0
  g = np.exp(-(a**2) / (2.0 * float(sigma) ** 2))
  k = np.outer(g, g)
  return (k / k.sum()).astype(np.float32)


def smooth_gradient(grad: jax.Array, kernel: np.ndarray) -> jax.Array:
  """Depthwise 'SAME' convolution of [batch, H, W, C] with a 2-D kernel."""
  channels = grad.shape[-1]
  w = jnp.asarray(kernel, grad.dtype)[:, :, None, None]
  w = jnp.tile(w, (1, 1, 1, channels))  # HWIO, one filter per channel.
  return jax.lax.conv_general_dilated(
    grad,
    w,
    window_strides=(1, 1),
    padding='SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=channels,
    precision=jax.lax.Precision.HIGHEST,
  )


def l1_normalise(g: jax.Array) -> jax.Array:
  """``g / ||g||_1`` per example (zero where the gradient is all zero)."""
  n = jnp.sum(jnp.abs(g), axis=ball.reduce_axes(g))
  inv = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)
  return g * ball.per_example(inv, g)


def transfer_attack(
  logits_fn: LogitsFn,
  key: jax.Array | None,
  images: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  epsilon: jax.typing.ArrayLike,
  num_steps: jax.typing.ArrayLike,
  step_size: jax.typing.ArrayLike | None = None,
  momentum: jax.typing.ArrayLike = 0.0,
  diversity_prob: jax.typing.ArrayLike = 0.0,
  diversity_scale: float = DIVERSITY_SCALE,
  ti_kernel_size: int = 1,
  ti_sigma: float | None = None,
  targeted: bool = False,
  bounds: tuple[Any, Any] = (0.0, 1.0),
  loss: str = 'xent',
  example_ids: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Iterative L-inf FGSM with momentum (MI), diverse inputs (DI), TI.

  Each of ``num_steps`` steps: the gradient of the summed per-example loss
  at ``DI(x)`` (or ``x``), convolved with the TI kernel, L1-normalised per
  example and accumulated with decay ``momentum``; then ``x <- clip(x +-
  step_size * sign(g))`` to the epsilon ball and ``bounds``. With
  ``momentum=0``, ``diversity_prob=0`` and ``ti_kernel_size=1`` it is
  I-FGSM (BIM); with one step, FGSM.

  Args:
    logits_fn: images [batch, H, W, C] -> [batch, num_classes] logits (a
      source model or :func:`ensemble_logits_fn`).
    key: PRNG key of DI's draws; may be None when ``diversity_prob`` is the
      Python value 0.
    images: [batch, H, W, C] clean float images inside ``bounds`` (square
      for DI).
    labels: [batch] true labels (untargeted) or targets (targeted).
    epsilon: L-inf radius (may be traced).
    num_steps: iterations (may be traced).
    step_size: the step; default ``epsilon / num_steps`` (may be traced).
    momentum: MI's decay ``mu`` (1.0 in the paper; 0 = no momentum; may be
      traced).
    diversity_prob: DI's probability ``p`` per example and step (0.5 in
      the paper; may be traced). The Python value 0 leaves DI out.
    diversity_scale: DI's canvas over image size (static).
    ti_kernel_size: TI's odd kernel size (static; 1 = no TI).
    ti_sigma: TI's standard deviation in pixels (static; default
      ``(k - 1) / 6``).
    targeted: descend the loss of ``labels`` (targets).
    bounds: (lo, hi) pixel range.
    loss: ``'xent'`` or ``'margin'`` (`fdjax.attacks.example_losses`).
    example_ids: [batch] GLOBAL example ids (DI's draws); default
      ``arange(batch)``.

  Returns:
    The adversarial images, shape and dtype of ``images``, through
    ``stop_gradient``.

  Raises:
    ValueError: bad images, labels, ids, bounds, loss, kernel or scale, or
      DI without a key.

  Examples:
    >>> w = jnp.array([[1.0, -1.0], [-2.0, 2.0]])
    >>> logits_fn = lambda x: x.reshape(len(x), -1) @ w
    >>> x = jnp.full((1, 1, 1, 2), 0.5)
    >>> adv = transfer_attack(logits_fn, None, x, jnp.array([0]),
    ...                       epsilon=0.1, num_steps=4, momentum=1.0)
    >>> adv.reshape(-1).round(6).tolist()
    [0.4, 0.6]
  """
  if loss not in gradient.LOSSES:
    raise ValueError(f'unknown attack loss {loss!r}; valid: {gradient.LOSSES}.')
  lo, hi = ball.check_bounds(bounds)
  images, labels, example_ids = ball.check_batch(images, labels, example_ids)
  batch = images.shape[0]
  kernel = gaussian_kernel(ti_kernel_size, ti_sigma)
  use_ti = ti_kernel_size > 1
  use_di = not (
    isinstance(diversity_prob, (int, float)) and float(diversity_prob) == 0.0
  )
  if (use_ti or use_di) and images.ndim != 4:
    raise ValueError(
      f'TI and DI need [batch, H, W, C] images, got shape {images.shape}.'
    )
  canvas = 0
  if use_di:
    if images.shape[1] != images.shape[2]:
      raise ValueError(
        f'DI needs square images, got {images.shape[1]}x{images.shape[2]}.'
      )
    if key is None:
      raise ValueError('DI (diversity_prob != 0) needs a key; got key=None.')
    canvas = canvas_size(images.shape[1], diversity_scale)

  dtype = jnp.promote_types(images.dtype, jnp.float32)
  x0 = images.astype(dtype)
  epsilon = jnp.asarray(epsilon, dtype)
  num_steps = jnp.asarray(num_steps)
  if step_size is None:
    step_size = jnp.where(
      num_steps > 0, epsilon / jnp.maximum(num_steps, 1).astype(dtype), 0.0
    )
  step_size = jnp.asarray(step_size, dtype)
  momentum = jnp.asarray(momentum, dtype)
  lo = jnp.asarray(lo, dtype)
  hi = jnp.asarray(hi, dtype)
  direction = -1.0 if targeted else 1.0

  def objective(x):
    logits = ball.check_logits(logits_fn(x), batch)
    return jnp.sum(gradient.example_losses(logits, labels, loss))

  grad_fn = jax.grad(objective)

  def input_grad(step, x):
    if not use_di:
      return grad_fn(x)
    draws = diversity_draws(
      key, step, example_ids, x.shape[1], canvas, diversity_prob
    )
    # The gradient with respect to x, through the transform.
    return jax.grad(lambda z: objective(diverse_inputs(z, *draws, canvas)))(x)

  def body(step, carry):
    x, g = carry
    grad = input_grad(step, x)
    if use_ti:
      grad = smooth_gradient(grad, kernel)
    g = momentum * g + l1_normalise(grad)
    x = x + direction * step_size * jnp.sign(g)
    return ball.project(x, x0, epsilon, 'linf', lo, hi), g

  x, _ = jax.lax.fori_loop(0, num_steps, body, (x0, jnp.zeros_like(x0)))
  return jax.lax.stop_gradient(x.astype(images.dtype))


def method_name(
  momentum: float, diversity_prob: float, ti_kernel_size: int, num_steps: int
) -> str:
  """'MI-DI-TI-FGSM', 'MI-FGSM', 'I-FGSM', 'FGSM' (one step), ...

  Examples:
    >>> method_name(1.0, 0.5, 1, 10), method_name(0.0, 0.0, 1, 1)
    ('MI-DI-FGSM', 'FGSM')
  """
  parts = [
    p
    for p, on in (
      ('MI', momentum != 0),
      ('DI', diversity_prob != 0),
      ('TI', ti_kernel_size > 1),
    )
    if on
  ]
  if not parts:
    return 'FGSM' if num_steps == 1 else 'I-FGSM'
  return '-'.join(parts) + '-FGSM'


@dataclasses.dataclass(frozen=True)
class TransferAttack:
  """A transfer attacker as static configuration (hashable, jit-friendly).

  Targeted attacks draw ``fdjax.attacks.random_targets`` (never the true
  label) from ``target_key`` and DI's draws from ``key``; by default both
  come from ``target_key, key = jax.random.split(key)``, as `PGDAttack`.

  Attributes: the arguments of :func:`transfer_attack` of the same names,
  plus ``num_classes`` (targeted only).

  Examples:
    >>> attack = TransferAttack(epsilon=0.4, num_steps=8, momentum=1.0,
    ...                         targeted=True, num_classes=3)
    >>> adv, t = attack(lambda x: x.reshape(len(x), -1) @ jnp.eye(3),
    ...                 jax.random.key(1), jnp.full((4, 1, 1, 3), 0.5),
    ...                 jnp.zeros(4, int))
    >>> attack.name, bool((t != 0).all())
    ('MI-FGSM', True)
  """

  epsilon: float | None = None
  num_steps: int | None = None
  momentum: float = 0.0
  diversity_prob: float = 0.0
  diversity_scale: float = DIVERSITY_SCALE
  ti_kernel_size: int = 1
  ti_sigma: float | None = None
  targeted: bool = False
  loss: str = 'xent'
  num_classes: int | None = None
  bounds: tuple[Any, Any] = (0.0, 1.0)

  @property
  def name(self) -> str:
    return method_name(
      self.momentum, self.diversity_prob, self.ti_kernel_size, self.num_steps
    )

  def __call__(
    self,
    logits_fn: LogitsFn,
    key: jax.Array,
    images: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    example_ids: jax.typing.ArrayLike | None = None,
    epsilon: jax.typing.ArrayLike | None = None,
    num_steps: jax.typing.ArrayLike | None = None,
    target_key: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """Attacks a batch: ``(adversarial_images, attack_labels)``.

    ``attack_labels`` are the targets (targeted) or the labels. ``epsilon``
    and ``num_steps`` override the instance's and may be traced.
    """
    epsilon = self.epsilon if epsilon is None else epsilon
    num_steps = self.num_steps if num_steps is None else num_steps
    if epsilon is None or num_steps is None:
      raise ValueError('TransferAttack needs epsilon and num_steps.')
    if target_key is None:
      target_key, key = jax.random.split(key)
    labels = jnp.asarray(labels)
    if self.targeted:
      if self.num_classes is None:
        raise ValueError('a targeted TransferAttack needs num_classes.')
      attack_labels = paper.random_targets(
        target_key, labels, self.num_classes, example_ids
      )
    else:
      attack_labels = labels
    adv = transfer_attack(
      logits_fn,
      key,
      images,
      attack_labels,
      epsilon=epsilon,
      num_steps=num_steps,
      momentum=self.momentum,
      diversity_prob=self.diversity_prob,
      diversity_scale=self.diversity_scale,
      ti_kernel_size=self.ti_kernel_size,
      ti_sigma=self.ti_sigma,
      targeted=self.targeted,
      bounds=self.bounds,
      loss=self.loss,
      example_ids=example_ids,
    )
    return adv, attack_labels


# ---------------------------------------------------------------------------
# Ensemble sources.


def ensemble_apply(
  apply_fns: Sequence[Callable[[Any, jax.Array], jax.Array]],
  weights: Sequence[float] | None = None,
) -> Callable[[Sequence[Any], jax.Array], jax.Array]:
  """Averages the logits of several models (Dong et al.'s logit ensemble).

  Args:
    apply_fns: per member, ``apply(variables, x) -> [batch, classes]``,
      e.g. ``lambda v, x: model.apply(v, x, train=False)``.
    weights: per-member weights (normalised to sum 1); default equal.

  Returns:
    ``fn(variables_seq, x) -> sum_k w_k logits_k(x)`` in float32: pass the
    members' variables as an argument (e.g. replicated under
    `fdjax.parallel.data_parallel`), not as constants.

  Raises:
    ValueError: no members, or weights of another length or not positive.
  """
  apply_fns = tuple(apply_fns)
  if not apply_fns:
    raise ValueError('an ensemble needs at least one member, got none.')
  if weights is None:
    weights = (1.0,) * len(apply_fns)
  weights = tuple(float(w) for w in weights)
  if len(weights) != len(apply_fns) or not all(w > 0 for w in weights):
    raise ValueError(
      f'ensemble weights={weights!r} are not valid; valid: '
      f'{len(apply_fns)} positive numbers.'
    )
  total = sum(weights)
  weights = tuple(w / total for w in weights)

  def fn(variables_seq, x):
    if len(variables_seq) != len(apply_fns):
      raise ValueError(
        f'{len(variables_seq)} variable sets for {len(apply_fns)} members.'
      )
    out = None
    for w, apply, v in zip(weights, apply_fns, variables_seq):
      z = w * apply(v, x).astype(jnp.float32)
      out = z if out is None else out + z
    return out

  return fn


def ensemble_logits_fn(
  members: Sequence[tuple[Any, Any]],
  weights: Sequence[float] | None = None,
  apply_kwargs: Mapping[str, Any] | None = None,
) -> LogitsFn:
  """A logits_fn averaging Flax models: ``members = [(model, variables)]``.

  Each member is applied as ``model.apply(variables, x, **apply_kwargs)``,
  by default ``train=False`` (fdjax models: moving BatchNorm statistics).

  Examples:
    >>> import flax.linen as nn
    >>> m = nn.Dense(3)
    >>> v1 = m.init(jax.random.key(0), jnp.ones((1, 2)))
    >>> v2 = m.init(jax.random.key(1), jnp.ones((1, 2)))
    >>> f = ensemble_logits_fn([(m, v1), (m, v2)], apply_kwargs={})
    >>> x = jnp.ones((4, 2))
    >>> bool(jnp.allclose(f(x), (m.apply(v1, x) + m.apply(v2, x)) / 2))
    True
  """
  members = tuple(members)
  kwargs = {'train': False} if apply_kwargs is None else dict(apply_kwargs)
  fn = ensemble_apply(
    [functools.partial(_apply, model, kwargs) for model, _ in members],
    weights=weights,
  )
  variables = [v for _, v in members]
  return lambda x: fn(variables, x)


def _apply(model, kwargs, variables, x):
  return model.apply(variables, x, **kwargs)
