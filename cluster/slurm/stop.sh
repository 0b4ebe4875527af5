#!/usr/bin/env bash
# Stop the Slurm cluster started by start.sh in DIR (its jobs die with it) and remove its /etc/hosts lines.
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
[ -d "$1" ] || { echo "stop.sh: no such directory $1" >&2; exit 2; }
DIR=$(cd "$1" && pwd)
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
# One slurmd (run/slurmd.pid) or one per node (run/slurmd-NAME.pid).
for file in "$DIR"/run/slurmd.pid "$DIR"/run/slurmd-*.pid; do stop_pid_file "$file"; done
stop_pid_file "$DIR/run/slurmctld.pid"
stop_pid_file "$DIR/munge/munged.pid"
if grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
  exec 9< /etc/hosts
  flock 9
  grep -vF "$HOSTS_MARK" /etc/hosts > "$DIR/run/hosts.new"
  cat "$DIR/run/hosts.new" > /etc/hosts
  rm -f "$DIR/run/hosts.new"
  flock -u 9; exec 9<&-
fi
echo "Slurm in $DIR stopped."
