r"""Throughput, compile time, memory and FLOP/s of attacks, training, denoising.

A benchmark, not a test. On whatever backend JAX finds (CPU, GPU, TPU) it
prints one table per mode:

* ``pgd``: a jitted targeted L-inf PGD attack (`fdjax.attacks.pgd`, the
  paper's epsilon 16/255, step 1/255, random start) on a randomly
  initialised model: compile time, seconds per PGD step (forward + input
  gradient + update), images x steps per second, FLOPs per step and achieved
  FLOP/s from XLA's cost analysis, and memory.
* ``train``: one adversarial train step of `fdjax.train` (per-device
  targeted PGD with ``--steps`` steps, then forward/backward on the
  adversarial batch and a Nesterov SGD update through optax) on one device.
* ``denoise``: forward + gradient of every op of `fdjax.denoise` at the
  paper's ResNet feature-map sizes (56x56x256, 28x28x512, 14x14x1024,
  7x7x2048).
* ``autoattack`` (`fdjax.autoattack_benchmark`): `fdjax.attacks.AutoAttack`
  (standard version) on the digits MLP or CNN of the repository's tests
  (``--aa_model``, ``tests/digits_*.py``, weights committed), beside the
  reference PyTorch AutoAttack on the same weights, examples and CPU, in
  the same run: robust accuracy and seconds per attack, fdjax's first
  call (compiling included) and second call (nothing to compile), the
  ratios, and how fdjax's time grows with the number of
  still-robust points. The reference runs from its own virtual environment,
  never a dependency of fdjax::

    python3 -m venv /tmp/aa_ref && /tmp/aa_ref/bin/pip install pyautoattack \
        torch scikit-learn
    python -m fdjax.benchmark --mode=autoattack \
        --aa_reference_python=/tmp/aa_ref/bin/python

  ``--aa_devices=2`` splits the batches over two devices, one core each on
  a CPU (with ``XLA_FLAGS=--xla_force_host_platform_device_count=2``);
  ``--aa_compilation_cache=DIR`` keeps the compiled attacks on disk for the
  next run.

* ``input``: the input pipeline (`fdjax.input_benchmark`): per-stage cost
  of the ImageNet augmentation, images/s of the train and eval pipelines on
  image folders (``--input_folder``, default a generated JPEG tree) and tfds
  (``--input_tfds``) with threads and 1 or 2 worker processes, and the share
  of the quickstart's training loop spent waiting for input.

  python -m fdjax.benchmark                       # PGD, ResNet-50 and
                                                  # ResNet-152 + 4 blocks
  python -m fdjax.benchmark --models=r50,r152_denoise --sizes=64,224 \
      --batch=8 --steps=10 --mode=all --json_out=/tmp/bench.json

Models are named ``r50``, ``r101``, ``r152`` (ResNet), ``x101`` (ResNeXt-101
32x8d), each optionally with ``_denoise`` (4 non-local Gaussian denoising
blocks, one per stage, as the paper's main models) or ``_denoise_all``
(after every residual block).

How numbers are taken: the first call (compile + run) is a warm-up, then the
best of ``--repeats`` timed calls, each ended with ``block_until_ready``.
FLOPs come from ``jitted.lower(...).compile().cost_analysis()``. XLA counts a
while-loop body once whatever its trip count, so the attack is compiled with
a traced step count (one compile serves any number of steps) and its FLOPs
are those of one step; a train step's FLOPs add the remaining ``steps - 1``
PGD steps. Memory: ``xla_temp`` is the scratch memory XLA planned for the
compiled program (``memory_analysis``), on every backend; ``peak`` is the
device's ``peak_bytes_in_use`` where the backend reports it (GPU, TPU; it
never decreases during the process) and the process's maximum resident set
size ("rss") on CPU.

Sharing the machine with other work makes absolute times drift; compare with
other frameworks side by side, in the same minute, and keep the ratios.

CPU (jax/jaxlib 0.10.2, XLA:CPU with YNNPACK, 2-core AMD EPYC). A profile
(``jax.profiler`` trace) of a ResNet-50 PGD step at 64x64 with XLA's own
convolutions spent ~2/3 of the time in five naive-loop ("elemental")
convolutions: the last stage's 3x3 convolutions on 2x2 maps and their input
gradients, whose operands XLA swaps (kernel larger than the map) into a form
no library kernel takes. Most of the rest were YNNPACK convolutions and
kernel transposes for the gradients. Hence `fdjax.models`' ``conv_impl``:
'auto' (the default) computes convolutions on CPU as matrix products (1x1: a
dot over channels; kxk: im2col + one dot; grouped ones stay XLA's) with the
same parameters. Interleaved in one process, gradient step, batch 8:
ResNet-50 64x64 1.85 s -> 0.26 s, 224x224 1.65 s -> 1.26 s. Compare with
``--conv_impl=xla,matmul``. Tried and dropped: im2col only for maps smaller
than the window (64x64: 0.52 s), 3x3 im2col without 1x1 dots (0.31 s /
1.55 s), the 7x7 stem through XLA's convolution (within noise), the batched
dot for grouped convolutions (3x slower than XLA's),
``--xla_disable_hlo_passes=conv-operand-swapper`` (the naive loops stay).
"""

