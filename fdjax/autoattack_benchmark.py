"""`python -m fdjax.benchmark --mode=autoattack`: fdjax's AutoAttack against
the reference PyTorch AutoAttack on the same model, examples and CPU.

The models are the repository's tests' digits MLP and CNN
(``tests/digits_mlp.py``, ``tests/digits_cnn.py``, weights committed); the
reference runs ``benchmarks/autoattack_reference.py`` from its own virtual
environment (``--aa_reference_python``) in the same run. See
`fdjax.benchmark` for the command line.
"""

from collections.abc import Sequence
import importlib.util
import json
import os
import subprocess
import tempfile
import time

from absl import app
import jax
import numpy as np

from fdjax import attacks
from fdjax import parallel

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _test_module(name: str):
  """A module of the clone's tests/ (the digits models and their data)."""
  path = os.path.join(_REPO, 'tests', f'{name}.py')
  if not os.path.exists(path):
    raise app.UsageError(
      '--mode=autoattack runs from a clone of the repository: it uses '
      f'tests/{name}.py and its committed weights, not found at {path}.'
    )
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _timed_autoattack(aa, params, key, x, y):
  """(result, {attack: seconds}, total seconds) of one AutoAttack call."""
  per_attack, clock = {}, {'t': time.perf_counter()}

  def on_batch(name, *_):
    now = time.perf_counter()
    per_attack[name] = per_attack.get(name, 0.0) + now - clock['t']
    clock['t'] = now

  start = clock['t']
  r = aa(params, key, x, y, on_batch=on_batch)
  return r, per_attack, time.perf_counter() - start


def _reference_autoattack(python, num_examples, epsilon, norm, model):
  """Runs benchmarks/autoattack_reference.py with the reference's venv."""
  script = os.path.join(_REPO, 'benchmarks', 'autoattack_reference.py')
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'ref.json')
    subprocess.run(
      [
        python,
        script,
        f'--out={out}',
        f'--num_examples={num_examples}',
        f'--epsilon={epsilon}',
        f'--norm={"Linf" if norm == "linf" else "L2"}',
        f'--model={model}',
      ],
      check=True,
      stdout=subprocess.DEVNULL,
    )
    with open(out) as f:
      return json.load(f)


