#!/usr/bin/env bash
# Runs one sdtl_jax experiment on every worker of a Cloud TPU VM pod (like big_vision's
# run_tpu.sh): copies this checkout's HEAD commit (git archive: committed files only, no venv or
# runs) to each worker, installs it with the TPU extra, and starts
# the same command everywhere with SDTL_MULTIHOST=1 (jax.distributed finds the pod by itself).
#
#   launch/tpu_pod.sh [--dry_run] NAME ZONE CONFIG WORKDIR [more main.py flags ...]
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/synth_to_real.py:num_frozen=16 \
#       gs://$BUCKET/sdtl/s2r_16 --config.data.data_dir=gs://$BUCKET/data
#
# WORKDIR must be storage every worker sees (gs://...): Orbax writes one checkpoint from all
# hosts. --dry_run prints the commands instead of running them.
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry_run" ]; then dry_run=1; shift; fi
if [ $# -lt 4 ]; then
  sed -n '6,7p' "$0" >&2
  exit 2
fi
name=$1 zone=$2 config=$3 workdir=$4
shift 4
case "$workdir" in
  gs://*) ;;
  *) echo "WORKDIR '$workdir' must be on storage every worker sees, e.g. gs://BUCKET/run" >&2
     exit 2 ;;
esac
root=$(cd "$(dirname "$0")/.." && pwd)
tarball=${TMPDIR:-/tmp}/sdtl_jax_$(git -C "$root" rev-parse --short HEAD).tar.gz
remote="mkdir -p ~/sdtl_jax && tar -xzf ~/sdtl_jax.tar.gz -C ~/sdtl_jax && cd ~/sdtl_jax"
remote+=" && SDTL_TORCH=0 SDTL_EXTRAS=tpu bash scripts/setup.sh"
remote+=" && SDTL_MULTIHOST=1 .venv/bin/python -m sdtl_jax.main"
remote+=" --config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir")"
for flag in "$@"; do remote+=" $(printf '%q' "$flag")"; done

run() {
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
run git -C "$root" archive --format=tar.gz -o "$tarball" HEAD
run gcloud compute tpus tpu-vm scp --worker=all --zone="$zone" "$tarball" "$name:~/sdtl_jax.tar.gz"
run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$remote"
