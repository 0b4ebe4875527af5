# Sourced by start.sh and stop.sh: the /etc/hosts lines of one cluster, marked with its directory.
#
# rewrite_hosts MARK [LINES]: /etc/hosts without the lines containing MARK, then LINES. The new content
# is built in memory before the file is touched, and written in place (/etc/hosts may be a bind mount)
# under a lock that every cluster's start.sh and stop.sh take.
rewrite_hosts() {
  local mark=$1 add=${2-} kept status=0
  exec 9< /etc/hosts
  flock 9
  kept=$(grep -vF -- "$mark" /etc/hosts) || status=$?
  if [ "$status" -gt 1 ]; then
    exec 9<&-
    echo "cannot read /etc/hosts" >&2
    return 1
  fi
  { if [ -n "$kept" ]; then printf '%s\n' "$kept"; fi
    if [ -n "$add" ]; then printf '%s\n' "$add"; fi; } > /etc/hosts
  exec 9<&-
}
