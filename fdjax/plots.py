"""The paper's figures: accuracy against attack steps, denoised features.

* `plot_accuracy_vs_steps`: top-1 accuracy under targeted PGD against the
  number of attack iterations on a log axis, one line per model (the paper's
  Figure 6).
* `plot_feature_maps`: the feature maps of a clean image and of its
  adversarial version before and after each denoising block (the paper's
  Figures 2 and 3): the noise an attack adds to the features shows in the
  "before" rows, and the "after" rows show what the block removes.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot,
no global backend change, no display needed) and saved as PNG.
"""

from collections.abc import Mapping
from collections.abc import Sequence
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import matplotlib.ticker
import numpy as np

ROWS = ('clean_before', 'adv_before', 'clean_after', 'adv_after')
_ROW_TITLES = {
  'clean_before': 'clean, before',
  'clean_after': 'clean, after',
  'adv_before': 'adversarial, before',
  'adv_after': 'adversarial, after',
}
MAX_BLOCKS = 8


def _save(fig: Figure, path: str) -> str:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, format='png', dpi=110)
  return path


def plot_accuracy_vs_steps(
  results_by_model: Mapping[str, Mapping[int, float]],
  path: str,
  *,
  title: str | None = None,
) -> str:
  """Accuracy against PGD iterations, log x axis (the paper's Figure 6).

  Args:
    results_by_model: {model name: {number of attack steps: accuracy}},
      accuracies as fractions in [0, 1] (plotted in percent).
    path: the PNG file to write (directories are created).
    title: the figure title.

  Returns:
    `path`.

  Raises:
    ValueError: no models, a model without points, a step count < 1 or an
      accuracy outside [0, 1].

  Examples:
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), 'fig6.png')
    >>> plot_accuracy_vs_steps(
    ...     {'R152-Denoise': {10: 0.557, 100: 0.455, 1000: 0.428}}, path)
    '...fig6.png'
  """
  if not results_by_model:
    raise ValueError('results_by_model is empty; give {model: {steps: acc}}.')
  curves = {}
  for model, points in results_by_model.items():
    if not points:
      raise ValueError(f'model {model!r} has no (steps, accuracy) points.')
    steps = sorted(points)
    for s in steps:
      acc = points[s]
      if int(s) != s or s < 1:
        raise ValueError(
          f'model {model!r}: step counts must be integers >= 1, got {s!r}.'
        )
      if not 0.0 <= acc <= 1.0:
        raise ValueError(
          f'model {model!r}: accuracy {acc!r} at {s} steps is not a '
          'fraction in [0, 1].'
        )
    curves[model] = (
      np.asarray(steps, float),
      100.0 * np.asarray([points[s] for s in steps], float),
    )
  fig = Figure(figsize=(5.5, 4.0))
  ax = fig.add_subplot(1, 1, 1)
  all_steps = set()
  for model, (steps, accs) in curves.items():
    ax.plot(steps, accs, marker='o', label=model)
    all_steps.update(steps.tolist())
  ax.set_xscale('log')
  ticks = sorted(all_steps)
  ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
  ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%d'))
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  if len(ticks) == 1:
    ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
  ax.set_xlabel('attack iterations (PGD steps, log scale)')
  ax.set_ylabel('top-1 accuracy (%)')
  lo = min(float(a.min()) for _, a in curves.values())
  hi = max(float(a.max()) for _, a in curves.values())
  ax.set_ylim(max(-3.0, lo - 5.0), min(103.0, hi + 5.0))
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(loc='best', fontsize='small')
  ax.set_title(title or 'Accuracy against PGD iterations')
  fig.tight_layout()
  return _save(fig, path)


def _as_unit_float(image: Any, what: str) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'{what} must be an [H, W, 3] image, got {image.shape}.')
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  return image.astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _apply_features(model, variables, images):
  return model.apply(variables, images, train=False, return_features=True)


def _features(model, variables, images: np.ndarray):
  logits, feats = _apply_features(model, variables, jnp.asarray(images))
  return np.asarray(logits), jax.tree.map(np.asarray, feats)


def _feature_names(model: Any, variables: Any, shape) -> list[str]:
  """The denoising blocks' names, from shapes only (nothing is computed)."""
  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  try:
    _, feats = jax.eval_shape(
      lambda z: model.apply(variables, z, train=False, return_features=True), x
    )
  except TypeError as e:
    raise ValueError(
      f'model {type(model).__name__} cannot return its feature maps '
      f'(return_features=True failed: {e}); use an fdjax.models.ResNet.'
    ) from e
  return list(feats)


