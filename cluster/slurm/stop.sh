#!/usr/bin/env bash
# Stop the Slurm cluster started by start.sh in DIR (its jobs die with it) and remove its /etc/hosts lines.
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
DIR=$(realpath -m "$1")
HOSTS_MARK="# normlab-slurm <$DIR>"
stop_pid_file() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$file"
}
# Cancel this cluster's jobs first so their processes end with it (SLURM_CONF points scancel here).
if [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
  SLURM_CONF=$DIR/etc/slurm.conf scancel --user="$(id -un)" >/dev/null 2>&1 && sleep 1
fi
if [ -d "$DIR" ]; then
  # One slurmd (run/slurmd.pid) or one per node (run/slurmd-NAME.pid).
  for file in "$DIR"/run/slurmd.pid "$DIR"/run/slurmd-*.pid; do stop_pid_file "$file"; done
  stop_pid_file "$DIR/run/slurmctld.pid"
  stop_pid_file "$DIR/munge/munged.pid"
else
  # DIR was deleted under a running cluster (pid files gone): its daemons still name DIR on their command line.
  echo "stop.sh: $DIR is gone; stopping the daemons started with it" >&2
  for proc in /proc/[0-9]*; do
    if tr '\0' ' ' < "$proc/cmdline" 2>/dev/null | grep -qF -e "$DIR/etc/slurm.conf" -e "$DIR/munge/"; then
      kill "${proc#/proc/}" 2>/dev/null
    fi
  done
fi
if grep -qF -- "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
  . "$(dirname "$0")/hosts.sh"
  rewrite_hosts "$HOSTS_MARK"
fi
echo "Slurm in $DIR stopped."
