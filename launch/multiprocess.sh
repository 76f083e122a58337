#!/usr/bin/env bash
# N processes on this machine, joined by jax.distributed (CPU collectives over gloo): the way the
# multi-host path is run and tested without a cluster.
#   launch/multiprocess.sh N CONFIG WORKDIR [--config.x=y ...]
# Each process sees its local devices (1 CPU device, unless XLA_FLAGS says
# --xla_force_host_platform_device_count=K). Process 0 prints to this terminal; process i > 0
# writes WORKDIR/logs/process_<i>.log. If one process fails, the others are stopped. The exit
# status is the first non-zero one (75: preempted after a checkpoint; rerun to resume).
# PORT picks the coordinator port (default: a free one); PYTHON the interpreter.
set -euo pipefail
usage='usage: launch/multiprocess.sh N CONFIG WORKDIR [overrides...]'
N=${1:?$usage}
CONFIG=${2:?$usage}
WORKDIR=${3:?$usage}
shift 3
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "error: N=$N is not a positive integer" >&2; exit 2; }
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$WORKDIR/logs"

pids=()
stop_all() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
# A signal to this script goes to every process (each saves the same step and exits 75).
trap 'stop_all' TERM INT USR1

for ((i = 0; i < N; i++)); do
  cmd=("$PYTHON" -m experiments.train --config="$CONFIG" --workdir="$WORKDIR"
       --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" --process_id="$i" "$@")
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"$WORKDIR/logs/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

status=0
live=("${pids[@]}")
while ((${#live[@]} > 0)); do
  done_pid=''
  rc=0
  wait -n -p done_pid "${live[@]}" || rc=$?
  [[ -n $done_pid ]] || continue          # a signal to this script interrupted the wait
  rest=()
  for p in "${live[@]}"; do [[ $p == "$done_pid" ]] || rest+=("$p"); done
  live=("${rest[@]}")
  if ((rc != 0 && status == 0)); then
    status=$rc
    # The others would block in a collective without it: give them a moment, then stop them.
    sleep 2
    stop_all
  fi
done
exit "$status"
