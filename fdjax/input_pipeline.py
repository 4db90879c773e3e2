"""Deterministic, resumable, per-process sharded batch streams (grain).

Batches are pure functions of ``(seed, step, process_index, process_count)``:
a run resumed at step k sees exactly the data (order and augmentation) that
an uninterrupted run would have seen at step k. Training is an endless
sequence of epochs, each a permutation of the source derived from ``(seed,
epoch)``; process p of P takes its contiguous slice of every global batch;
the augmentation of stream position g draws from
``np.random.default_rng((seed, g))``. Evaluation visits the split in order
and pads the last global batch, marking padding with ``mask=False``. The
batch layout (``image``, ``label``, ``index``, ``mask``) is in docs/data.md.
"""

from collections.abc import Iterator
import math

from absl import flags
from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from fdjax import config_base
from fdjax import data
from fdjax import preprocess
from fdjax import sources


def create_train_iter(
  data_config: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  seed: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  source: data.Source | None = None,
) -> Iterator[data.Batch]:
  """Returns the endless iterator of this process's training batches.

  The first batch is the one of step ``start_step``; the batch of step k is a
  pure function of ``(seed, k, process_index, process_count)`` and the
  config, so resuming at ``start_step=k`` continues an interrupted run
  exactly. The processes' local batches concatenate (in process order) to the
  global batch.

  Args:
    data_config: the data config.
    global_batch_size: examples per step over all processes (B).
    seed: non-negative integer; sets the epoch permutations and the
      augmentation randomness.
    start_step: first step to produce.
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).
    source: random-access source to use instead of
      ``data.get_source(data_config, data_config.train_split)``.

  Returns:
    An iterator of dicts ``image [B/P, S, S, 3]``, ``label int32 [B/P]``,
    ``index int64 [B/P]`` (global stream positions).

  Raises:
    ValueError: for invalid config values, a batch size not divisible by the
      process count, a bad process index, a negative seed or start step.

  Examples:
    >>> it = create_train_iter(
    ...     data.default_data_config('digits'), global_batch_size=4, seed=0,
    ...     start_step=2, process_index=1, process_count=2)
    >>> batch = next(it)
    >>> batch['image'].shape, batch['index'].tolist()
    ((2, 8, 8, 3), [10, 11])
  """
  config_base.validate_data(data_config)
  process_index, process_count = _check_processes(
    global_batch_size, process_index, process_count
  )
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}.')
  if not isinstance(start_step, (int, np.integer)) or start_step < 0:
    raise ValueError(
      f'start_step must be a non-negative integer, got {start_step!r}.'
    )
  if source is None:
    source = data.get_source(data_config, data_config.train_split)
  seed = int(seed)
  local_batch = global_batch_size // process_count
  transform = (
    preprocess.train_fn(data_config)
    if data_config.augment
    else preprocess.eval_fn(data_config)
  )

  skip = data_config.get('corrupt_images', 'raise') == 'skip'

  def make_example(position: int, index: int) -> data.Example:
    # Reading here (not in a source dataset) lets a corrupt file be skipped:
    # the next readable example of the source takes its place, label and all.
    example = _read(source, index, skip)
    rng = np.random.default_rng((seed, position))
    return {
      'image': transform(example['image'], rng),
      'label': np.int32(example['label']),
      'index': np.int64(position),
    }

  ds = grain.MapDataset.range(len(source))
  ds = ds.shuffle(seed=_shuffle_seed(seed)).repeat()
  ds = ds.map_with_index(make_example)
  # Chunk c of local_batch stream positions; global batch k is chunks
  # k*P .. k*P+P-1, and process p takes chunk k*P + p.
  ds = ds.batch(local_batch)[process_index::process_count]
  ds = ds[int(start_step) :]
  logging.info(
    'Train input: %s/%s, %d examples, global batch %d, local batch %d, '
    'process %d/%d, start step %d.',
    data_config.name,
    data_config.train_split,
    len(source),
    global_batch_size,
    local_batch,
    process_index,
    process_count,
    start_step,
  )
  return _start(ds, data_config)


