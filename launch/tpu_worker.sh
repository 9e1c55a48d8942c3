#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh, run on every worker of a Cloud TPU VM (tpu_pod.sh copies
# it out of the shipped checkout to ~/sdtl_worker.sh). One subcommand per step:
#
#   prepare [TARBALL]   refuse if a run is still going here; unpack TARBALL into the checkout;
#                       set up its .venv: a Python >= 3.11 (TPU images have 3.10, often without
#                       python3-venv), jax[tpu], no torch (SDTL_APT=1 SDTL_TORCH=none
#                       SDTL_EXTRAS=tpu bash scripts/setup.sh)
#   start CONFIG WORKDIR [main.py flags ...]
#                       start `.venv/bin/python -m sdtl_jax.main` with SDTL_MULTIHOST=1 in a
#                       session of its own (setsid nohup), so that it outlives the SSH connection
#   follow [LINE]       print the run's log from LINE (default 1) until the run ends, then
#                       "sdtl_worker: run ended, exit status N"; exits N
#   stop                send the run SIGTERM (main.py saves a checkpoint and exits 143)
#
# The run's files are in ~/sdtl_run (SDTL_RUN_DIR): log, pid, and exit_status once main.py has
# exited. The log is copied to WORKDIR/logs/worker-<i>.log every SDTL_LOG_SYNC_S seconds (300)
# and at the end, with the exit status as WORKDIR/logs/worker-<i>.exit_status (i: the
# worker's number from the metadata server, or SDTL_WORKER_ID). The checkout is ~/sdtl_jax
# (SDTL_CHECKOUT). SDTL_DRY_RUN=1 prints the commands of prepare and start instead of running
# them (setup.sh prints its own).
set -euo pipefail
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
repo=${SDTL_CHECKOUT:-$HOME/sdtl_jax}
rundir=${SDTL_RUN_DIR:-$HOME/sdtl_run}
dry_run=${SDTL_DRY_RUN:-0}

say() { echo "sdtl_worker: $*"; }
run() {
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
# The pid of the run still going here, if any (a pid file left by a rebooted VM does not count).
running_pid() {
  local pid
  pid=$(cat "$rundir/pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
    && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q ' run ' && echo "$pid"
}
worker_id() {
  [ -n "${SDTL_WORKER_ID:-}" ] && { echo "$SDTL_WORKER_ID"; return; }
  curl -sf -m 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    || hostname
}
refuse_if_running() {
  local pid
  if pid=$(running_pid); then
    say "a run is already going on $(hostname) (pid $pid, log $rundir/log): let it end" \
        "(launch/tpu_pod.sh --logs NAME ZONE) or stop it (bash $self stop)" >&2
    exit 3
  fi
}

prepare() {
  refuse_if_running
  if [ -n "${1:-}" ]; then
    run mkdir -p "$repo"
    run tar -xzf "$1" -C "$repo"
  fi
  [ "$dry_run" = 1 ] && echo "SDTL_APT=1 SDTL_TORCH=none SDTL_EXTRAS=tpu bash scripts/setup.sh"
  cd "$repo"
  SDTL_APT=1 SDTL_TORCH=none SDTL_EXTRAS=tpu bash scripts/setup.sh
}

start() {
  [ $# -ge 2 ] || { echo "usage: $0 start CONFIG WORKDIR [main.py flags ...]" >&2; exit 2; }
  refuse_if_running
  run mkdir -p "$rundir"
  run rm -f "$rundir/exit_status" "$rundir/pid"
  if [ "$dry_run" = 1 ]; then
    echo "$(printf '%q ' setsid nohup bash "$self" run "$@")> $rundir/log 2>&1 < /dev/null &"
    return
  fi
  setsid nohup bash "$self" run "$@" > "$rundir/log" 2>&1 < /dev/null &
  echo "$!" > "$rundir/pid"
  say "started on $(hostname) (pid $!, log $rundir/log)"
}

# The detached run itself: main.py, the log's copies in WORKDIR/logs, the exit status.
run_main() {
  local config=$1 workdir=$2 status=0
  shift 2
  echo "$$" > "$rundir/pid"
  local dest
  dest=${workdir%/}/logs/worker-$(worker_id)
  upload() { gcloud storage cp "$@" >/dev/null 2>&1 || true; }
  (while sleep "${SDTL_LOG_SYNC_S:-300}"; do upload "$rundir/log" "$dest.log"; done) &
  local syncer=$!
  # A SIGTERM (stop, a spot VM's shutdown) reaches main.py through the process group; this shell
  # waits for main.py's exit status instead of dying first.
  trap 'say "got SIGTERM"' TERM
  say "$(date -u '+%F %T') UTC on $(hostname): main.py --config=$config --workdir=$workdir${*:+ $*}"
  cd "$repo"
  SDTL_MULTIHOST=1 .venv/bin/python -m sdtl_jax.main --config="$config" --workdir="$workdir" \
    "$@" || status=$?
  kill "$syncer" 2>/dev/null || true
  echo "$status" > "$rundir/exit_status.tmp" && mv "$rundir/exit_status.tmp" "$rundir/exit_status"
  say "$(date -u '+%F %T') UTC: main.py exited with status $status"
  upload "$rundir/log" "$dest.log"
  upload "$rundir/exit_status" "$dest.exit_status"
}

follow() {
  local from=${1:-1} pid
  exec 2>&1
  if [ ! -f "$rundir/log" ]; then
    say "no run on this worker ($rundir/log does not exist)"
    exit 1
  fi
  if pid=$(running_pid); then
    tail -n "+$from" -F --pid="$pid" "$rundir/log"
  else
    tail -n "+$from" "$rundir/log"
  fi
  if [ -f "$rundir/exit_status" ]; then
    local status
    status=$(cat "$rundir/exit_status")
    say "run ended, exit status $status"
    exit "$status"
  fi
  say "run ended without an exit status (killed, or the VM restarted)"
  exit 1
}

stop() {
  local pid
  if pid=$(running_pid); then
    kill -TERM -- "-$pid"       # setsid made the run its process group's leader
    say "sent SIGTERM to the run (pid $pid)"
  else
    say "no run going on this worker"
  fi
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  prepare) prepare "$@" ;;
  start) start "$@" ;;
  run) run_main "$@" ;;
  follow) follow "$@" ;;
  stop) stop ;;
  *) sed -n '4,14p' "$0" >&2; exit 2 ;;
esac
