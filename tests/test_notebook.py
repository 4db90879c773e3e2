"""Executes notebooks/fdjax_quickstart.ipynb headless, with tiny settings.

The notebook runs in a fresh kernel (ipykernel's bundled `python3` spec,
started with this interpreter) with `FDJAX_NOTEBOOK_SMALL=1` and 8 fake CPU
devices, from the notebooks/ folder, as a user running it from a checkout
would. A probe cell appended by the test checks what the notebook computed.
"""

import base64
import json
import os
import pathlib
import time

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'notebooks' / 'fdjax_quickstart.ipynb'
CELL_TIMEOUT_S = 600
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'

# Appended to the notebook: what it computed, as one JSON line.
PROBE = r"""
import json as _json
print('PROBE' + _json.dumps({
    'small': SMALL,
    'backend': BACKEND,
    'num_devices': jax.device_count(),
    'adv': {'train': sorted(adv['train']), 'eval': adv['eval']},
    'clean': {'train': sorted(clean['train']), 'eval': clean['eval']},
    'clean_attack_steps': clean_config.attack.num_steps,
    'adv_attack_steps': config.attack.num_steps,
    'curves': {k: {str(s): a for s, a in v.items()}
               for k, v in curves.items()},
    'figures': [curve_png] + [os.path.join(WORKDIR, f'feature_maps_{i}.png')
                              for i in range(2)],
    'adv_linf': {name: float(abs(out['targeted'] - digits).max())
                 for name, (_, _, out) in networks.items()},
}, default=float))
"""


def read_notebook():
  return nbformat.read(NOTEBOOK, as_version=4)


def tagged(nb, tag):
  cells = [c for c in nb.cells if tag in c.metadata.get('tags', [])]
  assert len(cells) == 1, f'expected one cell tagged {tag!r}, got {len(cells)}'
  return cells[0]


def stdout(cell):
  return ''.join(
    o.get('text', '')
    for o in cell.outputs
    if o.output_type == 'stream' and o.name == 'stdout'
  )


def streams(cell):
  """stdout and stderr (where the results table is logged) together."""
  return ''.join(
    o.get('text', '') for o in cell.outputs if o.output_type == 'stream'
  )


def pngs(cell):
  return [
    base64.b64decode(o.data['image/png'])
    for o in cell.outputs
    if o.output_type in ('display_data', 'execute_result')
    and 'image/png' in o.get('data', {})
  ]


def test_committed_notebook_is_valid_and_has_no_outputs():
  nb = read_notebook()
  nbformat.validate(nb)
  assert nb.nbformat == 4
  assert nb.metadata.kernelspec.name == 'python3'
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code, 'the notebook has no code cells'
  for cell in code:
    assert cell.outputs == [], 'commit the notebook with outputs cleared'
    assert cell.execution_count is None
  params = tagged(nb, 'parameters').source
  assert "SMALL = os.environ.get('FDJAX_NOTEBOOK_SMALL') == '1'" in params
  assert "FDJAX_GIT_URL = ''" in params


def execute_small(tmp_dir):
  """Runs the notebook with tiny settings; returns it and the probe's dict."""
  nb = read_notebook()
  nb.cells.append(nbformat.v4.new_code_cell(PROBE))
  env = dict(os.environ)
  env.update(
    FDJAX_NOTEBOOK_SMALL='1',
    XLA_FLAGS='--xla_force_host_platform_device_count=8',
    JAX_PLATFORMS='cpu',
    TMPDIR=str(tmp_dir),  # The notebook's workdirs go to pytest's tmp_path.
  )
  # The kernel picks matplotlib's inline backend unless one is forced.
  env.pop('MPLBACKEND', None)
  client = nbclient.NotebookClient(
    nb,
    timeout=CELL_TIMEOUT_S,
    kernel_name='python3',
    allow_errors=False,
    resources={'metadata': {'path': str(NOTEBOOK.parent)}},
  )
  start = time.perf_counter()
  client.execute(env=env)
  print(f'notebook executed in {time.perf_counter() - start:.1f} s')
  probe = stdout(nb.cells[-1])
  assert probe.startswith('PROBE'), probe
  return nb, json.loads(probe[len('PROBE') :])


# One test runs the notebook once (pytest-xdist would run a module-scoped
# fixture once per worker); the checks below are its parts.
def test_notebook_runs_with_small_settings(tmp_path):
  nb, probe = execute_small(tmp_path)
  for cell in nb.cells:
    for o in cell.get('outputs', []):
      assert o.output_type != 'error', o
  check_setup(nb, probe)
  check_denoise_ops(nb)
  check_training(nb, probe)
  check_attacks(nb, probe)
  check_figures(nb, probe, tmp_path)


def check_setup(nb, probe):
  assert probe['small'] is True
  assert probe['backend'] == 'cpu'
  assert probe['num_devices'] == 8
  assert 'backend: cpu (8 device(s))' in stdout(tagged(nb, 'devices'))
  assert 'fdjax 0.1.0' in stdout(tagged(nb, 'install'))


def check_denoise_ops(nb):
  (png,) = pngs(tagged(nb, 'denoise-ops'))
  assert png.startswith(PNG_MAGIC)


def check_training(nb, probe):
  adv_out = streams(tagged(nb, 'train'))
  clean_out = streams(tagged(nb, 'train-clean'))
  compare = stdout(tagged(nb, 'compare'))
  header = '| model | clean | 1-step PGD | 2-step PGD | all-or-nothing |'
  for text in (adv_out, clean_out, compare):
    assert header in text, text
  assert '| denoise, adversarial training |' in adv_out
  assert '| denoise, clean training |' in clean_out
  rows = [line for line in compare.splitlines() if line.startswith('| ')]
  assert [r.split('|')[1].strip() for r in rows[1:]] == [
    'denoise, adversarial training',
    'denoise, clean training',
  ]
  # Adversarial training attacked its batches; clean training did not.
  assert probe['adv_attack_steps'] > 0
  assert probe['clean_attack_steps'] == 0
  assert 'attack_success' in probe['adv']['train']
  assert 'attack_success' not in probe['clean']['train']
  for name in ('adv', 'clean'):
    ev = probe[name]['eval']
    assert ev['num_examples'] == 32
    assert sorted(ev['attacks']) == ['targeted_pgd_1', 'targeted_pgd_2']
    accuracies = [a['accuracy'] for a in ev['attacks'].values()]
    assert all(0.0 <= acc <= 1.0 for acc in accuracies), accuracies
    # Robust under every attack: at most as often as under any one.
    assert ev['all_or_nothing']['accuracy'] <= min(accuracies) + 1e-9


def check_attacks(nb, probe):
  cell = tagged(nb, 'attack')
  (png,) = pngs(cell)
  assert png.startswith(PNG_MAGIC)
  assert stdout(cell).count('correct on 8 digits') == 2
  epsilon = probe['adv']['eval']['epsilon']
  for linf in probe['adv_linf'].values():
    assert 0.0 < linf <= epsilon + 1e-6


def check_figures(nb, probe, tmp_path):
  (curve,) = pngs(tagged(nb, 'figure-curve'))
  features = pngs(tagged(nb, 'figure-features'))
  assert len(features) == 2
  for png in [curve, *features]:
    assert png.startswith(PNG_MAGIC)
  assert sorted(probe['curves']) == [
    'denoise, adversarial training',
    'denoise, clean training',
  ]
  for points in probe['curves'].values():
    assert sorted(points) == ['1', '2']
  for path in probe['figures']:
    assert pathlib.Path(path).is_relative_to(tmp_path), path
    with open(path, 'rb') as f:
      assert f.read(8) == PNG_MAGIC
