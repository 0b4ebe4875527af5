#!/usr/bin/env bash
# Start the shared normlab MLflow tracking server: a real `mlflow server` with its run store in
# SQLite on local disk (or PostgreSQL) and artifacts uploaded and downloaded through the server,
# so jobs need nothing but MLFLOW_TRACKING_URI=http://HOST:PORT. See mlflow/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: mlflow/start-server.sh [options] [-- extra `mlflow server` options]

  --data-dir DIR         where the SQLite run store, artifacts and auth files live
                         (default: ./mlflow-data; must be a local disk for SQLite)
  --backend-store-uri U  run store: sqlite:////abs/path.db or postgresql://user@host/db
                         (default: sqlite in DATA_DIR/mlflow.db)
  --artifacts-dir DIR    artifact store served through the server (default: DATA_DIR/artifacts)
  --host HOST            interface to bind (default: 127.0.0.1, this machine only)
  --port PORT            port to listen on (default: 5000)
  --workers N            server worker processes (default: 2)
  --allowed-hosts LIST   Host headers the server answers (default: MLflow's loopback and private
                         IPs, plus this machine's names when --host is not 127.0.0.1)
  --auth                 MLflow's basic-auth app: every request needs a user and password.
                         The first start needs MLFLOW_AUTH_ADMIN_PASSWORD (creates user "admin").
  --auth-db-uri U        auth user store (default: sqlite in DATA_DIR/basic_auth.db)
  -h, --help             this text

The server runs in the foreground; stop it with Ctrl-C (or kill its pid).
EOF
}

die() { echo "start-server.sh: $*" >&2; exit 2; }

data_dir="./mlflow-data"
backend_uri=""
artifacts_dir=""
host="127.0.0.1"
port="5000"
workers="2"
allowed_hosts=""
auth=0
auth_db_uri=""
extra=()

while [ $# -gt 0 ]; do
  case "$1" in
    --data-dir) data_dir="${2:?--data-dir needs a directory}"; shift 2 ;;
    --backend-store-uri) backend_uri="${2:?--backend-store-uri needs a URI}"; shift 2 ;;
    --artifacts-dir) artifacts_dir="${2:?--artifacts-dir needs a directory}"; shift 2 ;;
    --host) host="${2:?--host needs an address}"; shift 2 ;;
    --port) port="${2:?--port needs a number}"; shift 2 ;;
    --workers) workers="${2:?--workers needs a number}"; shift 2 ;;
    --allowed-hosts) allowed_hosts="${2:?--allowed-hosts needs a list}"; shift 2 ;;
    --auth) auth=1; shift ;;
    --auth-db-uri) auth_db_uri="${2:?--auth-db-uri needs a URI}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1'; see --help" ;;
  esac
done

[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "--port must be 1-65535, got '$port'"
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, got '$workers'"
case "$backend_uri" in
  ""|sqlite:///*|postgresql://*|postgresql+*://*) ;;
  *) die "--backend-store-uri must be sqlite:///PATH or postgresql://..., got '$backend_uri'" ;;
esac

# The repository's environment when there is one, else whatever `mlflow` is on PATH.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mlflow_bin="${MLFLOW_BIN:-}"
if [ -z "$mlflow_bin" ]; then
  if [ -x "$here/../.venv/bin/mlflow" ]; then mlflow_bin="$here/../.venv/bin/mlflow"; else mlflow_bin="mlflow"; fi
fi
command -v "$mlflow_bin" >/dev/null || die "no 'mlflow' executable found; install mlflow or set MLFLOW_BIN"

# SQLite relies on POSIX file locks, which network filesystems (NFS, Lustre, GPFS, CIFS, ...)
# implement loosely or not at all: concurrent writers then corrupt the database silently.
refuse_network_fs() {  # $1: the path of a SQLite file (it and its directory may not exist yet)
  local dir fstype
  dir="$(dirname "$1")"
  while [ ! -d "$dir" ]; do dir="$(dirname "$dir")"; done
  fstype="$(stat -f -c %T "$dir")"
  case "$fstype" in
    nfs*|lustre|gpfs|cifs|smb*|fuse*|ceph|beegfs|afs|panfs|9p)
      die "SQLite file $1 is on a network filesystem ($fstype); use a local disk (--data-dir /local/...) or PostgreSQL (--backend-store-uri postgresql://...)" ;;
  esac
}

