"""Checkpoint faults: damaged steps are skipped, never loaded, never saved.

One tiny training run (steps 2, 4, 6) is shared; each test damages a copy
of it the way a disk, a careless `rm` or a full disk would.
"""

import errno
import json
import logging
import os
import re
import shutil
import struct

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from fdjax import checkpoints
from fdjax import train
from fdjax import writers
from tests.test_train import digits_source

METRICS = writers.METRICS_FILE
START = event_pb2.SessionLog.START


@pytest.fixture
def trained(trained_workdir):
  return trained_workdir


def _copy(trained, tmp_path):
  workdir = str(tmp_path / 'workdir')
  shutil.copytree(trained[1], workdir)
  return workdir


def _step_dir(workdir, step):
  return os.path.join(checkpoints.checkpoint_dir(workdir), str(step))


def _data_files(step_dir):
  """The largest file of each of the state's data directories (orbax's
  OCDBT layout: a merged `d/` and one per process)."""
  out = []
  for root, _, names in os.walk(os.path.join(step_dir, 'state')):
    if os.path.basename(root) == 'd' and names:
      paths = [os.path.join(root, n) for n in names]
      out.append(max(paths, key=os.path.getsize))
  assert out, step_dir
  return out


def _truncate(step_dir):
  for path in _data_files(step_dir):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def _overwrite(step_dir):
  for path in _data_files(step_dir):
    size = os.path.getsize(path)
    with open(path, 'wb') as f:
      f.write(np.random.default_rng(0).bytes(size))


def _flip(step_dir):
  for path in _data_files(step_dir):
    data = bytearray(open(path, 'rb').read())
    data[int(len(data) * 0.3)] ^= 0xFF
    open(path, 'wb').write(bytes(data))


def _delete_data(step_dir):
  for path in _data_files(step_dir):
    os.remove(path)


DAMAGES = {
  'truncate_data': _truncate,
  'overwrite_data': _overwrite,
  'flip_bytes': _flip,
  'delete_data': _delete_data,
  'delete_meta': lambda d: os.remove(os.path.join(d, 'meta', 'metadata')),
  'delete_state': lambda d: shutil.rmtree(os.path.join(d, 'state')),
}


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_damaged_newest_step_falls_back_to_the_previous(
  trained, tmp_path, damage, caplog
):
  workdir = _copy(trained, tmp_path)
  good, _, _ = checkpoints.load_variables(workdir, step=4)
  DAMAGES[damage](_step_dir(workdir, 6))
  files_before = sorted(os.walk(workdir))
  with caplog.at_level(logging.WARNING):
    variables, _, step = checkpoints.load_variables(workdir)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, variables, good)
  skipped = [r for r in caplog.records if 'Skipping checkpoint' in r.message]
  assert len(skipped) == 1 and 'step 6' in skipped[0].message
  assert '\n' not in skipped[0].getMessage()
  # Loading (evaluation) moves nothing: the directory may be read-only.
  assert sorted(os.walk(workdir)) == files_before


