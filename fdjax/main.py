r"""fdjax's entry point: train, evaluate or predict from a config.

  python -m fdjax.main --config=configs/default.py --workdir=/tmp/fdjax
  python -m fdjax.main --config=configs/imagenet.py:r152_denoise \
      --workdir=gs://bucket/r152d --config.train.global_batch_size=1024
  python -m fdjax.main --mode=eval --config=configs/imagenet.py:r152_denoise \
      --workdir=/tmp/r152_denoise   # e.g. a `fdjax.convert` output
  python -m fdjax.main --mode=attack --config=configs/default.py:blackbox \
      --workdir=/tmp/source_model --config.attack_set.out=/tmp/sets/mi_fgsm
  python -m fdjax.main --mode=predict --config=configs/imagenet.py:r152 \
      --workdir=/tmp/r152 --image_dir=imgs/ --output_csv=predictions.csv

Rerunning a training command with the same --workdir resumes from the newest
checkpoint. Multi-host: pass --coordinator_address/--num_processes/
--process_id, or let `jax.distributed.initialize()` detect Cloud TPU and
SLURM (--distributed=auto); see launch/.
"""

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from fdjax import attack_set
from fdjax import checkpoints
from fdjax import config_base
from fdjax import evaluate
from fdjax import predict
from fdjax import results
from fdjax import train
from fdjax import workdir as workdir_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config',
  None,
  'Experiment config file (configs/*.py[:variant]).',
  lock_config=True,
)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
flags.DEFINE_enum(
  'mode',
  'train',
  ['train', 'eval', 'predict', 'attack'],
  'train (then evaluate), eval (a workdir/checkpoint), predict (a '
  'directory of images to a CSV) or attack (an adversarial set of the eval '
  'split, config.attack_set, from the workdir model; fdjax.attack_set).',
)
flags.DEFINE_string('image_dir', None, '--mode=predict: images to classify.')
flags.DEFINE_string('output_csv', None, '--mode=predict: the CSV to write.')
flags.DEFINE_bool(
  'skip_bad_images',
  False,
  '--mode=predict: skip (and list at the end) the files that do not decode, '
  'instead of stopping at the first.',
)
flags.DEFINE_string(
  'eval_dir',
  None,
  '--mode=eval: write results here instead of WORKDIR/eval/<name>/ (e.g. '
  'for a read-only or shared model directory).',
)
flags.DEFINE_enum(
  'distributed',
  'off',
  ['off', 'auto', 'explicit'],
  'jax.distributed: off (one process), auto (Cloud TPU / SLURM detection) '
  'or explicit (the three flags below).',
)
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Number of processes.')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


# Errors of the user's making: printed as one line (absl's usage-error
# style), without a traceback.
_USER_ERRORS = (
  (config_base.ConfigError, 'Config error'),
  (checkpoints.CheckpointError, 'Checkpoint error'),
  (workdir_lib.WorkdirError, 'Workdir error'),
  (FloatingPointError, 'Training stopped'),
  (FileNotFoundError, 'Not found'),
  (predict.ImageError, 'Input error'),
)


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax (one line per file it writes)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or (
      '/orbax/' not in record.pathname
    )


def _init_distributed():
  if FLAGS.distributed == 'auto':
    jax.distributed.initialize()
  elif FLAGS.distributed == 'explicit':
    missing = [
      name
      for name in ('coordinator_address', 'num_processes', 'process_id')
      if getattr(FLAGS, name) is None
    ]
    if missing:
      raise app.UsageError(
        '--distributed=explicit needs --' + ', --'.join(missing)
      )
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )


def main(argv):
  try:
    _main(argv)
  except tuple(error for error, _ in _USER_ERRORS) as e:
    kind = next(k for error, k in _USER_ERRORS if isinstance(e, error))
    raise SystemExit(f'FATAL {kind}: {e}') from None


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # TensorFlow (if installed, for tfds) must not grab accelerators.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:
    import tensorflow as tf  # pytype: disable=import-error

    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except (ImportError, RuntimeError, ValueError):
    pass
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _init_distributed()
  logging.info(
    'JAX process %d/%d, local devices %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  config = FLAGS.config
  if FLAGS.mode != 'train':  # train() checks the whole config itself.
    config_base.validate_eval(config)
  if FLAGS.mode == 'eval':
    config_base.check_run(config, eval_devices=jax.device_count())
  if FLAGS.mode == 'train':
    train.train_and_evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == 'eval':
    out = evaluate.run(config, FLAGS.workdir, eval_dir=FLAGS.eval_dir)
    if jax.process_index() == 0:
      print(results.format_table(out))
      for name, path in sorted(out.get('files', {}).items()):
        print(f'{name}: {path}')
  elif FLAGS.mode == 'attack':
    out = attack_set.make_set(config, FLAGS.workdir)
    if jax.process_index() == 0:
      print(
        f'{out["method"]}: wrote {out["written"]} images ({out["skipped"]} '
        f'already there) to {out["directory"]}'
      )
  else:
    if not FLAGS.image_dir or not FLAGS.output_csv:
      raise app.UsageError('--mode=predict needs --image_dir and --output_csv')
    out = predict.run_predict(
      config,
      FLAGS.workdir,
      FLAGS.image_dir,
      FLAGS.output_csv,
      skip_bad=FLAGS.skip_bad_images,
    )
    if jax.process_index() == 0:
      print(f'wrote {len(out)} predictions to {FLAGS.output_csv}')
      for name, reason in out.skipped:
        print(f'skipped {name}: {reason}')


if __name__ == '__main__':
  app.run(main)
