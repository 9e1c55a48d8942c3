#!/usr/bin/env bash
# Runs one sdtl_jax experiment on every worker of a Cloud TPU VM or pod slice.
#
# Usage:
#   launch/tpu_pod.sh [options] NAME ZONE CONFIG WORKDIR [main.py flags ...]
#   launch/tpu_pod.sh [--project=ID] [--queued] [--delete] [--log_file=PATH] --logs NAME ZONE
#
# Copies this checkout's HEAD (committed files only) to every worker, sets it up there with
# launch/tpu_worker.sh (a Python >= 3.11 and python3-venv where the image lacks them, the `tpu`
# extra, no torch, in ~/sdtl_jax/.venv), and starts `python -m sdtl_jax.main --config=CONFIG
# --workdir=WORKDIR` on all workers with SDTL_MULTIHOST=1, detached: the run goes on if the SSH
# connection drops. The launcher then follows worker 0's log into a local file until the run
# ends, and exits with the run's exit status. Each worker's log is also copied to
# WORKDIR/logs/worker-<i>.log every 5 minutes and at the end. WORKDIR must be on gs://: every
# worker writes to it, and re-running the same command resumes from its last checkpoint.
#
#   --project=ID       the Google Cloud project of every gcloud call (default: gcloud's)
#   --create=TYPE      create the TPU VM first, e.g. --create=v6e-8, v5litepod-16, v4-32
#   --queued           with --create: request it as queued resource NAME and wait until it is
#                      ACTIVE (FAILED or SUSPENDED stops); with --delete: delete queued resource
#                      NAME (and its VM) instead of the VM
#   --version=RUNTIME  the TPU software version for --create (default, by generation: v6e
#                      v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, else
#                      tpu-ubuntu2204-base)
#   --spot             spot capacity (with --create)
#   --delete           delete the VM (or queued resource) at the end: after the run has ended
#                      (followed to its end, or the VM was preempted), or when the launch fails
#                      before the run starts; never while the run may still be going. If the
#                      launcher stops following early, it prints the --logs --delete command
#                      that follows the run to its end and then deletes.
#   --detach           start the run and return (not with --delete); follow it with --logs
#   --logs             follow the run on NAME from the start of worker 0's log until it ends
#   --log_file=PATH    the local copy of worker 0's log (default runs/tpu_logs/NAME.log)
#   --poll=SECONDS     how often --queued checks the request, and how long to wait before
#                      reconnecting to worker 0 after a dropped connection (default 30)
#   --dry_run          print the commands instead of running them
#   -h, --help         print this help
#
# Example: a spot v6e-8 through the queue, deleted once the run ends:
#   launch/tpu_pod.sh --project=my-project --queued --spot --create=v6e-8 --delete \
#       my-v6e us-east5-b configs/synth_to_real.py:num_frozen=16 gs://$BUCKET/sdtl/s2r_16
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }
synopsis() { usage | sed -n '/^Usage:/,/^$/p' >&2; echo "(--help: the options)" >&2; }
dry_run=0 project= accelerator= version= spot=0 queued=0 delete=0 detach=0 logs=0 log_file=
poll=30
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry_run) dry_run=1; shift ;;
    --project=?*) project=${1#--project=}; shift ;;
    --create=?*) accelerator=${1#--create=}; shift ;;
    --version=?*) version=${1#--version=}; shift ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --delete) delete=1; shift ;;
    --detach) detach=1; shift ;;
    --logs) logs=1; shift ;;
    --log_file=?*) log_file=${1#--log_file=}; shift ;;
    --poll=?*) poll=${1#--poll=}; shift ;;
    -*) echo "unknown option '$1' (options go before NAME)" >&2; synopsis; exit 2 ;;
    *) break ;;
  esac
