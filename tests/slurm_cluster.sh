#!/usr/bin/env bash
# A two-node SLURM cluster on this machine, for tests/test_study_slurm.py: munged, slurmctld, and
# two slurmds as nodes n1 and n2 of one CPU each (two task slots, or one two-node job), with accounting (slurmdbd on a MariaDB of its own,
# so that sacct works); everything (config, keys, database, state, logs) under DIR.
#
#   tests/slurm_cluster.sh start DIR      # prints: export SLURM_CONF=DIR/slurm.conf
#   tests/slurm_cluster.sh stop DIR
#
# start installs Debian's slurm-wlm, slurmdbd, munge and mariadb-server with apt-get when
# missing (as root; fails with a message when apt cannot reach its mirror), writes the configs
# with free ports, starts the daemons and waits until both nodes are idle. Clients find the cluster
# through SLURM_CONF=DIR/slurm.conf. stop ends the daemons this script started (their pid files
# under DIR) and nothing else; DIR can then be deleted, and nothing outside it was changed but
# the installed packages.
#
# Lives under tests/, not launch/: it is test equipment (no cgroups, a database without
# passwords, a throwaway munge key), not a way to run a cluster.
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }

install_packages() {
  local missing=() command package
  for command in slurmctld:slurm-wlm slurmdbd:slurmdbd munged:munge mariadbd:mariadb-server; do
    command -v "${command%%:*}" >/dev/null || missing+=("${command#*:}")
  done
  [ "${#missing[@]}" = 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "slurm_cluster: ${missing[*]} missing and not root; install them:" \
         "sudo apt-get install -y ${missing[*]}" >&2
    return 1
  fi
  echo "slurm_cluster: installing ${missing[*]} with apt-get" >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
         --no-install-recommends "${missing[@]}"; } >"$dir/apt.log" 2>&1; then
    echo "slurm_cluster: apt-get could not install ${missing[*]} (is the Debian mirror" \
         "reachable?); see $dir/apt.log:" >&2
    tail -5 "$dir/apt.log" >&2
    return 1
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
  local user
  user=$(id -un)
  mkdir -p "$dir/state" "$dir/spool/n1" "$dir/spool/n2" "$dir/log"
  # No cgroups (containers lack them): processes are tracked through /proc, tasks not bound.
  # AccountingStoragePass: the munge socket for slurmdbd (AuthInfo's is for slurmctld only).
  # A requeued job waits cred_expire seconds before it may start again (its old credential must
  # expire first; a launch before that fails and ends the job): 120 s by default, 10 s here.
  cat >"$dir/slurm.conf" <<CONF
ClusterName=sdtltest
SlurmctldHost=localhost
SlurmctldPort=$(free_port)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
AccountingStoragePass=$dir/munge.socket
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=600
KillWait=30
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(free_port) CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(free_port) CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
  # slurmdbd reads slurmdbd.conf beside slurm.conf, and only if no one else may read it.
  cat >"$dir/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$dir/munge.socket
DbdHost=localhost
DbdPort=$dbd_port
SlurmUser=$user
PidFile=$dir/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$mysql_port
StorageUser=$user
StorageLoc=slurm_acct_db
CONF
  chmod 600 "$dir/slurmdbd.conf"
}

# A MariaDB of its own in DIR/mysql, on 127.0.0.1 only, without passwords (--skip-grant-tables).
start_mariadb() {
  local i
  mariadb-install-db --no-defaults --user="$(id -un)" --datadir="$dir/mysql" \
    --auth-root-authentication-method=normal --skip-test-db >"$dir/log/mariadb-install.log" 2>&1
  mariadbd --no-defaults --user="$(id -un)" --datadir="$dir/mysql" --skip-grant-tables \
    --bind-address=127.0.0.1 --port="$mysql_port" --socket="$dir/mysql.sock" \
    --pid-file="$dir/mariadb.pid" --log-error="$dir/log/mariadb.log" >/dev/null 2>&1 &
  for ((i = 0; i < 120; i++)); do
    mariadb --no-defaults -h 127.0.0.1 -P "$mysql_port" -e 'select 1' >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "slurm_cluster: MariaDB did not start; $dir/log/mariadb.log:" >&2
  tail -5 "$dir/log/mariadb.log" >&2
  return 1
}

# slurmdbd, and the cluster registered in its database (slurmctld records jobs only then).
start_slurmdbd() {
  local i
  slurmdbd
  for ((i = 0; i < 20; i++)); do
    timeout 10 sacctmgr -i add cluster sdtltest >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "slurm_cluster: slurmdbd did not start; $dir/log/slurmdbd.log:" >&2
  tail -5 "$dir/log/slurmdbd.log" >&2
  return 1
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
    state=$(sinfo -h -N -o %T 2>/dev/null | tr '\n' ' ' || true)
    [ "$state" = 'idle idle ' ] && return 0
    sleep 0.5
  done
  echo "slurm_cluster: the nodes did not come up (state '${state:-none}'); logs in $dir/log:" >&2
  tail -5 "$dir/log/slurmctld.log" "$dir"/log/slurmd-n*.log >&2 || true
  return 1
}

start() {
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  install_packages
  dbd_port=$(free_port) mysql_port=$(free_port)
  write_conf
  export SLURM_CONF=$dir/slurm.conf
  start_munge
  start_mariadb
  start_slurmdbd
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF" -N n1
  slurmd -f "$SLURM_CONF" -N n2
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
  local daemon
  for daemon in slurmd-n1 slurmd-n2 slurmctld slurmdbd mariadb munged; do
    stop_daemon "$dir/$daemon.pid" &
  done
  wait
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
