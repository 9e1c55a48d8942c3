#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/test_study_slurm.py: munged, slurmctld and
# slurmd on localhost, 2 CPUs as 2 task slots, everything (config, key, state, logs) under DIR.
#
#   tests/slurm_cluster.sh start DIR [CTLD_PORT SLURMD_PORT]   # prints: export SLURM_CONF=...
#   tests/slurm_cluster.sh stop DIR
#
# start installs Debian's slurm-wlm and munge with apt-get when missing (as root; fails with a
# message when apt cannot reach its mirror), writes DIR/slurm.conf, starts the daemons and waits
# until the node is idle. Clients find the cluster through SLURM_CONF=DIR/slurm.conf. stop ends
# the daemons this script started (their pid files under DIR) and nothing else; DIR can then be
# deleted, and nothing outside it was changed but the installed packages.
#
# Lives under tests/, not launch/: it is test equipment (no cgroups, no accounting database, a
# throwaway munge key), not a way to run a cluster. Without slurmdbd, sacct has no data: the
# cluster writes one line per finished job to DIR/jobcomp.txt (jobcomp/filetxt) instead.
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v munged >/dev/null || missing+=(munge)
  [ "${#missing[@]}" = 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "slurm_cluster: ${missing[*]} missing and not root; install them:" \
         "sudo apt-get install -y slurm-wlm munge" >&2
    return 1
  fi
  echo "slurm_cluster: installing ${missing[*]} with apt-get" >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
         slurm-wlm munge; } >"$dir/apt.log" 2>&1; then
    echo "slurm_cluster: apt-get could not install ${missing[*]} (is the Debian mirror" \
         "reachable?); see $dir/apt.log:" >&2
    tail -5 "$dir/apt.log" >&2
    return 1
  fi
}

write_conf() {
  local ctld_port=$1 slurmd_port=$2 user
  user=$(id -un)
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  # No cgroups (containers lack them): processes are tracked through /proc, tasks not bound.
  # No accounting database: finished jobs go to a text file instead.
  cat >"$dir/slurm.conf" <<CONF
ClusterName=sdtltest
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=600
KillWait=30
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
NodeName=localhost CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
  # A key of its own: the system's /etc/munge is neither read nor changed.
  dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge.key"
  munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge.seed"
}

wait_for_idle_node() {
  local i state
  for ((i = 0; i < 60; i++)); do
    state=$(sinfo -h -N -o %T 2>/dev/null || true)
    [ "$state" = idle ] && return 0
    sleep 0.5
  done
  echo "slurm_cluster: the node did not come up (state '${state:-none}'); logs in $dir/log:" >&2
  tail -5 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  return 1
}

start() {
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  install_packages
  write_conf "${1:-6817}" "${2:-6818}"
  export SLURM_CONF=$dir/slurm.conf
  start_munge
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF" -N localhost
  wait_for_idle_node
  echo "export SLURM_CONF=$SLURM_CONF"
}

# Ends one daemon by its pid file, waiting for it to go (at most 10 s, then SIGKILL).
stop_daemon() {
  local pidfile=$1 pid i
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
}

# Cancels every job and waits (at most KillWait + 10 s) until none is left, so that no training
# process or slurmstepd outlives the cluster.
cancel_jobs() {
  local i
  scancel --quiet --user="$(id -un)" 2>/dev/null || return 0
  for ((i = 0; i < 80; i++)); do
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && return 0
    sleep 0.5
  done
}

stop() {
  export SLURM_CONF=$dir/slurm.conf
  [ -s "$dir/slurmctld.pid" ] && cancel_jobs
  stop_daemon "$dir/slurmd.pid"
  stop_daemon "$dir/slurmctld.pid"
  stop_daemon "$dir/munged.pid"
}

case "${1:-}" in
  start|stop)
    [ $# -ge 2 ] || { usage >&2; exit 2; }
    command=$1 dir=$2
    shift 2
    "$command" "$@" ;;
  -h|--help) usage ;;
  *) usage >&2; exit 2 ;;
esac
