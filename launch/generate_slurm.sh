#!/usr/bin/env bash
# Submits a synthetic-data generation to SLURM: NODES hosts x GPUS tasks, one GPU per task.
# Each task is one worker of python -m sdtl_jax.generate, which reads its share of the shards
# from SLURM_NTASKS / SLURM_PROCID. OUTDIR must be storage every node sees. The last worker to
# finish writes meta.json and the summary; resubmitting the same job resumes.
#
#   launch/generate_slurm.sh [--dry_run] NODES GPUS CONFIG OUTDIR [more generate flags ...]
#   launch/generate_slurm.sh 2 8 configs/generate/imagenet100_sd14.py /shared/imagenet100_synth
#
# SBATCH_ARGS adds sbatch options (e.g. SBATCH_ARGS="--partition=gpu --time=4:00:00").
# --dry_run prints the sbatch command and the batch script instead of submitting.
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry_run" ]; then dry_run=1; shift; fi
if [ $# -lt 4 ]; then
  sed -n '7,8p' "$0" >&2
  exit 2
fi
nodes=$1 gpus=$2 config=$3 outdir=$4
shift 4
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
script="#!/usr/bin/env bash
#SBATCH --job-name=sdtl-generate
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus
#SBATCH --gpus-per-task=1
#SBATCH --output=$outdir/logs/slurm-%j-%t.log
set -euo pipefail
cd $root
srun --kill-on-bad-exit=0 $python -m sdtl_jax.generate --config=$config --outdir=$outdir $*"
submit="sbatch ${SBATCH_ARGS:-}"
if [ "$dry_run" = 1 ]; then
  echo "mkdir -p $outdir/logs"
  echo "$submit <<'SCRIPT'"
  echo "$script"
  echo "SCRIPT"
  exit 0
fi
mkdir -p "$outdir/logs"
echo "$script" | $submit
