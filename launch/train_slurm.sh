#!/usr/bin/env bash
# Submits one sdtl_jax experiment or study to a SLURM GPU cluster: --nodes hosts, one task per
# node that sees the node's --gpus GPUs, joined by jax.distributed (SDTL_MULTIHOST=1). Task 0's
# node is the coordinator (JAX_COORDINATOR_ADDRESS = first host of the job's node list); each
# task gets SDTL_NUM_PROCESSES=$SLURM_NTASKS and SDTL_PROCESS_ID=$SLURM_PROCID.
#
#   launch/train_slurm.sh [--dry_run [--nodelist=LIST]] [--port=P] [--nodes=N] --gpus=N \
#       CONFIG WORKDIR [more main.py flags ...]
#   launch/train_slurm.sh --nodes=2 --gpus=8 configs/study/layers.py /shared/sdtl/layers
#
# --gpus=N is the GPUs per node, as in every launcher (required: this host cannot see the
# nodes'); --nodes defaults to 1. Runs with the repository's .venv (PYTHON overrides), which
# every node must see at the same path. WORKDIR must be storage every node sees (a shared
# filesystem or gs://): Orbax writes one checkpoint from all processes; resubmitting the same
# job resumes. The job's log goes to WORKDIR/logs (the submit directory for gs://). --port
# defaults to the one JAX's own SLURM detection derives from the job id (61440 + id % 4096), so
# jobs sharing a node do not clash. SBATCH_ARGS adds sbatch options (e.g.
# SBATCH_ARGS="--partition=gpu --time=24:00:00").
# --dry_run prints the sbatch command, the batch script and what each task would run for
# --nodelist (SLURM syntax, e.g. node[01-02] or a,b; default node[01-N]; no scontrol needed)
# and SLURM_JOB_ID (default 1), instead of submitting; -h, --help prints this help.
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }
synopsis() { usage | sed -n '6,7p' >&2; echo "(--help for more)" >&2; }
dry_run=0 nodelist= port= nodes=1 gpus=
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry_run) dry_run=1; shift ;;
    --nodelist=*) nodelist=${1#--nodelist=}; shift ;;
    --port=*) port=${1#--port=}; shift ;;
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
config=$1 workdir=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=launch/common.bash
source "$root/launch/common.bash"
check_gpu_count "$gpus" || exit 2
for n in "$nodes" ${port:+"$port"}; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "--nodes and --port must be positive integers, not '$n'" >&2; exit 2; }
done
case "$workdir" in
  gs://*|/*) ;;
  *) echo "WORKDIR '$workdir' must be an absolute path on a filesystem every node sees, or gs://" >&2
     exit 2 ;;
esac

# Hosts of a SLURM node list without scontrol (for the dry run): node[01-03,07],login1.
expand_nodelist() {
  local list=$1 item=() items=() depth=0 ch i
  for ((i = 0; i < ${#list}; i++)); do
    ch=${list:i:1}
    case "$ch" in '[') depth=1 ;; ']') depth=0 ;; esac
    if [ "$ch" = , ] && [ "$depth" = 0 ]; then items+=("${item[*]:-}"); item=(); else item+=("$ch"); fi
  done
  items+=("${item[*]:-}")
  local entry prefix suffix range lo hi n
  for entry in "${items[@]}"; do
    entry=${entry// /}
    if [[ $entry =~ ^([^][]*)\[([^]]*)\](.*)$ ]]; then
      prefix=${BASH_REMATCH[1]} suffix=${BASH_REMATCH[3]}
      IFS=, read -ra ranges <<<"${BASH_REMATCH[2]}"
      for range in "${ranges[@]}"; do
        lo=${range%-*} hi=${range#*-}
        for ((n = 10#$lo; n <= 10#$hi; n++)); do printf '%s%0*d%s\n' "$prefix" "${#lo}" "$n" "$suffix"; done
      done
    elif [ -n "$entry" ]; then
      echo "$entry"
    fi
  done
}

python=$(repo_python "$root")
main=$(printf '%q ' "$python" -m sdtl_jax.main "--config=$config" "--workdir=$workdir" "$@")
main=${main% }
case "$workdir" in
  gs://*) logdir= ;;
  *) logdir=$workdir/logs ;;
esac
script="#!/usr/bin/env bash
#SBATCH --job-name=sdtl-train
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus${logdir:+
#SBATCH --output=$logdir/slurm-%j.log}
set -euo pipefail
cd $(printf '%q' "$root")
# (no '| head': under pipefail, scontrol's SIGPIPE would fail the job)
mapfile -t hosts < <(scontrol show hostnames \"\$SLURM_JOB_NODELIST\")
export JAX_COORDINATOR_ADDRESS=\${hosts[0]}:${port:-\$((61440 + SLURM_JOB_ID % 4096))}
export SDTL_MULTIHOST=1 SDTL_NUM_PROCESSES=\$SLURM_NTASKS
# SLURM_PROCID differs per task, so it is read inside each task, not here.
srun --label --kill-on-bad-exit=1 bash -c 'export SDTL_PROCESS_ID=\$SLURM_PROCID; exec \"\$@\"' task \\
  $main"
submit="sbatch ${SBATCH_ARGS:-}"
submit=${submit% }
if [ "$dry_run" = 1 ]; then
  mapfile -t hosts < <(expand_nodelist "${nodelist:-node[01-$(printf '%02d' "$nodes")]}")
  if [ "${#hosts[@]}" != "$nodes" ]; then
    echo "--nodelist=$nodelist has ${#hosts[@]} hosts, not --nodes=$nodes" >&2
    exit 2
  fi
  job=${SLURM_JOB_ID:-1}
  coordinator=${hosts[0]}:${port:-$((61440 + job % 4096))}
  [ -n "$logdir" ] && echo "mkdir -p $logdir"
  echo "$submit <<'SCRIPT'"
  echo "$script"
  echo "SCRIPT"
  echo "# job $job on ${hosts[*]}: what each task runs"
  for ((task = 0; task < nodes; task++)); do
    echo "# task $task on ${hosts[task]}:"
    echo "JAX_COORDINATOR_ADDRESS=$coordinator SDTL_MULTIHOST=1 SDTL_NUM_PROCESSES=$nodes" \
         "SDTL_PROCESS_ID=$task $main"
  done
  exit 0
fi
[ -n "$logdir" ] && mkdir -p "$logdir"
echo "$script" | $submit
