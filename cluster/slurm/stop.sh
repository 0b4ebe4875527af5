#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by start.sh in DIR (its jobs die with it).
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
DIR=$1
[ -d "$DIR" ] || { echo "stop.sh: no such directory $DIR" >&2; exit 2; }
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
stop_pid_file "$DIR/run/slurmd.pid"
stop_pid_file "$DIR/run/slurmctld.pid"
stop_pid_file "$DIR/munge/munged.pid"
echo "Slurm in $DIR stopped."