from collections.abc import Callable
from collections.abc import Sequence
import functools
import json
import os
import resource
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from fdjax import attacks
from fdjax import autoattack_benchmark
from fdjax import config_base
from fdjax import denoise
from fdjax import input_benchmark
from fdjax import layers
from fdjax import models
from fdjax import parallel
from fdjax import train

MODES = ('pgd', 'train', 'denoise', 'autoattack', 'all', 'input')
FEATURE_MAPS = ((56, 256), (28, 512), (14, 1024), (7, 2048))
"""The paper's ResNet feature maps (side, channels) at 224x224 input."""


def _flops(compiled: Any) -> float | None:
  """Total 'flops' of a compiled program's cost analysis, if reported."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # Some backends do not implement it.
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def _xla_temp_bytes(compiled: Any) -> int | None:
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # Not every backend reports it.
    return None


def peak_memory() -> tuple[int | None, str]:
  """The peak memory so far and where it comes from.

  Returns:
    ``(bytes, source)``: the first device's ``peak_bytes_in_use`` (GPU, TPU)
    with source 'device', or the process's maximum resident set size with
    source 'rss' on backends without memory statistics (CPU).

  Examples:
    >>> import numpy as np
    >>> x = np.ones(2**24)  # 128 MiB, touched.
    >>> nbytes, source = peak_memory()
    >>> nbytes >= x.nbytes, source in ('device', 'rss')
    (True, True)
  """
  stats = jax.local_devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device'
  rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss_kib) * 1024, 'rss'


def time_call(fn: Callable[[], Any], repeats: int = 3) -> float:
  """Best wall time of ``repeats`` calls of ``fn`` after one warm-up call.

  Args:
    fn: a function of no arguments returning JAX arrays (or a pytree).
    repeats: timed calls.

  Returns:
    The smallest time in seconds; each call ends when its outputs are ready.

  Examples:
    >>> calls = []
    >>> t = time_call(lambda: calls.append(1) or jnp.ones(3), repeats=2)
    >>> len(calls), t < 10.0  # One warm-up call, then the timed ones.
    (3, True)
  """
  jax.block_until_ready(fn())
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def _init_model(name: str, size: int, conv_impl: str, seed: int = 0):
  model = models.create_model(conv_impl=conv_impl, **models.variant(name))
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
  return model, variables


def _inputs(batch: int, size: int, seed: int = 1):
  key_x, key_t = jax.random.split(jax.random.key(seed))
  images = jax.random.uniform(key_x, (batch, size, size, 3), jnp.float32)
  targets = jax.random.randint(key_t, (batch,), 0, 1000)
  return images, targets


def benchmark_pgd(
  name: str,
  size: int,
  batch: int = 8,
  steps: int = 10,
  repeats: int = 3,
  conv_impl: str = 'auto',
) -> dict[str, Any]:
  """Times a jitted targeted L-inf PGD attack on a random model.

  Args:
    name: a model name (a key of `fdjax.models.VARIANTS`).
    size: image side (square RGB images in [0, 1]).
    batch: images per attack.
    steps: PGD steps per timed attack.
    repeats: timed attacks (the best is kept).
    conv_impl: the model's `conv_impl` ('auto', 'xla' or 'matmul').

  Returns:
    A result row: compile_s, step_s (seconds per PGD step),
    img_steps_per_s, gflop_step (per step), gflop_per_s (achieved),
    xla_temp_bytes, peak_bytes, peak_source and the settings.
  """
  model, variables = _init_model(name, size, conv_impl)
  images, targets = _inputs(batch, size)

  paper_attack = attacks.PGDAttack(
    epsilon=attacks.PAPER_EPSILON,
    step_size=attacks.PAPER_STEP_SIZE,
    num_classes=1000,
  )

  def attack(variables, key, images, labels, num_steps):
    logits_fn = lambda x: model.apply(variables, x, train=False)
    adv, _ = paper_attack(logits_fn, key, images, labels, num_steps=num_steps)
    return adv

  # The step count is traced: one compile for any count, and XLA's cost
  # analysis of the (while-loop) attack is then that of one step.
  args = (variables, jax.random.key(2), images, targets, jnp.int32(steps))
  start = time.perf_counter()
  compiled = jax.jit(attack).lower(*args).compile()
  compile_s = time.perf_counter() - start
  step_s = time_call(lambda: compiled(*args), repeats) / steps
  flops = _flops(compiled)
  return _row(
    'pgd', name, size, batch, steps, compile_s, step_s, flops, compiled
  ) | {'conv_impl': layers.resolve_conv_impl(conv_impl)}


def _row(mode, name, size, batch, steps, compile_s, step_s, flops, compiled):
  peak, source = peak_memory()
  return dict(
    mode=mode,
    model=name,
    size=size,
    batch=batch,
    steps=steps,
    backend=jax.default_backend(),
    compile_s=compile_s,
    step_s=step_s,
    # PGD: images x steps per second; train: images per second.
    img_steps_per_s=batch / step_s,
    gflop_step=None if flops is None else flops / 1e9,
    gflop_per_s=None if flops is None else flops / 1e9 / step_s,
    xla_temp_bytes=_xla_temp_bytes(compiled),
    peak_bytes=peak,
    peak_source=source,
  )


def benchmark_train(
  name: str,
  size: int,
  batch: int = 8,
  steps: int = 10,
  repeats: int = 3,
  conv_impl: str = 'auto',
) -> dict[str, Any]:
  """Times one adversarial train step of `fdjax.train` on one device.

  The step is `fdjax.train.make_train_step` with the paper's recipe
  (`fdjax.config_base`): per-device targeted PGD with ``steps`` steps and a
  clean start with probability 0.2, cross-entropy with label smoothing and
  weight decay, Nesterov momentum SGD, the BatchNorm statistics updated.

  Args:
    name: a model name (a key of `fdjax.models.VARIANTS`).
    size: image side.
    batch: images per step.
    steps: PGD steps inside the train step.
    repeats: timed steps (the best is kept).
    conv_impl: the model's `conv_impl` ('auto', 'xla' or 'matmul').

  Returns:
    A result row like `benchmark_pgd`'s; step_s is seconds per train step,
    img_steps_per_s is images per second, gflop_step the FLOPs of a whole
    train step (its PGD steps included).
  """
  model = models.create_model(conv_impl=conv_impl, **models.variant(name))
  attack_config = config_base.attack_config()
  attack_config.num_steps = steps
  train_config = config_base.train_config()
  train_config.global_batch_size = batch
  lr_fn = train.create_learning_rate_fn(train_config, steps_per_epoch=1000)
  tx = train.create_optimizer(train_config, lr_fn)
  state = train.create_train_state(
    jax.random.key(0), model, (size, size, 3), tx
  )
  mesh = parallel.make_mesh(jax.local_devices()[:1])
  step = train.make_train_step(
    mesh,
    'shard_map',
    model=model,
    tx=tx,
    learning_rate_fn=lr_fn,
    num_classes=1000,
    attack=attacks.from_config(attack_config, 1000),
  )
  images, labels = _inputs(batch, size)
  batch_data = {
    'image': images,
    'label': labels,
    'index': jnp.arange(batch, dtype=jnp.int32),
  }
  start = time.perf_counter()
  compiled = step.lower(state, batch_data).compile()
  compile_s = time.perf_counter() - start
  flops = _flops(compiled)
  if flops is not None and steps > 1:
    # The attack's while loop is counted once: add the other steps.
    flops += (steps - 1) * _pgd_step_flops(model, state.variables, batch_data)

  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch_data)
    return metrics

  step_s = time_call(run, repeats)
  return _row(
    'train', name, size, batch, steps, compile_s, step_s, flops, compiled
  ) | {'conv_impl': layers.resolve_conv_impl(conv_impl)}


def _pgd_step_flops(model, variables, batch_data) -> float:
  """FLOPs of one PGD step's input gradient (lowered, not compiled)."""

  def loss(x):
    logits = model.apply(variables, x, train=False)
    return jnp.sum(attacks.example_losses(logits, batch_data['label'], 'xent'))

  lowered = jax.jit(jax.grad(loss)).lower(batch_data['image'])
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis['flops'])


