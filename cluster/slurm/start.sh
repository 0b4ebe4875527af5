#!/usr/bin/env bash
# Start a real Slurm cluster on this machine (munged, slurmctld, one slurmd per node) with everything under DIR.
#
#   cluster/slurm/start.sh DIR [--nodes N] [--cpus-per-node K] [--max-array-size N] [--partition NAME]
#                              [--ctld-port P] [--d-port P[,P2,...]] [--slurmd-timeout S]
#   export SLURM_CONF=DIR/etc/slurm.conf     # then sbatch, squeue, normlab sweep ... use it
#   cluster/slurm/stop.sh DIR
#
# One node (the default) is this host under its own name on 127.0.0.1, as before. With --nodes N > 1
# each node is its own slurmd (`slurmd -N NAME`) on its own loopback address 127.0.0.(i+1) and port;
# the names are <prefix>1..<prefix>N with a prefix unique to DIR (several clusters may run at once),
# and start.sh adds "127.0.0.(i+1) NAME" lines, marked with DIR, to /etc/hosts so that the names
# resolve as a real cluster's do (the rendezvous address is the job's first node); stop.sh removes them.
#
# Needs Debian's slurm-wlm and munge packages; runs as root (slurmd starts jobs as their user).
set -euo pipefail

usage() {
  echo "usage: $0 DIR [--nodes N] [--cpus-per-node K] [--max-array-size N] [--partition NAME]" \
       "[--ctld-port P] [--d-port P[,P2,...]] [--slurmd-timeout S]" >&2
  exit 2
}
[ $# -ge 1 ] || usage
DIR=$1; shift
# the node has the machine's CPUs: nproc alone would honour OMP_NUM_THREADS (1 under the tests' advice)
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc); MAX_ARRAY_SIZE=1001; PARTITION=debug; CTLD_PORT=6817; D_PORTS=6818; NODES=1; SLURMD_TIMEOUT=300
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || usage
  case $1 in
    --cpus|--cpus-per-node) CPUS=$2 ;;
    --max-array-size) MAX_ARRAY_SIZE=$2 ;;
    --partition) PARTITION=$2 ;;
    --ctld-port) CTLD_PORT=$2 ;;
    --d-port) D_PORTS=$2 ;;
    --nodes) NODES=$2 ;;
    --slurmd-timeout) SLURMD_TIMEOUT=$2 ;;
    *) usage ;;
  esac
  shift 2
