#!/usr/bin/env bash
# Runs fdjax on every worker of a Cloud TPU VM pod slice. jax.distributed
# detects the slice by itself (--distributed=auto).
#
#   TPU=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh \
#     --config=configs/imagenet.py:r152_denoise --workdir=gs://BUCKET/r152d \
#     --config.data.data_dir=gs://BUCKET/tfds
#
# FDJAX_REPO (a git URL) is cloned and installed on every worker first;
# set FDJAX_SETUP=0 to skip that. The workdir
# must be shared by all workers (a GCS bucket); each worker reads its own
# part of the data.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
setup="true"
if [[ ${FDJAX_SETUP:-1} == 1 ]]; then
  : "${FDJAX_REPO:?set FDJAX_REPO to the git URL of your fdjax copy, or FDJAX_SETUP=0}"
  setup="(test -d fdjax || git clone ${FDJAX_REPO} fdjax) && cd fdjax && git pull -q && pip install -q -e . 'jax[tpu]' && cd .."
fi
printf -v flags '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
  --command "${setup} && cd fdjax && python3 -m fdjax.main --distributed=auto ${flags}"
