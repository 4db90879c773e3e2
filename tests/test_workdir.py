"""A workdir belongs to one run: settings, one process, no clobbering."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from fdjax import checkpoints
from fdjax import config_base
from fdjax import convert
from fdjax import evaluate
from fdjax import train
from fdjax import workdir as workdir_lib
from tests.test_train import ROOT
from tests.test_train import digits_source
from tests.test_train import tiny_config


def _tree(path):
  """{relative path: bytes} of every file under `path`."""
  out = {}
  for root, _, names in os.walk(path):
    for name in names:
      p = os.path.join(root, name)
      out[os.path.relpath(p, path)] = open(p, 'rb').read()
  return out


def test_a_rerun_with_other_defining_settings_is_refused_before_writing(
  tmp_path, caplog
):
  workdir = str(tmp_path)
  workdir_lib.check_and_record(tiny_config(), workdir)
  before = _tree(workdir)
  other = tiny_config(
    **{'model.denoise_affinity': 'dot_product', 'model.num_filters': 8}
  )
  with pytest.raises(workdir_lib.WorkdirError) as e:
    train.train(other, workdir, train_source=digits_source())
  message = str(e.value)
  assert '\n' not in message
  assert "model.denoise_affinity: 'gaussian' -> 'dot_product'" in message
  assert 'model.num_filters: 4 -> 8' in message
  assert 'train.num_steps' in message  # Named as allowed to change.
  before.pop('.lock', None)
  after = _tree(workdir)
  after.pop('.lock', None)
  assert after == before  # config.json untouched, nothing else written.
  # Settings that may change on resume pass, and are said to.
  allowed = tiny_config(
    **{'train.log_every_steps': 3, 'train.num_steps': 9, 'eval.restarts': 2}
  )
  with caplog.at_level(logging.INFO):
    workdir_lib.check_and_record(allowed, workdir)
  assert 'may change on resume' in caplog.text
  assert 'train.num_steps: 3 -> 9' in caplog.text
  recorded = json.load(open(os.path.join(workdir, 'config.json')))
  assert recorded['train']['num_steps'] == 9
  # A record from before a setting existed: the setting at its default is
  # no difference; at another value it is.
  del recorded['model']['denoise_residual'], recorded['train']['momentum']
  assert workdir_lib.differences(recorded, allowed)[0] == []
  allowed.train.momentum = 0.5
  assert workdir_lib.differences(recorded, allowed)[0] == [
    "train.momentum: '<absent>' -> 0.5"
  ]


def test_training_into_a_converted_model_dir_is_refused(tmp_path):
  os.makedirs(tmp_path / 'checkpoints' / '0')
  with pytest.raises(workdir_lib.WorkdirError, match='no config.json'):
    workdir_lib.check_and_record(tiny_config(), str(tmp_path))


_HOLD = """
import sys, time
from fdjax import workdir
with workdir.lock(sys.argv[1]):
  print('locked', flush=True)
  time.sleep(600)
"""


def test_a_second_process_stops_at_once_and_a_killed_one_frees_the_lock(
  tmp_path,
):
  workdir = str(tmp_path)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  holder = subprocess.Popen(
    [sys.executable, '-c', _HOLD, workdir],
    stdout=subprocess.PIPE,
    text=True,
    env=env,
  )
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(workdir_lib.WorkdirError) as e:
      train.train(tiny_config(), workdir, train_source=digits_source())
    assert f'in use by process {holder.pid}' in str(e.value)
    assert not os.path.exists(os.path.join(workdir, 'config.json'))
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lib.lock(workdir):  # Not left stuck by the killed holder.
    with workdir_lib.lock(workdir):  # Re-entrant within one process.
      pass


def test_convert_refuses_an_out_dir_with_checkpoints(tmp_path):
  os.makedirs(tmp_path / 'run' / 'checkpoints' / '2')
  with pytest.raises(ValueError, match='already holds checkpoints'):
    convert.check_out_dir(str(tmp_path / 'run'))
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'config.json').write_text('{}')
  with pytest.raises(ValueError, match='already holds'):
    convert.check_out_dir(str(tmp_path / 'other'))
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(ValueError, match='is a file'):
    convert.check_out_dir(str(tmp_path / 'a_file'))
  convert.check_out_dir(str(tmp_path / 'new'))  # Fine: nothing there.
  assert os.path.isdir(tmp_path / 'run' / 'checkpoints' / '2')


def _bad_npz_files(d):
  """{case: (path, expected words)} of malformed weight files."""
  good = d / 'good.npz'
  np.savez(good, **{'linear/W:0': np.ones((2, 3), np.float32)})
  data = good.read_bytes()
  (d / 'truncated.npz').write_bytes(data[: len(data) // 2])
  (d / 'text.npz').write_text('not weights\n')
  np.save(d / 'single.npy', np.ones(3))
  np.savez(d / 'objects.npz', w=np.array([{'a': 1}], dtype=object))
  damaged = d / 'damaged.npz'
  with zipfile.ZipFile(damaged, 'w') as z:
    z.writestr('w.npy', b'\x93NUMPY garbage')
  return {
    'truncated': (d / 'truncated.npz', 'not'),
    'text': (d / 'text.npz', 'not an npz archive'),
    'npy': (d / 'single.npy', 'not an npz archive'),
    'pickle': (d / 'objects.npz', 'Python objects'),
    'damaged': (damaged, 'damaged'),
    'missing': (d / 'missing.npz', 'no such file'),
    'directory': (d, 'a directory'),
  }


def test_malformed_weight_files_are_one_line_with_the_path(tmp_path):
  for case, (path, words) in _bad_npz_files(tmp_path).items():
    with pytest.raises(ValueError) as e:
      convert.load_tensorpack(str(path), arch='ResNet', depth=50)
    message = str(e.value)
    assert message.startswith(str(path)), (case, message)
    assert words in message and '\n' not in message, (case, message)
    assert 'allow_pickle' not in message, (case, message)


def test_a_read_only_model_dir_is_evaluated_into_eval_dir(
  trained_workdir, tmp_path
):
  config, source, _ = trained_workdir
  model_dir = str(tmp_path / 'model')
  shutil.copytree(source, model_dir)
  before = _tree(model_dir)
  for root, dirs, files in os.walk(model_dir):
    for name in dirs + files:
      os.chmod(os.path.join(root, name), 0o555)
  os.chmod(model_dir, 0o555)
  config.eval.sanity = False
  config.eval.figures = False
  config.eval.pgd_steps = (1,)
  config_base.validate_eval(config)
  try:
    out = evaluate.run(config, model_dir, eval_dir=str(tmp_path / 'eval'))
  finally:
    for root, _, _ in os.walk(model_dir):
      os.chmod(root, 0o755)
  assert out['checkpoint_step'] == 6
  assert os.path.exists(tmp_path / 'eval' / 'results.json')
  assert _tree(model_dir) == before
  assert checkpoints.load_variables(model_dir)[2] == 6
