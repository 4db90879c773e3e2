#!/usr/bin/env bash
# Runs fdjax on N local processes joined by jax.distributed (CPU collectives
# work across local processes), e.g. to rehearse a multi-host run:
#
#   launch/local.sh 2 --config=configs/default.py:small --workdir=/tmp/mp
#
# Process 0 prints to this terminal; the others log to $FDJAX_LOGDIR
# (default: the workdir's parent) as fdjax_process_<i>.log. Each process sees
# $FDJAX_DEVICES_PER_PROCESS fake CPU devices (default 2). Exits non-zero if
# any process fails.
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES --config=... --workdir=... [flags]" >&2
  exit 2
fi
num_processes=$1
shift
python=${PYTHON:-python3}
port=${FDJAX_PORT:-$((20000 + RANDOM % 20000))}
logdir=${FDJAX_LOGDIR:-/tmp}
devices=${FDJAX_DEVICES_PER_PROCESS:-2}
export XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

pids=()
for ((i = 0; i < num_processes; i++)); do
  args=(-m fdjax.main --distributed=explicit
        --coordinator_address="localhost:${port}"
        --num_processes="${num_processes}" --process_id="${i}" "$@")
  if [[ $i -eq 0 ]]; then
    "$python" "${args[@]}" &
  else
    "$python" "${args[@]}" >"${logdir}/fdjax_process_${i}.log" 2>&1 &
  fi
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
