#!/usr/bin/env bash
# Generates a synthetic dataset with one worker process per GPU of this host
# (python -m sdtl_jax.datasets.generate), each on its own share of the shards. For several hosts, run it
# on every host with the same OUTDIR on shared storage and SDTL_NUM_HOSTS / SDTL_HOST_INDEX set
# (or use launch/generate_slurm.sh). The last worker to finish writes meta.json and the summary.
#
#   launch/generate_multi_gpu.sh [--dry_run] [--gpus=N] CONFIG OUTDIR [more generate flags ...]
#   launch/generate_multi_gpu.sh configs/generate/imagenet100_sd14.py /data/imagenet100_synth
#   CUDA_VISIBLE_DEVICES=2,3 launch/generate_multi_gpu.sh configs/generate/pets_sdxl.py /data/p
#
# --gpus=N uses N GPUs of this host (default: all), as in every launcher: the first N of
# CUDA_VISIBLE_DEVICES when it is set (so it picks which GPUs), else of those nvidia-smi lists;
# every host must use the same N. Logs: OUTDIR/logs/worker-NNN.log. Runs with the repository's
# .venv (PYTHON overrides). Re-running the same command resumes. --dry_run prints the commands
# instead of running them; -h, --help prints this help.
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }
synopsis() { usage | sed -n '6,7p' >&2; echo "(--help for more)" >&2; }
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
config=$1 outdir=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=launch/common.bash
source "$root/launch/common.bash"
python=$(repo_python "$root")
gpu_list=$(use_gpus "$gpus")
read -ra devices <<<"$gpu_list"
if [ "${#devices[@]}" = 0 ]; then
  echo "no GPU found (CUDA_VISIBLE_DEVICES is not set and nvidia-smi lists none); pass --gpus=N" >&2
  exit 2
fi
num_gpus=${#devices[@]}
hosts=${SDTL_NUM_HOSTS:-1} host=${SDTL_HOST_INDEX:-0}
workers=$((hosts * num_gpus))
if [ "$dry_run" = 1 ]; then echo "mkdir -p $outdir/logs"; else mkdir -p "$outdir/logs"; fi
pids=()
for ((gpu = 0; gpu < num_gpus; gpu++)); do
  index=$((host * num_gpus + gpu))
  log=$(printf '%s/logs/worker-%03d.log' "$outdir" "$index")
  cmd="CUDA_VISIBLE_DEVICES=${devices[gpu]} $(printf '%q' "$python") -m sdtl_jax.datasets.generate"
  cmd+=" --config=$config"
  cmd+=" --outdir=$outdir --num_workers=$workers --worker_index=$index $* > $log 2>&1"
  if [ "$dry_run" = 1 ]; then echo "$cmd &"; else eval "$cmd &"; pids+=($!); fi
done
[ "$dry_run" = 1 ] && { echo wait; exit 0; }
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" = 0 ] || echo "a worker failed; see $outdir/logs/ (re-run the same command to resume)" >&2
exit "$status"
