#!/usr/bin/env bash
# Runs one sdtl_jax experiment on every worker of a Cloud TPU VM pod (like big_vision's
# run_tpu.sh): copies this checkout's HEAD commit (git archive: committed files only, no venv or
# runs) to each worker, installs it with the TPU extra, and starts
# the same command everywhere with SDTL_MULTIHOST=1 (jax.distributed finds the pod by itself).
#
#   launch/tpu_pod.sh [--dry_run] [--create=ACCELERATOR_TYPE [--version=RUNTIME] [--spot]]
#       [--delete] NAME ZONE CONFIG WORKDIR [more main.py flags ...]
#   launch/tpu_pod.sh --create=v4-32 --delete my-v4-32 us-central2-b \
#       configs/synth_to_real.py:num_frozen=16 gs://$BUCKET/sdtl/s2r_16
#
# --create makes the TPU VM first (gcloud compute tpus tpu-vm create); --version defaults to the
# runtime Google lists for the accelerator's generation (v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5,
# v5e: v2-alpha-tpuv5-lite, v4 and older: tpu-ubuntu2204-base); --spot asks for spot capacity.
# --delete deletes the TPU VM when the script exits, whether the run succeeded or failed (with
# --create, only once the create succeeded: a name clash never deletes someone else's VM).
# WORKDIR must be storage every worker sees (gs://...): Orbax writes one checkpoint from all
# hosts, and a re-run (e.g. after a spot preemption) resumes from it. --dry_run prints the
# commands instead of running them.
set -euo pipefail
dry_run=0 accelerator= version= spot=0 delete=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1; shift ;;
    --create=*) accelerator=${1#--create=}; shift ;;
    --version=*) version=${1#--version=}; shift ;;
    --spot) spot=1; shift ;;
    --delete) delete=1; shift ;;
    -*) echo "unknown option '$1' (options go before NAME)" >&2; sed -n '7,8p' "$0" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 4 ]; then
  sed -n '7,8p' "$0" >&2
  exit 2
fi
name=$1 zone=$2 config=$3 workdir=$4
shift 4
case "$workdir" in
  gs://*) ;;
  *) echo "WORKDIR '$workdir' must be on storage every worker sees, e.g. gs://BUCKET/run" >&2
     exit 2 ;;
esac
if [ -z "$accelerator" ] && { [ -n "$version" ] || [ "$spot" = 1 ]; }; then
  echo "--version and --spot only apply with --create=ACCELERATOR_TYPE" >&2
  exit 2
fi
if [ -n "$accelerator" ] && [ -z "$version" ]; then
  case "$accelerator" in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi
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
delete_vm() {
  local status=$?
  trap - EXIT
  run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet \
    || echo "could not delete TPU VM $name; delete it by hand: gcloud compute tpus tpu-vm" \
            "delete $name --zone=$zone" >&2
  exit "$status"
}
if [ -n "$accelerator" ]; then
  create=(gcloud compute tpus tpu-vm create "$name" --zone="$zone"
          --accelerator-type="$accelerator" --version="$version")
  [ "$spot" = 1 ] && create+=(--spot)
  run "${create[@]}"
fi
[ "$delete" = 1 ] && trap delete_vm EXIT
run git -C "$root" archive --format=tar.gz -o "$tarball" HEAD
run gcloud compute tpus tpu-vm scp --worker=all --zone="$zone" "$tarball" "$name:~/sdtl_jax.tar.gz"
run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$remote"