done
fail() { echo "$*" >&2; exit 2; }
if [ "$logs" = 1 ]; then
  [ $# -eq 2 ] || { synopsis; exit 2; }
  [ -z "$accelerator$version" ] && [ "$spot$detach" = 00 ] \
    || fail "--logs follows a run already started: --create, --version, --spot and --detach" \
            "do not apply"
else
  [ $# -ge 4 ] || { synopsis; exit 2; }
fi
name=$1 zone=$2
if [ "$logs" = 0 ]; then
  config=$3 workdir=$4
  shift 4
  case "$workdir" in
    gs://*) ;;
    *) fail "WORKDIR '$workdir' must be on storage every worker sees, e.g. gs://BUCKET/run" ;;
  esac
fi
if [ -z "$accelerator" ] && { [ -n "$version" ] || [ "$spot" = 1 ]; }; then
  fail "--version and --spot only apply with --create=ACCELERATOR_TYPE"
fi
[ "$queued" = 0 ] || [ -n "$accelerator" ] || [ "$delete" = 1 ] \
  || fail "--queued needs --create=ACCELERATOR_TYPE (to request the TPU) or --delete (to delete it)"
[ "$detach" = 0 ] || [ "$delete" = 0 ] \
  || fail "--delete waits for the run to end and --detach does not: drop one (later," \
          "--logs --delete follows the run to its end, then deletes)"
[[ "$poll" =~ ^[0-9]+$ ]] || fail "--poll=$poll: a number of seconds"
if [ -n "$accelerator" ] && [ -z "$version" ]; then
  case "$accelerator" in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi
root=$(cd "$(dirname "$0")/.." && pwd)
log_file=${log_file:-$root/runs/tpu_logs/$name.log}
what="TPU VM $name"
[ "$queued" = 1 ] && what="queued resource $name"
# What the options say about the TPU, for the commands this script suggests.
again="$0${project:+ --project=$project}"
[ "$queued" = 1 ] && again+=" --queued"

# One word as a shell reads it: quoted only where it needs to be, a flag's value after its `=`.
q() {
  local s=$1 quoted="'${1//\'/\'\\\'\'}'"
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}$(q "${BASH_REMATCH[2]}")"
  else printf '%s' "$quoted"; fi
}
run() {
  if [ "$dry_run" = 1 ]; then
    local line= word
    for word in "$@"; do line+="${line:+ }$(q "$word")"; done
    echo "$line"
  else
    "$@"
  fi
}
gcloud_() { run gcloud "$@" ${project:+"--project=$project"}; }
ssh_() {   # ssh_ WORKER COMMAND
  gcloud_ compute tpus tpu-vm ssh "$name" --zone="$zone" --worker="$1" --command="$2"
}
duration() {
  local s=$1
  if [ "$s" -ge 3600 ]; then printf '%dh%02dm' $((s / 3600)) $((s % 3600 / 60))
  else printf '%dm%02ds' $((s / 60)) $((s % 60)); fi
}

# --- the end of the script: say what goes on, delete what --delete asked for -----------------
live=0      # a run may be going on the TPU: started here, found going, or being followed
ended=0     # ... and it is known to have ended (followed to its end, or the VM is gone)
on_exit() {
  local status=$?
  trap - EXIT
  if [ "$live" = 1 ] && [ "$ended" = 0 ]; then
    local follow=$again
    [ "$delete" = 1 ] && follow+=" --delete"
    echo "The run may still be going on $name; follow it: $follow --logs $name $zone" >&2
    [ "$delete" = 1 ] && echo "(not deleting $what while its run may be going)" >&2
    exit "$status"
  fi
  if [ "$delete" = 1 ]; then
    if [ "$queued" = 1 ]; then
      gcloud_ compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet \
        || echo "could not delete $what; by hand: gcloud compute tpus queued-resources delete" \
                "$name --zone=$zone --force" >&2
    else
      gcloud_ compute tpus tpu-vm delete "$name" --zone="$zone" --quiet \
        || echo "could not delete $what; by hand: gcloud compute tpus tpu-vm delete $name" \
                "--zone=$zone" >&2
    fi
  elif [ "$queued" = 1 ] && [ -n "$accelerator" ] && [ "$status" != 0 ]; then
    echo "Queued resource $name stays until deleted: gcloud compute tpus queued-resources" \
         "delete $name --zone=$zone --force" >&2
  fi
  exit "$status"
}
trap 'exit 130' INT
trap 'exit 129' HUP
trap 'exit 143' TERM

# The VM's state when it cannot run anything any more (preempted, stopped, gone), else nothing.
vm_gone() {
  local state
  state=$(gcloud compute tpus tpu-vm describe "$name" --zone="$zone" --format='value(state)' \
            ${project:+"--project=$project"} 2>&1) || true
  case "$state" in
    PREEMPTED|TERMINATED|STOPPED|STOPPING) echo "$state" ;;
    *NOT_FOUND*) echo "deleted" ;;
  esac
}

