#!/usr/bin/env bash
# Runs one sdtl_jax experiment or study on the GPUs of this host: a single process sees all of
# them and JAX shards each batch over the local devices (data parallelism, no jax.distributed).
#
#   launch/train_multi_gpu.sh [--dry_run] [--gpus=N] CONFIG WORKDIR [more main.py flags ...]
#   launch/train_multi_gpu.sh --gpus=2 configs/study/layers.py:data=pets runs/layers_pets
#   CUDA_VISIBLE_DEVICES=4,5,6,7 launch/train_multi_gpu.sh configs/baseline.py runs/baseline
#
# --gpus=N uses N GPUs of this host (default: all), as in every launcher: the first N of
# CUDA_VISIBLE_DEVICES when it is set (so it picks which GPUs), else GPUs 0..N-1.
# config.global_batch must divide by their number (config_check.validate says so at startup). JAX
# reserves 75% of each GPU's memory up front; XLA_PYTHON_CLIENT_MEM_FRACTION=.9 in the
# environment gives it more (for larger batches), or XLA_PYTHON_CLIENT_PREALLOCATE=false makes it
# allocate as it goes (sharing a GPU). Runs with the repository's .venv (PYTHON overrides; GPU
# hosts: SDTL_TORCH=cuda bash scripts/setup.sh). Re-running the same command
# resumes. --dry_run prints the command instead; -h, --help prints this help.
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }
synopsis() { usage | sed -n '4,5p' >&2; echo "(--help for more)" >&2; }
dry_run=0 gpus=
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry_run) dry_run=1; shift ;;
    --gpus=*) gpus=${1#--gpus=}; shift ;;
    -*) echo "unknown option '$1' (options go before CONFIG)" >&2; synopsis; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then
  synopsis
  exit 2
fi
config=$1 workdir=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=launch/common.bash
source "$root/launch/common.bash"
python=$(repo_python "$root")
gpu_list=$(use_gpus "$gpus")
visible=${gpu_list// /,}
# Without --gpus, CUDA_VISIBLE_DEVICES (or its absence: every GPU) stays as it is.
[ -z "$gpus" ] && visible=${CUDA_VISIBLE_DEVICES:-}
cmd=("$python" -m sdtl_jax.main "--config=$config" "--workdir=$workdir" "$@")
if [ "$dry_run" = 1 ]; then
  [ -n "$visible" ] && printf 'CUDA_VISIBLE_DEVICES=%s ' "$visible"
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
[ -n "$visible" ] && export CUDA_VISIBLE_DEVICES=$visible
exec "${cmd[@]}"