def has_denoising_blocks(model: Any, variables: Any, image_size: int) -> bool:
  """Whether `model` returns feature maps of at least one denoising block.

  Args:
    model: a Flax module.
    variables: its variables.
    image_size: input height = width to try.

  Returns:
    True for an fdjax ResNet with denoising blocks, False otherwise.

  Examples:
    >>> from fdjax import models
    >>> m = models._ResNetTiny(num_classes=3, denoise_placement='stage')
    >>> v = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    >>> has_denoising_blocks(m, v, 8)
    True
  """
  try:
    return bool(_feature_names(model, variables, (image_size, image_size, 3)))
  except ValueError:
    return False


def _check_inputs(model, variables, clean, adv) -> None:
  if clean.shape != adv.shape:
    raise ValueError(
      f'clean_image {clean.shape} and adv_image {adv.shape} differ in shape.'
    )
  if not _feature_names(model, variables, clean.shape):
    placement = getattr(model, 'denoise_placement', '?')
    raise ValueError(
      f'the model has no denoising blocks (denoise_placement={placement!r}); '
      "feature maps need one ('stage' or 'all')."
    )


def feature_maps(
  model: Any,
  variables: Any,
  clean_image: Any,
  adv_image: Any,
  *,
  channels: Sequence[int] | None = None,
  blocks: Sequence[str] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
  """The 2-D maps `plot_feature_maps` draws.

  Args:
    model: an fdjax ResNet with denoising blocks (`return_features=True`).
    variables: its variables.
    clean_image: [H, W, 3] RGB, float in [0, 1] or uint8.
    adv_image: its adversarial version, same shape.
    channels: feature channels to show, one map each; None shows the mean
      over channels.
    blocks: denoising block names to show; None: all of them, or
      `MAX_BLOCKS` evenly spaced ones when there are more.

  Returns:
    {block name: {'clean_before', 'clean_after', 'adv_before', 'adv_after':
    [len(channels) or 1, h, w] float64 arrays}}, in network order.

  Raises:
    ValueError: images of different shapes, a model without denoising
      blocks, an unknown block or a channel out of range.

  Examples:
    >>> from fdjax import models
    >>> m = models._ResNetTiny(num_classes=3, denoise_placement='stage')
    >>> v = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    >>> maps = feature_maps(m, v, np.zeros((8, 8, 3)), np.ones((8, 8, 3)))
    >>> list(maps), maps['group1_denoise']['adv_after'].shape
    (['group0_denoise', 'group1_denoise'], (1, 4, 4))
  """
  clean = _as_unit_float(clean_image, 'clean_image')
  adv = _as_unit_float(adv_image, 'adv_image')
  _check_inputs(model, variables, clean, adv)
  _, feats = _features(model, variables, np.stack([clean, adv]))
  return _select(feats, channels, blocks, model)


def _select(feats, channels, blocks, model) -> dict[str, dict[str, np.ndarray]]:
  if not feats:
    placement = getattr(model, 'denoise_placement', '?')
    raise ValueError(
      f'the model has no denoising blocks (denoise_placement={placement!r}); '
      "feature maps need one ('stage' or 'all')."
    )
  names = list(feats)
  if blocks is None:
    if len(names) > MAX_BLOCKS:
      idx = np.linspace(0, len(names) - 1, MAX_BLOCKS).round().astype(int)
      names = [names[i] for i in sorted(set(idx.tolist()))]
  else:
    unknown = [b for b in blocks if b not in feats]
    if unknown:
      raise ValueError(f'unknown block(s) {unknown}; the model has {names}.')
    names = list(blocks)
  out = {}
  for name in names:
    maps = {}
    for when in ('before', 'after'):
      f = np.asarray(feats[name][when], np.float64)  # [2, h, w, C]
      if channels is None:
        sel = f.mean(axis=-1, keepdims=True)
      else:
        bad = [c for c in channels if not 0 <= c < f.shape[-1]]
        if bad:
          raise ValueError(
            f'channels {bad} out of range for block {name} with '
            f'{f.shape[-1]} channels.'
          )
        sel = f[..., list(channels)]
      sel = np.moveaxis(sel, -1, 1)  # [2, k, h, w]
      maps[f'clean_{when}'] = sel[0]
      maps[f'adv_{when}'] = sel[1]
    out[name] = maps
  return out


def plot_feature_maps(
  model: Any,
  variables: Any,
  clean_image: Any,
  adv_image: Any,
  path: str,
  *,
  channels: Sequence[int] | None = None,
  blocks: Sequence[str] | None = None,
  title: str | None = None,
) -> str:
  """Feature maps before/after each denoising block (Figures 2 and 3).

  Rows: clean and adversarial before the block, clean and adversarial
  after it. The first column shows the clean image, the adversarial image
  and the perturbation (amplified to the full range); then one column per
  block and channel (`channels`, or the channel mean), as heat maps whose
  colour scale is shared by the clean and the adversarial map of the same
  stage (before or after), so that the attack's feature noise compares.

  Args:
    model: an fdjax ResNet with denoising blocks.
    variables: its variables.
    clean_image: [H, W, 3] RGB, float in [0, 1] or uint8.
    adv_image: its adversarial version.
    path: the PNG file to write.
    channels: feature channels to show (None: the mean over channels).
    blocks: block names (None: all, at most `MAX_BLOCKS`).
    title: the figure title.

  Returns:
    `path`.

  Raises:
    ValueError: as `feature_maps` (notably a model without denoising
      blocks).

  Examples:
    >>> import tempfile
    >>> from fdjax import models
    >>> m = models._ResNetTiny(num_classes=3, denoise_placement='stage')
    >>> v = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    >>> path = os.path.join(tempfile.mkdtemp(), 'features.png')
    >>> plot_feature_maps(m, v, np.zeros((8, 8, 3)), np.ones((8, 8, 3)),
    ...                   path)
    '...features.png'
  """
  clean = _as_unit_float(clean_image, 'clean_image')
  adv = _as_unit_float(adv_image, 'adv_image')
  _check_inputs(model, variables, clean, adv)
  logits, feats = _features(model, variables, np.stack([clean, adv]))
  maps = _select(feats, channels, blocks, model)
  columns = []
  for name, m in maps.items():
    for k in range(m['clean_before'].shape[0]):
      ch = 'mean' if channels is None else f'ch {channels[k]}'
      columns.append((f'{name}\n{ch}', m, k))
  ncols = 1 + len(columns)
  fig = Figure(
    figsize=(1.7 * ncols + 0.4, 1.7 * len(ROWS) + 0.6), layout='constrained'
  )
  axes = fig.subplots(len(ROWS), ncols, squeeze=False)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  pred = logits.argmax(-1)
  delta = adv - clean
  scale = np.abs(delta).max()
  axes[0, 0].imshow(np.clip(clean, 0, 1), interpolation='nearest')
  axes[0, 0].set_title(f'clean (pred {pred[0]})', fontsize=8)
  axes[1, 0].imshow(np.clip(adv, 0, 1), interpolation='nearest')
  axes[1, 0].set_title(f'adversarial (pred {pred[1]})', fontsize=8)
  if scale > 0:
    axes[2, 0].imshow(0.5 + 0.5 * delta / scale, interpolation='nearest')
  axes[2, 0].set_title(
    f'perturbation x{0.5 / max(scale, 1e-12):.3g}', fontsize=8
  )
  axes[3, 0].axis('off')
  for j, (label, m, k) in enumerate(columns, start=1):
    axes[0, j].set_title(label, fontsize=8)
    for when in ('before', 'after'):
      # One colour scale for the clean and the adversarial map, so that the
      # attack's feature noise is comparable.
      pair = [m[f'clean_{when}'][k], m[f'adv_{when}'][k]]
      vmin = min(float(x.min()) for x in pair)
      vmax = max(float(x.max()) for x in pair)
      for who, arr in zip(('clean', 'adv'), pair):
        axes[ROWS.index(f'{who}_{when}'), j].imshow(
          arr, cmap='viridis', vmin=vmin, vmax=vmax, interpolation='nearest'
        )
  for i, row in enumerate(ROWS):
    axes[i, 1 if ncols > 1 else 0].set_ylabel(_ROW_TITLES[row], fontsize=8)
  fig.suptitle(
    title or 'Feature maps before and after the denoising blocks', fontsize=9
  )
  return _save(fig, path)
