#!/usr/bin/env bash
# A sweep as one SLURM job array: each run of SWEEP_FILE becomes an array task of
# launch/slurm/train.sbatch (same config, its own overrides and work dir ROOT/NAME).
#
#   launch/slurm/sweep.sh SWEEP_FILE CONFIG ROOT [sbatch options ...]
#
# SWEEP_FILE has one run per line, `NAME --config.x=y ...`; blank lines and `#` comments are
# skipped. With CONFIG '-', each line names its own `--config=...` (the form that
# `experiments.ablate_objectives --emit_sweep` writes). Example (runs/sweep.txt):
#   eps   --config.objective.name=ddpm_eps
#   v     --config.objective.name=v_prediction
#   flow  --config.objective.name=flow_matching --config.process.name=linear
# A finished run's work dir makes its task skip straight to evaluation, so resubmitting a sweep
# only trains what is missing. DRY_RUN=1 prints the sbatch command and each task's srun command.
set -euo pipefail
usage='usage: launch/slurm/sweep.sh SWEEP_FILE CONFIG ROOT [sbatch options...]'
SWEEP_FILE=${1:?$usage}
CONFIG=${2:?$usage}
ROOT=${3:?$usage}
shift 3
cd "$(dirname "$0")/../.."
[[ -r $SWEEP_FILE ]] || { echo "error: cannot read the sweep file $SWEEP_FILE" >&2; exit 2; }
SWEEP_FILE=$(realpath "$SWEEP_FILE")
runs=$(grep -c -v -E '^[[:space:]]*(#|$)' "$SWEEP_FILE" || true)
((runs > 0)) || { echo "error: $SWEEP_FILE lists no runs" >&2; exit 2; }
names=$(grep -v -E '^[[:space:]]*(#|$)' "$SWEEP_FILE" | awk '{print $1}' | sort | uniq -d)
[[ -z $names ]] || { echo "error: $SWEEP_FILE repeats run names: $names" >&2; exit 2; }

cmd=(sbatch --array="0-$((runs - 1))" --job-name="sweep-$(basename "$SWEEP_FILE" .txt)"
     --export="ALL,SWEEP_FILE=$SWEEP_FILE,DJ_ROOT=$PWD" "$@"
     launch/slurm/train.sbatch "$CONFIG" "$ROOT")
if [[ -n ${DRY_RUN:-} ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  for ((i = 0; i < runs; i++)); do
    task=$(SWEEP_FILE=$SWEEP_FILE SLURM_ARRAY_TASK_ID=$i DJ_ROOT=$PWD \
           bash launch/slurm/train.sbatch "$CONFIG" "$ROOT")
    echo "${task%%$'\n'*}"          # its srun line
  done
  exit 0
fi
"${cmd[@]}"