done
[[ $NODES =~ ^[1-9][0-9]*$ ]] && [ "$NODES" -le 250 ] || { echo "start.sh: --nodes $NODES: give a node count from 1 to 250" >&2; exit 2; }
for exe in munged slurmctld slurmd sbatch scontrol; do
  command -v "$exe" >/dev/null || { echo "start.sh: '$exe' not found; install Debian's slurm-wlm and munge (apt-get install slurm-wlm munge)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "start.sh: run as root (slurmd must be able to start jobs as their user)" >&2; exit 1; }

mkdir -p "$DIR"
DIR=$(realpath "$DIR")  # as stop.sh names it
HERE=$(cd "$(dirname "$0")" && pwd)
HOST=$(hostname -s)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
# MaxJobCount must hold every task of the biggest array plus the rest of the queue.
MAX_JOB_COUNT=$(( MAX_ARRAY_SIZE * 4 > 20000 ? MAX_ARRAY_SIZE * 4 : 20000 ))
HOSTS_MARK="# normlab-slurm <$DIR>"

# Node names, addresses and ports.
IFS=, read -r -a PORTS <<< "$D_PORTS"
if [ "${#PORTS[@]}" -eq 1 ]; then
  for i in $(seq 2 "$NODES"); do PORTS+=($(( PORTS[0] + i - 1 ))); done
fi
[ "${#PORTS[@]}" -eq "$NODES" ] || { echo "start.sh: --d-port gives ${#PORTS[@]} ports for $NODES nodes; give one, or one per node" >&2; exit 2; }
NAMES=(); ADDRS=()
if [ "$NODES" -eq 1 ]; then
  NAMES=("$HOST"); ADDRS=(127.0.0.1); FIRST_JOB_ID=1
  SLURMD_PID=$DIR/run/slurmd.pid; SLURMD_SPOOL=$DIR/state/slurmd; SLURMD_LOG=$DIR/log/slurmd.log
else
  # Letters only, from DIR: Slurm's host lists then read as <prefix>[1-N].
  HASH=$(printf '%s' "$DIR" | md5sum | head -c 5)
  PREFIX=nl$(printf '%s' "$HASH" | tr '0-9a-f' 'a-p')
  FIRST_JOB_ID=$(( (16#$HASH % 9 + 1) * 1000 ))
  for i in $(seq 1 "$NODES"); do NAMES+=("$PREFIX$i"); ADDRS+=("127.0.0.$(( i + 1 ))"); done
  # %n: each slurmd its own pid file, spool directory and log (Slurm's multiple-slurmd set-up).
  SLURMD_PID=$DIR/run/slurmd-%n.pid; SLURMD_SPOOL=$DIR/state/slurmd-%n; SLURMD_LOG=$DIR/log/slurmd-%n.log
fi

if [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
  echo "start.sh: a cluster is already running in $DIR (stop it with cluster/slurm/stop.sh $DIR)" >&2; exit 1
fi
# munged refuses directories other users can write to.
install -d -m 0700 "$DIR/munge"
install -d -m 0755 "$DIR/etc" "$DIR/state/slurmctld" "$DIR/log" "$DIR/run"
for name in "${NAMES[@]}"; do install -d -m 0755 "${SLURMD_SPOOL//%n/$name}"; done
[ -f "$DIR/munge/munge.key" ] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none; chmod 0400 "$DIR/munge/munge.key"; }
: > "$DIR/etc/plugstack.conf"
: > "$DIR/etc/nodes.conf"
for i in "${!NAMES[@]}"; do
  port=""; [ "$NODES" -eq 1 ] || port=" Port=${PORTS[$i]}"
  echo "NodeName=${NAMES[$i]} NodeAddr=${ADDRS[$i]}$port CPUs=$CPUS RealMemory=$(( MEM_MB / NODES )) State=UNKNOWN" >> "$DIR/etc/nodes.conf"
done
NODE_LIST=$(IFS=,; echo "${NAMES[*]}")
sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@USER@|$(id -un)|g" \
    -e "s|@MAX_ARRAY_SIZE@|$MAX_ARRAY_SIZE|g" -e "s|@MAX_JOB_COUNT@|$MAX_JOB_COUNT|g" \
    -e "s|@PARTITION@|$PARTITION|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@D_PORT@|${PORTS[0]}|g" \
    -e "s|@SLURMD_PID@|$SLURMD_PID|g" -e "s|@SLURMD_SPOOL@|$SLURMD_SPOOL|g" -e "s|@SLURMD_LOG@|$SLURMD_LOG|g" \
    -e "s|@SLURMD_TIMEOUT@|$SLURMD_TIMEOUT|g" -e "s|@FIRST_JOB_ID@|$FIRST_JOB_ID|g" -e "s|@NODE_NAMES@|$NODE_LIST|g" \
    -e "/@NODE_LINES@/{r $DIR/etc/nodes.conf" -e "d}" \
    "$HERE/slurm.conf.in" > "$DIR/etc/slurm.conf"
export SLURM_CONF=$DIR/etc/slurm.conf

if [ "$NODES" -gt 1 ]; then
  . "$HERE/hosts.sh"
  added=$(for i in "${!NAMES[@]}"; do echo "${ADDRS[$i]} ${NAMES[$i]} $HOSTS_MARK"; done)
  rewrite_hosts "$HOSTS_MARK" "$added"
fi

munged --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munge/munged.pid" \
       --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" --force
# -c: a fresh controller state every start, so a test cluster never inherits old jobs.
slurmctld -c -f "$SLURM_CONF"
for name in "${NAMES[@]}"; do slurmd -f "$SLURM_CONF" -N "$name"; done

ready() {
  local name state
  for name in "${NAMES[@]}"; do
    state=$(scontrol show node "$name" 2>/dev/null | sed -n 's/.*State=\([A-Z+_]*\).*/\1/p')
    [[ $state == IDLE* || $state == MIXED* || $state == ALLOCATED* ]] || return 1
  done
}
for _ in $(seq 1 60); do
  if ready; then
    echo "Slurm is up in $DIR ($NODES node(s) $NODE_LIST, $CPUS CPUs each, partition $PARTITION, MaxArraySize=$MAX_ARRAY_SIZE)."
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "start.sh: the nodes did not become ready within 30 s ($(sinfo -h -N -o '%N %T' 2>/dev/null | tr '\n' ' ')); see $DIR/log/" >&2
"$HERE/stop.sh" "$DIR" >/dev/null 2>&1 || true
exit 1