def create_eval_iter(
  data_config: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
  source: data.Source | None = None,
  start_index: int = 0,
  num_examples: int | None = None,
) -> Iterator[data.Batch]:
  """Returns the iterator over this process's share of the eval split.

  The evaluated examples are ``[start_index, end)`` of the split with ``end =
  num_examples`` (or the split size), visited in order in global batches of
  ``global_batch_size``; the last global batch is padded and its padding has
  ``mask == False``. Over all processes each evaluated example appears exactly
  once with ``mask == True``. Resume an interrupted evaluation of the first
  ``num_examples`` by passing the same ``num_examples`` and the number already
  done as ``start_index``.

  Args:
    data_config: the data config.
    global_batch_size: examples per global batch over all processes (B).
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).
    source: random-access source to use instead of
      ``data.get_source(data_config, data_config.eval_split)``.
    start_index: first example to evaluate.
    num_examples: evaluate only the first ``num_examples`` examples of the
      split (``None``: all).

  Returns:
    A finite iterator of dicts ``image [B/P, S, S, 3]``, ``label int32``,
    ``index int64`` (example index in the split; padding continues past the
    end) and ``mask bool``, all ``[B/P]`` except the image.

  Raises:
    ValueError: for invalid config values, a batch size not divisible by the
      process count, a bad process index, or ``start_index``/``num_examples``
      outside the split.

  Examples:
    >>> batches = list(create_eval_iter(
    ...     data.default_data_config('digits'), global_batch_size=128,
    ...     process_index=0, process_count=1, start_index=200))
    >>> len(batches), int(sum(b['mask'].sum() for b in batches))
    (1, 97)
  """
  config_base.validate_data(data_config)
  process_index, process_count = _check_processes(
    global_batch_size, process_index, process_count
  )
  if source is None:
    source = data.get_source(data_config, data_config.eval_split)
  size = len(source)
  end = size if num_examples is None else num_examples
  if not isinstance(end, (int, np.integer)) or not 0 < end <= size:
    raise ValueError(
      f'num_examples must be None or an integer in [1, {size}] (the split '
      f'size), got {num_examples!r}.'
    )
  if not isinstance(start_index, (int, np.integer)) or not (
    0 <= start_index <= end
  ):
    raise ValueError(
      f'start_index must be an integer in [0, {end}], got {start_index!r}.'
    )
  start, end = int(start_index), int(end)
  num_batches = math.ceil((end - start) / global_batch_size)
  transform = preprocess.eval_fn(data_config)
  size_hw = data_config.image_size
  padding_image = np.zeros((size_hw, size_hw, 3), data.image_dtype(data_config))

  def make_example(index: int) -> data.Example:
    if index < end:
      example = source[index]
      return {
        'image': transform(example['image']),
        'label': np.int32(example['label']),
        'index': np.int64(index),
        'mask': np.bool_(True),
      }
    return {
      'image': padding_image,
      'label': np.int32(0),
      'index': np.int64(index),
      'mask': np.bool_(False),
    }

  local_batch = global_batch_size // process_count
  ds = grain.MapDataset.range(start, start + num_batches * global_batch_size)
  ds = ds.map(make_example).batch(local_batch)
  ds = ds[process_index::process_count]
  logging.info(
    'Eval input: %s/%s, examples [%d, %d) of %d, %d global batches of %d, '
    'process %d/%d.',
    data_config.name,
    data_config.eval_split,
    start,
    end,
    size,
    num_batches,
    global_batch_size,
    process_index,
    process_count,
  )
  return _start(ds, data_config)


def _check_processes(
  global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if process_count < 1:
    raise ValueError(f'process_count must be >= 1, got {process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(
      f'process_index must be in [0, {process_count}), got {process_index}.'
    )
  if (
    not isinstance(global_batch_size, (int, np.integer))
    or global_batch_size < 1
    or global_batch_size % process_count
  ):
    raise ValueError(
      f'global_batch_size={global_batch_size!r} must be a positive multiple '
      f'of the process count {process_count}.'
    )
  return int(process_index), int(process_count)


def _read(source: data.Source, index: int, skip: bool) -> data.Example:
  """``source[index]``; with ``skip``, the next readable one past a corrupt
  image file (``fdjax.sources.CorruptImageError``, logged with its path)."""
  for offset in range(len(source)):
    try:
      return source[(index + offset) % len(source)]
    except sources.CorruptImageError as e:
      if not skip:
        raise
      logging.warning('Skipping a corrupt image: %s', e.path)
  raise ValueError(f'no readable image in the {len(source)} of {source!r}.')


def _shuffle_seed(seed: int) -> int:
  # grain wants a 32-bit seed and uses seed + epoch for epoch `epoch`; hashing
  # keeps seed s+1 from replaying the epochs of seed s shifted by one.
  return int(np.random.SeedSequence((seed, 0x5EED)).generate_state(1)[0])


def _start(ds: grain.MapDataset, c: ml_collections.ConfigDict) -> Iterator:
  """Starts building batches on the thread pool (or processes) right away.

  With ``worker_processes`` > 0, grain's ``mp_prefetch`` spreads the batches
  over that many worker processes (batch j on worker j mod n, each with its
  ``num_workers`` threads): reading and decoding happen there, and the
  batches are the same as with threads only (they are functions of their
  position).
  """
  buffer = max(c.prefetch, c.num_workers) if c.num_workers else 0
  options = grain.ReadOptions(
    num_threads=c.num_workers, prefetch_buffer_size=buffer
  )
  ds = ds.to_iter_dataset(options)
  processes = c.get('worker_processes', 0)
  if processes:
    if not flags.FLAGS.is_parsed():  # grain reads its flags; use defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(
      grain.multiprocessing.MultiprocessingOptions(
        num_workers=processes, per_worker_buffer_size=max(c.prefetch, 1)
      )
    )
  it = iter(ds)
  if hasattr(it, 'start_prefetch'):
    it.start_prefetch()
  return it
