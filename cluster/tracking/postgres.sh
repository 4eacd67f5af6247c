#!/usr/bin/env bash
# A PostgreSQL for the team's MLflow server on one machine: for trying the team setup here, and
# what the tests and benchmarks/train_overhead.py start. A team's server normally uses a managed
# PostgreSQL instead (see cluster/tracking/README.md).
#
#   RAN_PG_PASSWORD=... cluster/tracking/postgres.sh DIR
#
# The first time, DIR/data gets a new database cluster: superuser RAN_PG_USER (mlflow) with password
# RAN_PG_PASSWORD (required), password (scram-sha-256) login over TCP only, and two databases:
# `mlflow` (runs, metrics, the model registry) and `mlflow_auth` (basic-auth users and
# permissions). Then PostgreSQL runs in the foreground (this process becomes it; SIGTERM or
# Ctrl-C stops it) on RAN_PG_HOST:RAN_PG_PORT (127.0.0.1:5432), with no Unix socket.
#
# Binaries: RAN_PG_BIN, else Debian's newest /usr/lib/postgresql/N/bin (package postgresql), else
# PATH. PostgreSQL refuses to run as root: run as root, this script hands DIR to the system user
# RAN_PG_OS_USER (postgres, made by Debian's package) and runs PostgreSQL as that user, so DIR's
# parent folders must be open to it (a folder under /tmp is; pytest's tmp_path is not).
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit 2; }

[[ $# -eq 1 ]] || die "usage: RAN_PG_PASSWORD=... $0 DIR"
dir="$1"
host="${RAN_PG_HOST:-127.0.0.1}"
port="${RAN_PG_PORT:-5432}"
user="${RAN_PG_USER:-mlflow}"
os_user="${RAN_PG_OS_USER:-postgres}"

bin="${RAN_PG_BIN:-}"
if [[ -z "$bin" ]]; then
  bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  [[ -n "$bin" ]] || bin="$(dirname "$(command -v postgres || echo /nonexistent/postgres)")"
fi
[[ -x "$bin/postgres" && -x "$bin/initdb" ]] ||
  die "no PostgreSQL server binaries (looked in ${bin}): apt-get install postgresql, or set RAN_PG_BIN"

# Run a command as the PostgreSQL owner: ourselves, or os_user when we are root (setpriv execs
# in place, so `exec as_owner postgres ...` leaves PostgreSQL with this script's PID).
as_owner() {
  if [[ $EUID -eq 0 ]]; then
    setpriv --reuid="$os_user" --regid="$os_user" --init-groups -- env HOME="$dir" "$@"
  else
    "$@"
  fi
}

data="$dir/data"
if [[ ! -f "$data/PG_VERSION" ]]; then
  [[ -n "${RAN_PG_PASSWORD:-}" ]] || die "set RAN_PG_PASSWORD (the password of database user ${user})"
  mkdir -p "$dir"
  [[ $EUID -ne 0 ]] || chown "$os_user:" "$dir"
  chmod 700 "$dir"
  pwfile="$dir/.initdb-password"
  (umask 077; printf '%s\n' "$RAN_PG_PASSWORD" > "$pwfile")
  [[ $EUID -ne 0 ]] || chown "$os_user:" "$pwfile"
  as_owner "$bin/initdb" -D "$data" -U "$user" --pwfile="$pwfile" --auth-host=scram-sha-256 \
    --auth-local=peer -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 ||
    { rm -f "$pwfile"; cat "$dir/initdb.log" >&2; die "initdb failed"; }
  rm -f "$pwfile"
  # Single-user mode creates the databases without starting a server first.
  printf 'CREATE DATABASE mlflow\nCREATE DATABASE mlflow_auth\n' |
    as_owner "$bin/postgres" --single -D "$data" -c unix_socket_directories= postgres \
      >"$dir/create.log" 2>&1 || { cat "$dir/create.log" >&2; die "creating the databases failed"; }
fi

exec_args=(-D "$data" -c "listen_addresses=$host" -p "$port" -c unix_socket_directories=)
if [[ $EUID -eq 0 ]]; then
  exec setpriv --reuid="$os_user" --regid="$os_user" --init-groups -- env HOME="$dir" \
    "$bin/postgres" "${exec_args[@]}"
fi
exec "$bin/postgres" "${exec_args[@]}"
