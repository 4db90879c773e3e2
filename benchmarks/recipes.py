r"""Training recipes side by side: cost per step, wall time and robustness.

  python benchmarks/recipes.py --config=configs/default.py --seed=0 \
      --workdir=/tmp/fdjax_recipes --baseline=paper-30   # digits
  python benchmarks/recipes.py --config=configs/cifar10.py:small \
      --synthetic --cost_only --set attack.num_steps=10 \
      --set train.global_batch_size=128       # CIFAR-10-shaped, cost only

For the rows of `ROWS` (`--rows`, default all): the paper's recipe
(`train.recipe='pgd'`) with the config's attack ('paper') and with the
paper's own 30 PGD steps ('paper-30'), each also with a moving average of
the weights ('+ema'), TRADES with the config's attack and with 1 or 2 KL
steps ('trades-1', 'trades-2'), fast AT and free AT, on the same model,
data and seed, it prints one table, every row also relative to
`--baseline` (default the first row):

* s/step: seconds per train step, from the training run's own throughput
  (the median of its logged intervals but the first, which compiles), or
  with `--cost_only` of a compiled step on one fixed batch (after a warm-up
  call); and that relative to the baseline's step. Free AT's step holds
  `train.free_replays` optimizer updates; its run takes that many times
  fewer steps (`num_epochs / m`, Shafahi et al.), so its cost per EPOCH is
  the other column.
* wall: seconds of the whole training run (compiling included) and that
  relative to the baseline's, then clean
  accuracy, 100-step untargeted PGD accuracy, 100-step targeted (the
  paper's random-target) PGD accuracy and AutoAttack accuracy
  (`--autoattack`, default 'standard') of the evaluated weights (the moving
  average for '+ema') on the eval split, and the AutoAttack accuracy's
  difference from the baseline's in points.

With `--synthetic` the data are random images of the config's shape (no
download; accuracies meaningless, so use it with `--cost_only`). Each run's
workdir is `--workdir/<row>`; rerunning resumes (and then its wall time is
the resumed part's). Timings depend on the CPU and on what else runs on it.
"""

import argparse
import ast
import importlib.util
import json
import os
import time

import jax
import numpy as np

from fdjax import config_base
from fdjax import data
from fdjax import evaluate
from fdjax import input_pipeline
from fdjax import models
from fdjax import parallel
from fdjax import train

ROWS = {
  'paper': {},
  'paper+ema': {'train.ema_decay': 0.98},
  # The paper's own attack length: 30 PGD steps, the step / epsilon ratio of
  # its 1 / 16 (ImageNet: step 1, epsilon 16).
  'paper-30': {'attack.num_steps': 30, 'attack.step_size': 'eps/16'},
  'paper-30+ema': {
    'attack.num_steps': 30,
    'attack.step_size': 'eps/16',
    'train.ema_decay': 0.9,
  },
  'trades': {'train.recipe': 'trades'},
  # TRADES with 2 KL steps of eps / 2 instead of the config's attack.
  'trades-2': {
    'train.recipe': 'trades',
    'attack.num_steps': 2,
    'attack.step_size': 'eps/2',
  },
  # TRADES with one KL step of eps: a fast recipe's cost.
  'trades-1': {
    'train.recipe': 'trades',
    'attack.num_steps': 1,
    'attack.step_size': 'eps',
  },
  'fast': {'train.recipe': 'fast'},
  'free': {'train.recipe': 'free'},
}


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('recipe_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def set_field(config, item: str) -> None:
  """Applies one `--set section.field=value` (a Python literal, else a
  string) to a config; a clear error for an unknown field."""
  key, sep, text = item.partition('=')
  section, _, field = key.partition('.')
  if not sep or section not in config or field not in config[section]:
    raise SystemExit(
      f'--set {item!r} is not valid; valid: SECTION.FIELD=VALUE with a field '
      'of the config, e.g. --set attack.num_steps=10.'
    )
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  config[section][field] = value


def row_config(base, name: str, seed: int):
  config = base.copy_and_resolve_references()
  config.seed = seed
  for key, value in ROWS[name].items():
    section, field = key.split('.')
    if isinstance(value, str) and value.startswith('eps'):  # eps, eps/K
      _, _, divisor = value.partition('/')
      value = config.attack.epsilon / float(divisor or 1)
    config[section][field] = value
  tc = config.train
  if tc.ema_decay > 0:  # Average the last two thirds of the run.
    steps_per_epoch = max(
      data.dataset_info(config.data).num_train // tc.global_batch_size, 1
    )
    tc.ema_start_step = train.total_steps(tc, steps_per_epoch) // 3
  if tc.recipe == 'free':  # Shafahi et al.: epochs / m, m updates a step.
    if tc.num_steps > 0:
      tc.num_steps = max(tc.num_steps // tc.free_replays, 1)
    else:
      tc.num_epochs = tc.num_epochs / tc.free_replays
  if tc.recipe == 'trades':  # TRADES: untargeted, its own CE (no smoothing).
    tc.label_smoothing = 0.0
  config.eval.sanity = False
  config.eval.figures = False
  return config


def synthetic_source(config, n: int, seed: int):
  info = data.dataset_info(config.data)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, *info.image_shape), dtype=np.uint8)
  labels = rng.integers(0, info.num_classes, n).astype(np.int32)
  return data.ArraySource(images, labels)


