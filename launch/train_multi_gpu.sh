#!/usr/bin/env bash
# Runs one sdtl_jax experiment or study on the GPUs of this host: a single process sees all of
# them and JAX shards each batch over the local devices (data parallelism, no jax.distributed).
#
#   launch/train_multi_gpu.sh [--dry_run] [--gpus=0,1,2,3] CONFIG WORKDIR [more main.py flags ...]
#   launch/train_multi_gpu.sh --gpus=0,1 configs/study/layers.py:data=pets runs/layers_pets
#
# --gpus sets CUDA_VISIBLE_DEVICES (default: every GPU); config.batch_size must divide by their
# number (config_lib.validate says so at startup). JAX reserves 75% of each GPU's memory up front;
# XLA_PYTHON_CLIENT_MEM_FRACTION=.9 in the environment gives it more (for larger batches), or
# XLA_PYTHON_CLIENT_PREALLOCATE=false makes it allocate as it goes (sharing a GPU). Runs with the
# repository's .venv (PYTHON overrides; GPU hosts: SDTL_TORCH=0 SDTL_EXTRAS=gpu bash
# scripts/setup.sh). Re-running the same command resumes. --dry_run prints the command instead.
set -euo pipefail
dry_run=0 gpus=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1; shift ;;
    --gpus=*) gpus=${1#--gpus=}; shift ;;
    -*) echo "unknown option '$1' (options go before CONFIG)" >&2; sed -n '5,6p' "$0" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then
  sed -n '5,6p' "$0" >&2
  exit 2
fi
if [ -n "$gpus" ] && ! [[ $gpus =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  echo "--gpus=$gpus: expected GPU indices such as --gpus=0,1,2,3" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
cmd=("$python" -m sdtl_jax.main "--config=$config" "--workdir=$workdir" "$@")
if [ "$dry_run" = 1 ]; then
  [ -n "$gpus" ] && printf 'CUDA_VISIBLE_DEVICES=%s ' "$gpus"
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
[ -n "$gpus" ] && export CUDA_VISIBLE_DEVICES=$gpus
exec "${cmd[@]}"
