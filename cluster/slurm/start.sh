#!/usr/bin/env bash
# Start a real single-node Slurm cluster (munged, slurmctld, slurmd) with everything under DIR.
#
#   cluster/slurm/start.sh DIR [--cpus N] [--max-array-size N] [--partition NAME]
#                              [--ctld-port P] [--d-port P]
#   export SLURM_CONF=DIR/etc/slurm.conf     # then sbatch, squeue, normlab sweep ... use it
#   cluster/slurm/stop.sh DIR
#
# Needs Debian's slurm-wlm and munge packages; runs as root (slurmd starts jobs as their user).
set -euo pipefail

usage() { echo "usage: $0 DIR [--cpus N] [--max-array-size N] [--partition NAME] [--ctld-port P] [--d-port P]" >&2; exit 2; }
[ $# -ge 1 ] || usage
DIR=$1; shift
CPUS=$(nproc); MAX_ARRAY_SIZE=1001; PARTITION=debug; CTLD_PORT=6817; D_PORT=6818
while [ $# -gt 0 ]; do
  case $1 in
    --cpus) CPUS=$2; shift 2 ;;
    --max-array-size) MAX_ARRAY_SIZE=$2; shift 2 ;;
    --partition) PARTITION=$2; shift 2 ;;
    --ctld-port) CTLD_PORT=$2; shift 2 ;;
    --d-port) D_PORT=$2; shift 2 ;;
    *) usage ;;
  esac
done
for exe in munged slurmctld slurmd sbatch scontrol; do
  command -v "$exe" >/dev/null || { echo "start.sh: '$exe' not found; install Debian's slurm-wlm and munge (apt-get install slurm-wlm munge)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "start.sh: run as root (slurmd must be able to start jobs as their user)" >&2; exit 1; }

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
HOST=$(hostname -s)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
# MaxJobCount must hold every task of the biggest array plus the rest of the queue.
MAX_JOB_COUNT=$(( MAX_ARRAY_SIZE * 4 > 20000 ? MAX_ARRAY_SIZE * 4 : 20000 ))

if [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
  echo "start.sh: a cluster is already running in $DIR (stop it with cluster/slurm/stop.sh $DIR)" >&2; exit 1
fi
# munged refuses directories other users can write to.
install -d -m 0700 "$DIR/munge"
install -d -m 0755 "$DIR/etc" "$DIR/state/slurmctld" "$DIR/state/slurmd" "$DIR/log" "$DIR/run"
[ -f "$DIR/munge/munge.key" ] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none; chmod 0400 "$DIR/munge/munge.key"; }
: > "$DIR/etc/plugstack.conf"
sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@USER@|$(id -un)|g" -e "s|@CPUS@|$CPUS|g" \
    -e "s|@MEM_MB@|$MEM_MB|g" -e "s|@MAX_ARRAY_SIZE@|$MAX_ARRAY_SIZE|g" -e "s|@MAX_JOB_COUNT@|$MAX_JOB_COUNT|g" \
    -e "s|@PARTITION@|$PARTITION|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@D_PORT@|$D_PORT|g" \
    "$HERE/slurm.conf.in" > "$DIR/etc/slurm.conf"
export SLURM_CONF=$DIR/etc/slurm.conf

munged --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munge/munged.pid" \
       --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" --force
# -c: a fresh controller state every start, so a test cluster never inherits old jobs.
slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N "$HOST"

for _ in $(seq 1 60); do
  if state=$(scontrol show node "$HOST" 2>/dev/null | sed -n 's/.*State=\([A-Z+_]*\).*/\1/p') && [ -n "$state" ] \
     && [[ $state == IDLE* || $state == MIXED* || $state == ALLOCATED* ]]; then
    echo "Slurm is up in $DIR (node $HOST, $CPUS CPUs, partition $PARTITION, MaxArraySize=$MAX_ARRAY_SIZE)."
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "start.sh: the node did not become ready within 30 s (state: ${state:-none}); see $DIR/log/" >&2
"$HERE/stop.sh" "$DIR" >/dev/null 2>&1 || true
exit 1
