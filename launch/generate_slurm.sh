#!/usr/bin/env bash
# Submits a synthetic-data generation to SLURM: --nodes hosts x --gpus tasks, one GPU per task.
# Each task is one worker of python -m sdtl_jax.datasets.generate, which reads its share of the shards
# from SLURM_NTASKS / SLURM_PROCID. OUTDIR must be storage every node sees. The last worker to
# finish writes meta.json and the summary; resubmitting the same job resumes.
#
#   launch/generate_slurm.sh [--dry_run] [--nodes=N] --gpus=N CONFIG OUTDIR [generate flags ...]
#   launch/generate_slurm.sh --nodes=2 --gpus=8 configs/generate/imagenet100_sd14.py /shared/synth
#
# --gpus=N is the GPUs per node, as in every launcher (required: this host cannot see the
# nodes'); --nodes defaults to 1. Runs with the repository's .venv (PYTHON overrides), which
# every node must see at the same path. SBATCH_ARGS adds sbatch options (e.g.
# SBATCH_ARGS="--partition=gpu --time=4:00:00"). --dry_run prints the sbatch command and the
# batch script instead of submitting; -h, --help prints this help.
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }
synopsis() { usage | sed -n '6,7p' >&2; echo "(--help for more)" >&2; }
dry_run=0 nodes=1 gpus=
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry_run) dry_run=1; shift ;;
    --nodes=*) nodes=${1#--nodes=}; shift ;;
    --gpus=*) gpus=${1#--gpus=}; shift ;;
    -*) echo "unknown option '$1' (options go before CONFIG)" >&2; synopsis; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ] || [ -z "$gpus" ]; then
  [ $# -ge 2 ] && echo "--gpus=N (GPUs per node) is required" >&2
  synopsis
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=launch/common.bash
source "$root/launch/common.bash"
check_gpu_count "$gpus" || exit 2
[[ $nodes =~ ^[1-9][0-9]*$ ]] || { echo "--nodes=$nodes: expected a positive integer" >&2; exit 2; }
config=$1 outdir=$2
shift 2
python=$(repo_python "$root")
script="#!/usr/bin/env bash
#SBATCH --job-name=sdtl-generate
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus
#SBATCH --gpus-per-task=1
#SBATCH --output=$outdir/logs/slurm-%j-%t.log
set -euo pipefail
cd $root
srun --kill-on-bad-exit=0 $python -m sdtl_jax.datasets.generate --config=$config --outdir=$outdir $*"
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
