#!/usr/bin/env bash
# Generates a synthetic dataset with one worker process per GPU of this host
# (python -m sdtl_jax.generate), each on its own share of the shards. For several hosts, run it
# on every host with the same OUTDIR on shared storage and SDTL_NUM_HOSTS / SDTL_HOST_INDEX set
# (or use launch/generate_slurm.sh). The last worker to finish writes meta.json and the summary.
#
#   launch/generate_multi_gpu.sh [--dry_run] [--gpus=N] CONFIG OUTDIR [more generate flags ...]
#   launch/generate_multi_gpu.sh configs/generate/imagenet100_sd14.py /data/imagenet100_synth
#
# --gpus defaults to the GPUs nvidia-smi lists. Logs: OUTDIR/logs/worker-NNN.log. Re-running the
# same command resumes. --dry_run prints the commands instead of running them.
set -euo pipefail
dry_run=0 gpus=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1; shift ;;
    --gpus=*) gpus=${1#--gpus=}; shift ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then
  sed -n '7,8p' "$0" >&2
  exit 2
fi
config=$1 outdir=$2
shift 2
if [ -z "$gpus" ]; then
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
  [ "$gpus" -ge 1 ] 2>/dev/null || { echo "no GPU found by nvidia-smi; pass --gpus=N" >&2; exit 2; }
fi
hosts=${SDTL_NUM_HOSTS:-1} host=${SDTL_HOST_INDEX:-0}
workers=$((hosts * gpus))
python=${PYTHON:-python}
if [ "$dry_run" = 1 ]; then echo "mkdir -p $outdir/logs"; else mkdir -p "$outdir/logs"; fi
pids=()
for ((gpu = 0; gpu < gpus; gpu++)); do
  index=$((host * gpus + gpu))
  log=$(printf '%s/logs/worker-%03d.log' "$outdir" "$index")
  cmd="CUDA_VISIBLE_DEVICES=$gpu $python -m sdtl_jax.generate --config=$config"
  cmd+=" --outdir=$outdir --num_workers=$workers --worker_index=$index $* > $log 2>&1"
  if [ "$dry_run" = 1 ]; then echo "$cmd &"; else eval "$cmd &"; pids+=($!); fi
done
[ "$dry_run" = 1 ] && { echo wait; exit 0; }
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" = 0 ] || echo "a worker failed; see $outdir/logs/ (re-run the same command to resume)" >&2
exit "$status"