def test_flipped_bytes_fail_the_checksum(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  manager = checkpoints.create_manager(workdir, enable_async=False)
  state, meta = checkpoints.restore(manager, 6)
  state = jax.tree.map(np.array, state)  # Writable host copies.
  assert checkpoints.verify(state, meta) is None
  leaf = state['params']['linear']['kernel']
  leaf.view(np.uint32).reshape(-1)[3] ^= 1 << 20  # One bit of one weight.
  code, reason = checkpoints.verify(state, meta)
  assert code == 'checksum' and 'params/linear/kernel' in reason
  state['params']['linear']['kernel'] = np.full_like(leaf, np.inf)
  del meta['checksums']  # Written before checksums: finiteness still holds.
  assert checkpoints.verify(state, meta)[0] == 'nonfinite'


def test_stray_empty_step_folder_is_skipped(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  os.makedirs(_step_dir(workdir, 8))
  _, _, step = checkpoints.load_variables(workdir)
  assert step == 6


def test_no_step_restores_lists_each_step(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  for step in (2, 4, 6):
    _truncate(_step_dir(workdir, step))
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.load_variables(workdir)
  message = str(e.value)
  assert '\n' not in message and len(message) < 1500, message
  for step in (2, 4, 6):
    assert f'step {step}: ' in message
  assert not os.path.exists(
    os.path.join(checkpoints.checkpoint_dir(workdir), 'rejected')
  )


def test_training_resumes_from_the_previous_step_and_ends_the_same(
  trained, tmp_path, caplog
):
  """The end-to-end fallback: damage step 6, rerun, same final state."""
  config, _, final = trained
  workdir = _copy(trained, tmp_path)
  _flip(_step_dir(workdir, 6))
  with caplog.at_level(logging.INFO):
    _, state, _, _ = train.train(config, workdir, train_source=digits_source())
  assert 'Resumed from step 4' in caplog.text
  ckpt = checkpoints.checkpoint_dir(workdir)
  (rejected,) = os.listdir(os.path.join(ckpt, 'rejected'))
  assert re.fullmatch(r'6-(checksum|unreadable)', rejected), rejected
  # The rewritten step 6 and the kept 2 and 4: the rejected one is not
  # counted by max_to_keep (3).
  manager = checkpoints.create_manager(workdir)
  assert sorted(manager.all_steps()) == [2, 4, 6]
  # Logs follow the state: one row per step, those of the resumed run.
  rows = [json.loads(r) for r in open(os.path.join(workdir, METRICS))]
  assert [r['step'] for r in rows] == [2, 4, 6]
  assert any(e.session_log.status == START and e.step == 5 for e in
             _events(os.path.join(workdir, 'tensorboard')))  # fmt: skip
  state = jax.device_get(state)
  jax.tree.map(np.testing.assert_array_equal, state.params, final.params)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, final.opt_state)


def _events(directory):
  """The tensorboard Events of every event file in `directory`."""
  out = []
  for name in sorted(os.listdir(directory)):
    data = open(os.path.join(directory, name), 'rb').read()
    i = 0
    while i < len(data):  # TFRecords: length, crc, payload, crc.
      (length,) = struct.unpack('<Q', data[i : i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12 : i + 12 + length])
      out.append(event)
      i += 12 + length + 4
  return out


def test_metric_rows_after_the_resumed_step_are_dropped(tmp_path):
  workdir = str(tmp_path)
  writer = writers.MetricWriter(workdir)
  for step in (1, 2, 3, 4):
    writer.write_scalars(step, {'loss': float(step)})
  writer.close()
  with open(os.path.join(workdir, METRICS), 'a') as f:
    f.write('{"step": 5, "lo')  # Torn by a kill.
  writer = writers.MetricWriter(workdir, start_step=2)
  writer.write_scalars(3, {'loss': 30.0})
  writer.close()
  rows = [json.loads(r) for r in open(os.path.join(workdir, METRICS))]
  assert [(r['step'], r['loss']) for r in rows] == [(1, 1), (2, 2), (3, 30)]
  purges = [
    e.step
    for e in _events(os.path.join(workdir, 'tensorboard'))
    if e.session_log.status == START
  ]
  assert purges == [3]


def test_save_refuses_a_non_finite_state(tmp_path):
  manager = checkpoints.create_manager(str(tmp_path), enable_async=False)
  state = {'params': {'w': np.array([1.0, np.nan], np.float32)}}
  with pytest.raises(FloatingPointError, match='params/w'):
    checkpoints.save(manager, 1, state)
  assert manager.all_steps() == []


def _finite_state():
  return {'params': {'w': np.arange(4, dtype=np.float32)}}


def test_save_onto_a_full_disk_names_the_path_and_the_last_checkpoint(
  tmp_path, monkeypatch
):
  manager = checkpoints.create_manager(str(tmp_path), enable_async=False)
  checkpoints.save(manager, 1, _finite_state())
  ckpt = checkpoints.checkpoint_dir(str(tmp_path))
  usage = shutil.disk_usage(ckpt)
  monkeypatch.setattr(shutil, 'disk_usage', lambda p: usage._replace(free=1000))
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.save(manager, 2, _finite_state())
  message = str(e.value)
  assert ckpt in message and 'No space left' in message
  assert f'last complete checkpoint is step 1 ({ckpt}/1)' in message
  monkeypatch.undo()

  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(type(manager), 'save', no_space)
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.save(manager, 2, _finite_state())
  assert 'No space left' in str(e.value) and 'step 1' in str(e.value)
  assert '\n' not in str(e.value)