def run(
  *,
  num_examples: int = 297,
  epsilon: float = 0.1,
  norm: str = 'linf',
  reference_python: str | None = None,
  scale_points: Sequence[int] = (16, 64, 128, 256),
  scale_batch: int = 64,
  model: str = 'mlp',
  devices: int = 1,
  compilation_cache: str | None = None,
) -> str:
  """Times AutoAttack against the reference; returns the printed tables.

  `devices` > 1 splits every attack batch over that many local devices
  (on a CPU: ``XLA_FLAGS=--xla_force_host_platform_device_count=N``, one
  thread each). `compilation_cache` is a directory for JAX's persistent
  compilation cache: a run that finds it filled by an earlier one loads
  the compiled attacks instead of compiling them.
  """
  if devices > jax.local_device_count():
    raise app.UsageError(
      f'--aa_devices={devices} but this process has '
      f'{jax.local_device_count()} devices; valid: 1 to that, or set '
      f'XLA_FLAGS=--xla_force_host_platform_device_count={devices} on a CPU.'
    )
  cache_state = 'off'
  if compilation_cache:
    warm = os.path.isdir(compilation_cache) and bool(
      os.listdir(compilation_cache)
    )
    cache_state = f'{"warm" if warm else "cold"} ({compilation_cache})'
    jax.config.update('jax_compilation_cache_dir', compilation_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  mesh = None
  if devices > 1:
    mesh = parallel.make_mesh(jax.local_devices()[:devices])
  data_module = _test_module('digits_mlp')
  net = _test_module(f'digits_{model}')
  w = net.weights()
  _, _, x, y = data_module.data()
  x, y = x[:num_examples], y[:num_examples]
  ref = None
  if reference_python:
    ref = _reference_autoattack(reference_python, len(y), epsilon, norm, model)

  def logits_fn(p, z):
    return net.logits_fn(p)(z)

  key = jax.random.key(0)
  batch = -(-len(y) // devices) * devices
  aa = attacks.AutoAttack(
    logits_fn, epsilon=epsilon, norm=norm, batch_size=batch, mesh=mesh
  )
  r, first, total1 = _timed_autoattack(aa, w, key, x, y)
  _, second, total2 = _timed_autoattack(aa, w, key, x, y)
  nan = float('nan')
  cells = [
    [
      'attack',
      'fdjax robust %',
      'reference robust %',
      'fdjax s (1st call)',
      'fdjax s (2nd call)',
      'reference s',
      'ratio (1st)',
      'ratio (2nd)',
    ]
  ]
  cells.append(
    [
      'clean',
      f'{100 * r.robust_accuracy["clean"]:.2f}',
      f'{100 * ref["robust_accuracy"]["clean"]:.2f}' if ref else '-',
      '',
      '',
      '',
      '',
      '',
    ]
  )
  for name in r.attacks:
    t1, t2 = first.get(name, 0.0), second.get(name, 0.0)
    tr = ref['seconds'][name] if ref else nan
    cells.append(
      [
        name,
        f'{100 * r.robust_accuracy[name]:.2f}',
        f'{100 * ref["robust_accuracy"][name]:.2f}' if ref else '-',
        f'{t1:.1f}',
        f'{t2:.1f}',
        f'{tr:.1f}',
        f'{tr / max(t1, 1e-9):.1f}x',
        f'{tr / max(t2, 1e-9):.1f}x',
      ]
    )
  tr = ref['total_seconds'] if ref else nan
  cells.append(
    [
      'total',
      '',
      '',
      f'{total1:.1f}',
      f'{total2:.1f}',
      f'{tr:.1f}',
      f'{tr / total1:.1f}x',
      f'{tr / total2:.1f}x',
    ]
  )
  lines = [
    f'AutoAttack standard, {norm} eps {epsilon}, {len(y)} digits '
    f'({model.upper()}), '
    f'batch {batch} on {devices} device(s), compilation cache '
    f'{cache_state}; reference torch '
    f'{ref["torch"] if ref else "not run (--aa_reference_python)"}',
    _cells_table(cells),
  ]
  if ref:
    theirs = np.asarray(ref['broken_by']) == -1
    ours = r.broken_by == -1
    lines.append(
      f'robust by fdjax only: {int(np.sum(ours & ~theirs))}, by the '
      f'reference only: {int(np.sum(theirs & ~ours))} (of {len(y)})'
    )
  # Cost against the number of still-robust points: every attack runs on
  # batches of `scale_batch` (the last padded), timed on a second call.
  robust = np.flatnonzero(r.broken_by != 0)
  scale_batch = -(-scale_batch // devices) * devices
  scaled = attacks.AutoAttack(
    logits_fn, epsilon=epsilon, norm=norm, batch_size=scale_batch, mesh=mesh
  )
  cells = [['points'] + list(r.attacks) + ['total']]
  for n in scale_points:
    idx = np.resize(robust, n)  # Repeats points beyond the robust ones.
    _timed_autoattack(scaled, w, key, x[idx], y[idx])  # Compiles new sizes.
    _, per, total = _timed_autoattack(scaled, w, key, x[idx], y[idx])
    cells.append(
      [str(n)]
      + [f'{per.get(a, 0.0):.2f}' for a in r.attacks]
      + [f'{total:.2f}']
    )
  lines.append(
    f'\nfdjax seconds by number of points attacked (batches of '
    f'{scale_batch}, the last one padded to a power of two; each attack '
    'runs only on the points the ones before it left robust; a new size '
    'compiles once)'
  )
  lines.append(_cells_table(cells))
  return '\n'.join(lines)


def _cells_table(cells: list[list[str]]) -> str:
  widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
  return '\n'.join(
    '  '.join(c.rjust(w) for c, w in zip(row, widths)).rstrip() for row in cells
  )