def step_seconds(config, source, repeats: int = 5) -> float:
  """Seconds per compiled train step of a config's recipe (fixed batch)."""
  info = data.dataset_info(config.data)
  tc = config.train
  mesh = parallel.make_mesh()
  model = models.from_config(
    config.model, info.num_classes, bn_axis_name=parallel.AXIS
  )
  lr_fn = train.create_learning_rate_fn(tc, 100)
  tx = train.create_optimizer(tc, lr_fn)
  state = train.create_train_state(
    jax.random.key(config.seed),
    model=model,
    image_shape=info.image_shape,
    tx=tx,
    ema=tc.ema_decay > 0,
    free_batch_size=tc.global_batch_size if tc.recipe == 'free' else 0,
  )
  # Placed as the step returns it: the timed calls compile nothing.
  state = jax.device_put(state, train.state_shardings(mesh))
  step = train.make_train_step(
    mesh,
    tc.parallel,
    model=model,
    tx=tx,
    learning_rate_fn=lr_fn,
    num_classes=info.num_classes,
    **train.recipe_step_kwargs(config, info.num_classes),
    label_smoothing=float(tc.label_smoothing),
    weight_decay=float(tc.weight_decay),
    adv_fraction=float(tc.adv_fraction),
    log_clean_accuracy=bool(tc.log_clean_accuracy),
  )
  it = input_pipeline.create_train_iter(
    config.data,
    global_batch_size=tc.global_batch_size,
    seed=config.seed,
    source=source,
    process_index=0,
    process_count=1,
  )
  batch = next(it)
  batch = {k: batch[k] for k in ('image', 'label', 'index')}
  state, m = step(state, batch)  # Compiles.
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(repeats):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return (time.perf_counter() - start) / repeats


