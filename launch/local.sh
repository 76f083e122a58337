#!/usr/bin/env bash
# One process on this machine (all its local devices).
#   launch/local.sh configs/digits.py runs/digits [--config.train.num_steps=200 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
WORKDIR=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m experiments.train --config="$CONFIG" --workdir="$WORKDIR" "$@"