def denoise_cases(
  ops: Sequence[str] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
  """The denoise ops to time: (label, `fdjax.denoise.apply` settings).

  Args:
    ops: op names to keep (all of `fdjax.denoise.DENOISE_OPS` if None).

  Returns:
    A list of (label, kwargs) pairs; the non-local op appears with both
    affinities, ops with embeddings take theta/phi of C/2 channels.

  Examples:
    >>> [label for label, _ in denoise_cases(['non_local', 'mean'])]
    ['non_local_gaussian', 'non_local_dot_product', 'mean_3x3']
  """
  cases = []
  for op in ops if ops is not None else sorted(denoise.DENOISE_OPS):
    denoise.get(op)  # A clear error for unknown names.
    if op == 'non_local':
      for affinity in ('gaussian', 'dot_product'):
        cases.append((f'{op}_{affinity}', dict(op=op, affinity=affinity)))
    elif op in ('bilateral', 'mean', 'median'):
      cases.append((f'{op}_3x3', dict(op=op, size=3)))
    else:
      cases.append((op, dict(op=op)))
  return cases


def benchmark_denoise_op(
  label: str,
  settings: dict[str, Any],
  side: int,
  channels: int,
  batch: int = 8,
  repeats: int = 3,
) -> dict[str, Any]:
  """Times forward + gradient of one denoise op on one feature-map size.

  The gradient is that of ``sum(op(x) * r)`` for a fixed random ``r`` with
  respect to x (and theta/phi for ops with embeddings), what the attack and
  training backpropagate through.

  Args:
    label: the row's name.
    settings: ``op`` and the other `fdjax.denoise.apply` keyword arguments.
    side: feature-map height and width.
    channels: feature-map channels.
    batch: feature maps per call.
    repeats: timed calls (the best is kept).

  Returns:
    A result row: compile_s, call_s, gflop, gflop_per_s, xla_temp_bytes,
    peak_bytes and peak_source.
  """
  settings = dict(settings)
  op = settings.pop('op')
  keys = jax.random.split(jax.random.key(3), 4)
  shape = (batch, side, side, channels)
  x = jax.random.normal(keys[0], shape)
  r = jax.random.normal(keys[1], shape)
  embed = ()
  if denoise.uses_embedding(op):
    half = (batch, side, side, channels // 2)
    embed = (jax.random.normal(keys[2], half), jax.random.normal(keys[3], half))

  def objective(x, *embed):
    theta, phi = embed if embed else (None, None)
    y = denoise.apply(op, x, theta=theta, phi=phi, **settings)
    return jnp.sum(y * r)

  argnums = tuple(range(1 + len(embed)))
  fn = jax.jit(jax.value_and_grad(objective, argnums=argnums))
  start = time.perf_counter()
  compiled = fn.lower(x, *embed).compile()
  compile_s = time.perf_counter() - start
  call_s = time_call(lambda: compiled(x, *embed), repeats)
  flops = _flops(compiled)
  peak, source = peak_memory()
  return dict(
    mode='denoise',
    op=label,
    shape=f'{batch}x{side}x{side}x{channels}',
    backend=jax.default_backend(),
    compile_s=compile_s,
    call_s=call_s,
    gflop=None if flops is None else flops / 1e9,
    gflop_per_s=None if flops is None else flops / 1e9 / call_s,
    xla_temp_bytes=_xla_temp_bytes(compiled),
    peak_bytes=peak,
    peak_source=source,
  )


def _fmt(value: Any, spec: str) -> str:
  if value is None:
    return '-'
  if spec == 'bytes':
    return f'{value / 2**20:.0f}M'
  return format(value, spec)


_COLUMNS = {
  'pgd': (
    ('model', 'model', 's'),
    ('size', 'size', 'd'),
    ('batch', 'batch', 'd'),
    ('conv_impl', 'conv', 's'),
    ('compile_s', 'compile s', '.1f'),
    ('step_s', 's/step', '.4f'),
    ('img_steps_per_s', 'img*steps/s', '.2f'),
    ('gflop_step', 'GFLOP/step', '.2f'),
    ('gflop_per_s', 'GFLOP/s', '.1f'),
    ('xla_temp_bytes', 'xla temp', 'bytes'),
    ('peak_bytes', 'peak', 'bytes'),
    ('peak_source', '', 's'),
  ),
  'train': (
    ('model', 'model', 's'),
    ('size', 'size', 'd'),
    ('batch', 'batch', 'd'),
    ('steps', 'pgd steps', 'd'),
    ('conv_impl', 'conv', 's'),
    ('compile_s', 'compile s', '.1f'),
    ('step_s', 's/train step', '.3f'),
    ('img_steps_per_s', 'img/s', '.2f'),
    ('gflop_step', 'GFLOP/step', '.1f'),
    ('gflop_per_s', 'GFLOP/s', '.1f'),
    ('xla_temp_bytes', 'xla temp', 'bytes'),
    ('peak_bytes', 'peak', 'bytes'),
    ('peak_source', '', 's'),
  ),
  'denoise': (
    ('op', 'op', 's'),
    ('shape', 'shape NHWC', 's'),
    ('compile_s', 'compile s', '.1f'),
    ('call_s', 's/fwd+grad', '.4f'),
    ('gflop', 'GFLOP', '.2f'),
    ('gflop_per_s', 'GFLOP/s', '.1f'),
    ('xla_temp_bytes', 'xla temp', 'bytes'),
    ('peak_bytes', 'peak', 'bytes'),
    ('peak_source', '', 's'),
  ),
}


def format_table(rows: Sequence[dict[str, Any]], mode: str) -> str:
  """An aligned text table of result rows of one mode.

  Args:
    rows: result rows of `benchmark_pgd`, `benchmark_train` or
      `benchmark_denoise_op`.
    mode: 'pgd', 'train' or 'denoise' (selects the columns).

  Returns:
    The table, a header line and one line per row.

  Examples:
    >>> row = dict(op='mean_3x3', shape='8x7x7x2048', compile_s=0.5,
    ...            call_s=0.01, gflop=None, gflop_per_s=None,
    ...            xla_temp_bytes=2**20, peak_bytes=2**30, peak_source='rss')
    >>> print(format_table([row], 'denoise'))
    op        shape NHWC  compile s  s/fwd+grad  GFLOP  GFLOP/s  xla temp  peak
    mean_3x3  8x7x7x2048        0.5      0.0100      -        -        1M  1024M  rss
  """  # noqa: E501
  columns = _COLUMNS[mode]
  cells = [[title for _, title, _ in columns]]
  for row in rows:
    cells.append([_fmt(row.get(key), spec) for key, _, spec in columns])
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  left = [spec == 's' for _, _, spec in columns]
  lines = []
  for line in cells:
    parts = [
      cell.ljust(w) if is_left else cell.rjust(w)
      for cell, w, is_left in zip(line, widths, left)
    ]
    lines.append('  '.join(parts).rstrip())
  return '\n'.join(lines)


def _progress(row: dict[str, Any]) -> None:
  what = row.get('model') or row.get('op')
  where = row.get('size') or row.get('shape')
  seconds = row.get('step_s') or row.get('call_s')
  print(
    f'{row["mode"]} {what} {where} {row.get("conv_impl", "")}: '
    f'{seconds:.4f} s (compile {row["compile_s"]:.1f} s)',
    flush=True,
  )


def _define_flags() -> None:
  # Defined only when run as a script, so that importing this module (e.g.
  # for doctests) does not clash with other modules' flags.
  flags.DEFINE_list('models', ['r50', 'r152_denoise'], 'Models to time.')
  flags.DEFINE_list('sizes', ['64', '224'], 'Image sides.')
  flags.DEFINE_integer('batch', 8, 'Images per attack / train step.')
  flags.DEFINE_integer('steps', 10, 'PGD steps per timed attack.')
  flags.DEFINE_integer('repeats', 3, 'Timed runs after the warm-up.')
  flags.DEFINE_enum('mode', 'pgd', MODES, 'What to time.')
  flags.DEFINE_list(
    'conv_impl',
    ['auto'],
    "Models' conv_impl values to time, e.g. 'xla,matmul' to compare "
    "(auto: matmul on CPU, xla's convolutions elsewhere).",
  )
  flags.DEFINE_list(
    'denoise_ops', [], 'Denoise ops to time (default: all of them).'
  )
  flags.DEFINE_integer(
    'denoise_batch', None, 'Batch of the denoise op timings (--batch if unset).'
  )
  flags.DEFINE_string('json_out', None, 'Also write the rows to this file.')
  flags.DEFINE_string(
    'aa_reference_python',
    None,
    'autoattack mode: the python of a venv with the reference AutoAttack '
    '(pyautoattack, torch); unset: fdjax only.',
  )
  flags.DEFINE_integer('aa_num_examples', 297, 'autoattack mode: digits.')
  flags.DEFINE_enum(
    'aa_model', 'mlp', ['mlp', 'cnn'], 'autoattack mode: tests/digits_*.py.'
  )
  flags.DEFINE_float('aa_epsilon', 0.1, 'autoattack mode: epsilon.')
  flags.DEFINE_integer(
    'aa_devices',
    1,
    'autoattack mode: split each batch over this many local devices (CPU: '
    'XLA_FLAGS=--xla_force_host_platform_device_count=N).',
  )
  flags.DEFINE_string(
    'aa_compilation_cache',
    None,
    "autoattack mode: a directory for JAX's persistent compilation cache "
    '(a rerun then loads the compiled attacks).',
  )
  flags.DEFINE_enum('aa_norm', 'linf', ['linf', 'l2'], 'autoattack mode.')
  flags.DEFINE_list(
    'aa_scale_points',
    ['16', '64', '128', '256'],
    'autoattack mode: point counts of the cost-growth table.',
  )
  flags.DEFINE_string(
    'input_folder', None, '--mode=input: an image-folder tree (ROOT/train).'
  )
  flags.DEFINE_string(
    'input_tfds', None, '--mode=input: a tfds data_dir with imagenet2012.'
  )
  flags.DEFINE_integer('input_batches', 8, '--mode=input: batches timed.')
  flags.DEFINE_integer('input_batch', 32, '--mode=input: images per batch.')


def main(argv: Sequence[str]) -> None:
  del argv
  flag_values = flags.FLAGS
  mode = flag_values.mode
  if mode == 'input':
    print(
      input_benchmark.run(
        flag_values.input_folder,
        flag_values.input_tfds,
        flag_values.input_batch,
        flag_values.input_batches,
      )
    )
    return
  modes = ('pgd', 'train', 'denoise') if mode == 'all' else (mode,)
  if mode == 'autoattack':
    print(
      autoattack_benchmark.run(
        num_examples=flag_values.aa_num_examples,
        epsilon=flag_values.aa_epsilon,
        norm=flag_values.aa_norm,
        reference_python=flag_values.aa_reference_python,
        scale_points=[int(n) for n in flag_values.aa_scale_points],
        model=flag_values.aa_model,
        devices=flag_values.aa_devices,
        compilation_cache=flag_values.aa_compilation_cache,
      ),
      flush=True,
    )
    return
  sizes = [int(s) for s in flag_values.sizes]
  for name in flag_values.models:
    models.variant(name)  # Fail early on a bad name.
  for conv_impl in flag_values.conv_impl:
    layers.resolve_conv_impl(conv_impl)
  print(
    f'jax {jax.__version__}, backend {jax.default_backend()}: '
    f'{jax.local_devices()[0].device_kind} x {jax.local_device_count()}, '
    f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}',
    flush=True,
  )
  all_rows = []
  for m in modes:
    rows = []
    if m == 'denoise':
      denoise_batch = flag_values.denoise_batch or flag_values.batch
      for label, settings in denoise_cases(flag_values.denoise_ops or None):
        for side, channels in FEATURE_MAPS:
          rows.append(
            benchmark_denoise_op(
              label,
              settings,
              side,
              channels,
              batch=denoise_batch,
              repeats=flag_values.repeats,
            )
          )
          _progress(rows[-1])
    else:
      run = benchmark_pgd if m == 'pgd' else benchmark_train
      for name in flag_values.models:
        for size in sizes:
          for conv_impl in flag_values.conv_impl:
            rows.append(
              run(
                name,
                size,
                batch=flag_values.batch,
                steps=flag_values.steps,
                repeats=flag_values.repeats,
                conv_impl=conv_impl,
              )
            )
            _progress(rows[-1])
    print(f'\n== {m} ==\n{format_table(rows, m)}\n', flush=True)
    all_rows.extend(rows)
  if flag_values.json_out:
    with open(flag_values.json_out, 'w') as f:
      json.dump(all_rows, f, indent=1)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