# Follows worker 0's log into $log_file until the run ends; sets ended and run_status. After a
# dropped connection it reconnects (up to 5 times, $poll seconds apart) where the VM is still up.
run_status=1
follow() {
  local command="bash ~/sdtl_worker.sh follow"
  if [ "$dry_run" = 1 ]; then
    echo "$(ssh_ 0 "$command") | tee $(q "$log_file")"
    ended=1 run_status=0
    return
  fi
  mkdir -p "$(dirname "$log_file")"
  : > "$log_file"
  local tries=0 from=1 last gone
  while :; do
    ssh_ 0 "$command $from" | tee -a "$log_file" || true
    last=$(tail -n 1 "$log_file")
    case "$last" in
      "sdtl_worker: run ended, exit status "*)
        ended=1 run_status=${last##* }
        [[ $run_status =~ ^[0-9]+$ ]] || run_status=1
        return ;;
      "sdtl_worker: run ended"*|"sdtl_worker: no run"*) ended=1 run_status=1; return ;;
    esac
    gone=$(vm_gone)
    if [ -n "$gone" ]; then
      echo "Lost worker 0: TPU VM $name is $gone, so the run has stopped (it resumes from its" \
           "last checkpoint when started again)." >&2
      ended=1 run_status=1
      return
    fi
    tries=$((tries + 1))
    [ "$tries" -le 5 ] || return 0
    echo "Lost the connection to worker 0 (the run goes on); reconnecting in ${poll}s" \
         "($tries/5)" >&2
    sleep "$poll"
    from=$(($(wc -l < "$log_file") + 1))
  done
}
finish() {
  if [ "$ended" = 0 ]; then exit 1; fi     # on_exit says how to follow the run
  if [ "$dry_run" = 0 ]; then
    if [ "$run_status" = 0 ]; then
      echo "The run finished (exit status 0). Worker 0's log: $log_file" >&2
    else
      echo "The run failed (exit status $run_status): worker 0's log is $log_file; every" \
           "worker's is in ${workdir:-WORKDIR}/logs/" >&2
    fi
  fi
  exit "$run_status"
}

if [ "$logs" = 1 ]; then
  trap on_exit EXIT
  live=1
  follow
  finish
fi

# --- a TPU, from the queue or created, then the run ------------------------------------------
if [ -n "$accelerator" ]; then
  if [ "$queued" = 1 ]; then
    create=(compute tpus queued-resources create "$name" --node-id="$name" --zone="$zone"
            --accelerator-type="$accelerator" --runtime-version="$version")
  else
    create=(compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator"
            --version="$version")
  fi
  [ "$spot" = 1 ] && create+=(--spot)
  gcloud_ "${create[@]}"
fi
# Only now: with --create, a name clash never deletes someone else's TPU.
trap on_exit EXIT
if [ -n "$accelerator" ] && [ "$queued" = 1 ]; then
  describe=(compute tpus queued-resources describe "$name" --zone="$zone"
            --format='value(state.state)')
  if [ "$dry_run" = 1 ]; then
    echo "# every ${poll}s until ACTIVE (FAILED or SUSPENDED: stop):"
    gcloud_ "${describe[@]}"
  else
    start=$SECONDS failures=0
    while :; do
      if state=$(gcloud "${describe[@]}" ${project:+"--project=$project"} 2>/dev/null); then
        failures=0
      else
        state="(describe failed)" failures=$((failures + 1))
      fi
      line="$what: ${state:-?}, waited $(duration $((SECONDS - start)))"
      [ -t 2 ] && printf '\r\033[K' >&2
      case "$state" in
        ACTIVE) echo "$line" >&2; break ;;
        FAILED|SUSPENDED|SUSPENDING)
          echo "$line; see why: gcloud compute tpus queued-resources describe $name" \
               "--zone=$zone" >&2
          exit 1 ;;
      esac
      if [ "$failures" -ge 10 ]; then
        echo "$line: could not read its state 10 times in a row" >&2
        exit 1
      fi
      if [ -t 2 ]; then printf '%s' "$line" >&2; else echo "$line" >&2; fi
      sleep "$poll"
    done
  fi
fi

# One file per VM: launches for several VMs at once (one per run of a study) do not overwrite
# each other's while it is being copied.
tarball=${TMPDIR:-/tmp}/sdtl_jax_$(git -C "$root" rev-parse --short HEAD)_$name.tar.gz
run git -C "$root" archive --format=tar.gz -o "$tarball" HEAD
gcloud_ compute tpus tpu-vm scp --worker=all --zone="$zone" "$tarball" "$name:~/sdtl_jax.tar.gz"
prepare="tar -xzOf ~/sdtl_jax.tar.gz launch/tpu_worker.sh > ~/sdtl_worker.sh"
prepare+=" && bash ~/sdtl_worker.sh prepare ~/sdtl_jax.tar.gz"
if [ "$dry_run" = 1 ]; then
  ssh_ all "$prepare"
else
  output=$(mktemp)
  if ! ssh_ all "$prepare" 2>&1 | tee "$output"; then
    # A run still going there (the worker refused): never delete the TPU under it.
    grep -q 'a run is already going' "$output" && live=1
    rm -f "$output"
    echo "Setting up the workers failed (above)." >&2
    exit 1
  fi
  rm -f "$output"
fi
start="bash ~/sdtl_worker.sh start $(q "$config") $(q "$workdir")"
for flag in "$@"; do start+=" $(q "$flag")"; done
live=1
ssh_ all "$start"
if [ "$detach" = 1 ]; then
  [ "$dry_run" = 1 ] || echo "The run goes on by itself; follow it: $again --logs $name $zone" \
                             "(every worker's log: $workdir/logs/)" >&2
  live=0
  exit 0
fi
follow
finish
