r"""The paper's black-box protocol (Table 2, CAAD 2018) at small scale, digits.

  python benchmarks/blackbox_digits.py --root=/tmp/fdjax_blackbox

1. Trains (once; a rerun reuses them) four models of `configs/default.py`
   with `python -m fdjax.main`: the DEFENDERS, the quickstart's ResNet with
   denoising blocks, clean-trained and adversarially trained (seed
   --defender_seed), and the SOURCES, the same ResNet without denoising
   blocks, clean-trained and adversarially trained (seed --source_seed): the
   attackers know neither the defenders' weights nor their architecture.
2. Writes one adversarial set per attacker and source
   (`fdjax.attack_set.make_set`, `configs/default.py:blackbox`: L-inf eps
   0.1, 10 steps): FGSM, MI-FGSM, DI-FGSM, TI-FGSM and MI-DI-TI-FGSM on each
   source, and MI-DI-TI-FGSM on the logit ensemble of both sources.
3. Scores each defender on every set (`--mode=eval` with
   `eval.adversarial_sets`): the accuracy per set and all-or-nothing over
   the clean images and every set; prints one table (sets as rows,
   defenders as columns, with the seconds per image of each attacker after
   its first, compiling batch, and the defenders' white-box targeted 10-step
   PGD from their training runs), the `fdjax.results` tables, and writes
   them to ROOT/blackbox_table.md. A rerun reuses models, sets and timings.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fdjax import attack_set  # noqa: E402
from fdjax import evaluate  # noqa: E402
from fdjax import results as results_lib  # noqa: E402

ATTACKERS = {
  'FGSM': dict(num_steps=1, momentum=0.0),
  'MI-FGSM': dict(momentum=1.0),
  'DI-FGSM': dict(momentum=0.0, diversity_prob=0.5),
  'TI-FGSM': dict(momentum=0.0, ti_kernel_size=3),
  'MI-DI-TI-FGSM': dict(momentum=1.0, diversity_prob=0.5, ti_kernel_size=3),
}


def get_config(variant):
  spec = importlib.util.spec_from_file_location(
    'default_config', os.path.join(ROOT, 'configs', 'default.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def train(workdir, seed, *, adversarial, denoise):
  if os.path.exists(os.path.join(workdir, 'results.json')):
    print(f'{workdir}: trained already')
    return
  cmd = [
    sys.executable,
    '-m',
    'fdjax.main',
    '--config=' + os.path.join(ROOT, 'configs', 'default.py'),
    f'--workdir={workdir}',
    f'--config.seed={seed}',
    '--config.eval.pgd_steps=(10,)',
    '--config.eval.sanity=False',
    '--config.eval.figures=False',
  ]
  if not adversarial:
    cmd.append('--config.attack.num_steps=0')
  if not denoise:
    cmd.append('--config.model.denoise_placement=none')
  print(' '.join(cmd), flush=True)
  env = dict(os.environ, PYTHONPATH=ROOT)
  subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def pct(x):
  return f'{100.0 * x:.1f}'


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--root', default='/tmp/fdjax_blackbox')
  parser.add_argument('--defender_seed', type=int, default=0)
  parser.add_argument('--source_seed', type=int, default=1)
  args = parser.parse_args()
  root = args.root
  models = {
    'defender clean': (args.defender_seed, False, True),
    'defender adv': (args.defender_seed, True, True),
    'source clean': (args.source_seed, False, False),
    'source adv': (args.source_seed, True, False),
  }
  dirs = {n: os.path.join(root, n.replace(' ', '_')) for n in models}
  for name, (seed, adversarial, denoise) in models.items():
    train(dirs[name], seed, adversarial=adversarial, denoise=denoise)

  sources = {
    'clean': (dirs['source clean'],),
    'adv': (dirs['source adv'],),
    'ens': (dirs['source clean'], dirs['source adv']),
  }
  timing_path = os.path.join(root, 'timing.json')
  timing = {}
  if os.path.exists(timing_path):
    with open(timing_path) as f:
      timing = json.load(f)
  set_dirs = []
  for src, src_dirs in sources.items():
    for method, fields in ATTACKERS.items():
      if src == 'ens' and method != 'MI-DI-TI-FGSM':
        continue
      name = f'{method} ({src})'
      out = os.path.join(root, 'sets', f'{method}_{src}'.lower())
      config = get_config('blackbox')
      c = config.attack_set
      c.out, c.name, c.sources = out, name, src_dirs
      for k, v in fields.items():
        c[k] = v
      start = time.perf_counter()
      stats = attack_set.make_set(config, None)
      if stats['written']:
        timing[name] = {
          'seconds_per_image': stats['seconds_per_image'],
          'wall_s': time.perf_counter() - start,
          'batch_size': c.global_batch_size,
        }
      set_dirs.append(out)
  with open(timing_path, 'w') as f:
    json.dump(timing, f, indent=2)

  rows = []
  for name in ('defender clean', 'defender adv'):
    config = get_config('blackbox')
    config.eval.adversarial_sets = tuple(set_dirs)
    config.eval.model_name = name
    rows.append(
      evaluate.run(
        config,
        dirs[name],
        eval_dir=os.path.join(root, 'eval', name.replace(' ', '_')),
      )
    )
  white = []
  for name in ('defender clean', 'defender adv'):
    path = os.path.join(dirs[name], 'eval', 'digits_test', 'results.json')
    with open(path) as f:
      r = json.load(f)
    r['model'] = name
    white.append(r)
  lines = [
    'Defenders (columns) against each transfer set: accuracy %; '
    "all-or-nothing over the clean images and every set; the attacker's "
    'seconds per image.',
    '',
    '| set: attacker (source) | s / image | '
    + ' | '.join(r['model'] for r in rows)
    + ' |',
    '|---|---|' + '---|' * len(rows),
    '| clean | | '
    + ' | '.join(pct(r['clean']['accuracy']) for r in rows)
    + ' |',
  ]
  for key, a in rows[0]['attacks'].items():
    t = timing.get(a['label'], {}).get('seconds_per_image', float('nan'))
    lines.append(
      f'| {a["label"]} | {t:.1e} | '
      + ' | '.join(pct(r['attacks'][key]['accuracy']) for r in rows)
      + ' |'
    )
  lines.append(
    '| **all-or-nothing** | | '
    + ' | '.join(f'**{pct(r["all_or_nothing"]["accuracy"])}**' for r in rows)
    + ' |'
  )
  lines.append(
    '| white-box targeted 10-step PGD | | '
    + ' | '.join(
      pct(w['attacks']['targeted_pgd_10']['accuracy']) for w in white
    )
    + ' |'
  )
  lines += [
    '',
    'The same as fdjax.results tables (--mode=eval prints these):',
    '',
    results_lib.format_table(rows, sanity=False),
    '',
    results_lib.format_table(white, sanity=False),
  ]
  text = '\n'.join(lines) + '\n'
  print(text)
  with open(os.path.join(root, 'blackbox_table.md'), 'w') as f:
    f.write(text)


if __name__ == '__main__':
  main()