# Every check before anything is created.
data_dir="$(realpath -m "$data_dir")"
artifacts_dir="$(realpath -m "${artifacts_dir:-$data_dir/artifacts}")"
backend_uri="${backend_uri:-sqlite:///$data_dir/mlflow.db}"
case "$backend_uri" in sqlite:///*) refuse_network_fs "${backend_uri#sqlite:///}" ;; esac
if [ "$auth" = 1 ]; then
  mlflow_python="$(dirname "$(command -v "$mlflow_bin")")/python"
  if [ -x "$mlflow_python" ] && ! "$mlflow_python" -c "import flask_wtf" 2>/dev/null; then
    die "--auth needs MLflow's auth extra (Flask-WTF): pip install 'mlflow[auth]'"
  fi
  auth_db_uri="${auth_db_uri:-sqlite:///$data_dir/basic_auth.db}"
  case "$auth_db_uri" in
    sqlite:///*)
      refuse_network_fs "${auth_db_uri#sqlite:///}"
      if [ ! -e "${auth_db_uri#sqlite:///}" ] && [ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]; then
        die "the first start with --auth needs MLFLOW_AUTH_ADMIN_PASSWORD set (the password of user 'admin')"
      fi ;;
  esac
fi

mkdir -p "$data_dir" "$artifacts_dir"
case "$backend_uri" in sqlite:///*) mkdir -p "$(dirname "${backend_uri#sqlite:///}")" ;; esac

app_args=()
if [ "$auth" = 1 ]; then
  # The auth app reads its own settings from an ini file; it lives with the data, readable by us only.
  (
    umask 077
    printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = %s\nadmin_username = admin\n' "$auth_db_uri"
    printf 'authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n'
  ) >"$data_dir/basic_auth.ini"
  chmod 600 "$data_dir/basic_auth.ini"
  export MLFLOW_AUTH_CONFIG_PATH="$data_dir/basic_auth.ini"
  # CSRF protection needs one static key shared by all workers and kept across restarts.
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    if [ ! -s "$data_dir/flask_secret_key" ]; then
      od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$data_dir/flask_secret_key"
      chmod 600 "$data_dir/flask_secret_key"
    fi
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$data_dir/flask_secret_key")"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  app_args=(--app-name basic-auth)
fi

# MLflow answers only Host headers it knows (against DNS rebinding); jobs on other nodes reach a
# login node by its name, so that name must be on the list once the server listens beyond loopback.
host_args=()
if [ -n "$allowed_hosts" ]; then
  host_args=(--allowed-hosts "$allowed_hosts")
elif [ "$host" != 127.0.0.1 ] && [ "$host" != localhost ]; then
  short="$(hostname -s)"
  full="$(hostname -f 2>/dev/null || echo "$short")"
  names="localhost 127.0.0.1 $short $full"
  [ "$host" = 0.0.0.0 ] || names="$names $host"
  list=""
  for name in $names; do list="$list,$name,$name:*"; done
  host_args=(--allowed-hosts "${list#,},10.*,192.168.*,172.*")
fi

# Server-side jobs serve MLflow's GenAI features, which normlab does not use; they would start a
# pool of worker processes on a shared login node.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

auth_note=""
[ "$auth" = 1 ] && auth_note=", basic auth"
echo "MLflow server on http://$host:$port (runs: $backend_uri, artifacts: $artifacts_dir$auth_note)" >&2
exec "$mlflow_bin" server \
  --backend-store-uri "$backend_uri" \
  --serve-artifacts --artifacts-destination "$artifacts_dir" \
  --host "$host" --port "$port" --workers "$workers" \
  "${host_args[@]}" "${app_args[@]}" "${extra[@]}"