def logged_step_seconds(workdir: str, config) -> float:
  """Seconds per step of a run, from its metrics.jsonl throughput."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rates = [json.loads(line)['images_per_s'] for line in f if line.strip()]
  rates = rates[1:] or rates  # The first interval includes compiling.
  return config.train.global_batch_size / float(np.median(rates))


def run_row(config, workdir, train_source, eval_source):
  start = time.perf_counter()
  model, state, mesh, _ = train.train(
    config, workdir, train_source=train_source
  )
  jax.block_until_ready(state.params)
  wall = time.perf_counter() - start
  use_ema = config_base.resolve_eval_config(config.eval).use_ema
  variables = jax.device_get(
    state.ema_variables if use_ema else state.variables
  )
  results = evaluate.evaluate(
    model, variables, config, workdir=workdir, mesh=mesh, source=eval_source
  )
  acc = {'clean': results['clean']['accuracy']}
  for name, r in results['attacks'].items():
    acc[name] = r['accuracy']
  acc['autoattack'] = results.get('autoattack_acc')
  return wall, acc


def _fmt(x, spec):
  return '-' if x is None else format(x, spec)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--workdir', default='/tmp/fdjax_recipes')
  parser.add_argument('--rows', default=','.join(ROWS))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--num_epochs', type=float, default=None)
  parser.add_argument('--autoattack', default='standard')
  parser.add_argument('--synthetic', action='store_true')
  parser.add_argument('--cost_only', action='store_true')
  parser.add_argument('--json_out', default='')
  parser.add_argument(
    '--baseline',
    default='',
    help='the row the others are compared with (default: the first)',
  )
  parser.add_argument(
    '--set',
    action='append',
    default=[],
    metavar='SECTION.FIELD=VALUE',
    help='override a config field for every row (repeatable), e.g. '
    '--set attack.num_steps=10',
  )
  args = parser.parse_args()

  base = load_config(args.config)
  for item in args.set:
    set_field(base, item)
  if args.num_epochs is not None:
    base.train.num_epochs = args.num_epochs
    base.train.num_steps = -1
  base.eval.pgd_steps = (100,)
  base.eval.untargeted_steps = (100,)
  base.eval.autoattack = args.autoattack
  train_source = eval_source = None
  if args.synthetic:
    train_source = synthetic_source(base, 4 * base.train.global_batch_size, 1)
    eval_source = synthetic_source(base, base.eval.global_batch_size, 2)
  cost_source = train_source
  if args.cost_only and cost_source is None:
    cost_source = data.get_source(base.data, base.data.train_split)
  # Bad names fail here, before any row trains.
  names = args.rows.split(',')
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    raise SystemExit(
      f'--rows: {unknown} not valid; valid: a comma-separated list of '
      f'{list(ROWS)}.'
    )
  if args.baseline and args.baseline not in names:
    raise SystemExit(
      f'--baseline={args.baseline!r} is not valid; valid: one of --rows '
      f'{names}.'
    )
  rows = []
  for name in names:
    config = row_config(base, name, args.seed)
    config_base.validate(config)
    row = {'row': name, 'recipe': config.train.recipe}
    row['updates_per_step'] = train.updates_per_step(config.train)
    if args.cost_only:
      row['step_s'] = step_seconds(config, cost_source)
    else:
      workdir = os.path.join(args.workdir, name)
      row['wall_s'], row['accuracy'] = run_row(
        config, workdir, train_source, eval_source
      )
      row['step_s'] = logged_step_seconds(workdir, config)
    rows.append(row)
    print(json.dumps(row), flush=True)

  base_row = rows[names.index(args.baseline) if args.baseline else 0]
  base_step = base_row['step_s']
  print(
    f'\n{args.config}, seed {args.seed}, {jax.device_count()} '
    f'{jax.devices()[0].platform} devices\n'
  )
  b = base_row['row']
  head = f'| row | s/step | vs {b} step | vs {b} epoch |'
  if not args.cost_only:
    head += (
      f' wall s | vs {b} wall | clean | PGD-100 | targeted PGD-100 '
      f'| AutoAttack | vs {b} AutoAttack |'
    )
  print(head)
  print('|' + '---|' * (head.count('|') - 1))
  for row in rows:
    per_epoch = row['step_s'] / base_step
    if row['recipe'] == 'free':
      per_epoch /= row['updates_per_step']
    line = (
      f'| {row["row"]} | {row["step_s"]:.3f} | {row["step_s"] / base_step:.2f} '
      f'| {per_epoch:.2f} |'
    )
    if not args.cost_only:
      a, aa_base = row['accuracy'], base_row['accuracy'].get('autoattack')
      aa_gain = None
      if a.get('autoattack') is not None and aa_base is not None:
        aa_gain = 100 * (a['autoattack'] - aa_base)
      line += (
        f' {row["wall_s"]:.0f} | {row["wall_s"] / base_row["wall_s"]:.2f} '
        f'| {_fmt(a.get("clean"), ".3f")} '
        f'| {_fmt(a.get("untargeted_pgd_100"), ".3f")} '
        f'| {_fmt(a.get("targeted_pgd_100"), ".3f")} '
        f'| {_fmt(a.get("autoattack"), ".3f")} | {_fmt(aa_gain, "+.1f")} pts |'
      )
    print(line)
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
