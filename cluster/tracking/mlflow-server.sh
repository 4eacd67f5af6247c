#!/usr/bin/env bash
# The team's MLflow tracking server, as MLflow documents it for production: runs and the model
# registry in PostgreSQL, artifacts proxied to S3 (clients need no S3 credentials), basic-auth
# on. Bound to 127.0.0.1 unless RAN_MLFLOW_HOST says otherwise. See cluster/tracking/README.md.
#
#   export MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@DBHOST:5432/mlflow
#   export MLFLOW_ARTIFACTS_DESTINATION=s3://BUCKET/mlflow
#   export MLFLOW_AUTH_ADMIN_PASSWORD=...     # the admin's password, set on the first start
#   cluster/tracking/mlflow-server.sh
#
# What it does: `mlflow db upgrade` (creates or migrates the schema), writes the basic-auth
# config, then becomes `mlflow server --app-name basic-auth` (exec: SIGTERM stops it). No password
# ever appears on a command line: both read the database from their environment.
#
# Settings (environment):
#   MLFLOW_BACKEND_STORE_URI      required: postgresql://USER:PASSWORD@HOST:PORT/DB
#   MLFLOW_ARTIFACTS_DESTINATION  required: s3://BUCKET/PREFIX; the server reads and writes it
#                                 with the usual AWS_* credentials (instance profile, IRSA, keys)
#                                 and MLFLOW_S3_ENDPOINT_URL for S3-compatible stores
#   MLFLOW_AUTH_DATABASE_URI      users and permissions (default: MLFLOW_BACKEND_STORE_URI; its
#                                 tables have their own migration table there)
#   MLFLOW_AUTH_ADMIN_USERNAME    admin (default admin); MLFLOW_AUTH_ADMIN_PASSWORD is needed
#                                 only while that user does not exist yet (MLflow 3.17 ships none)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  what users have on what they did not create (READ)
#   MLFLOW_AUTH_CACHE_TTL_SECONDS   seconds a worker trusts a checked password (60; 0: check every
#                                 request, a scrypt hash each: slow under many metric writes)
#   MLFLOW_AUTH_CONFIG_PATH       a basic_auth.ini of your own instead of the three above
#   MLFLOW_FLASK_SERVER_SECRET_KEY  the UI's CSRF key (default: a random one per start; set the
#                                 same one on every replica behind one address)
#   RAN_MLFLOW_HOST (127.0.0.1), RAN_MLFLOW_PORT (5000), RAN_MLFLOW_WORKERS (4)
#   RAN_MLFLOW_ALLOWED_HOSTS      the Host headers to accept when clients use a name, e.g.
#                                 mlflow.example.com,mlflow.example.com:* (MLflow refuses others)
#   RAN_MLFLOW_BIN                the mlflow command (default: mlflow on PATH)
set -euo pipefail

die() { echo "mlflow-server.sh: $*" >&2; exit 2; }

mlflow="${RAN_MLFLOW_BIN:-$(command -v mlflow || true)}"
[[ -n "$mlflow" && -x "$mlflow" ]] ||
  die "no mlflow command: pip install 'mlflow[auth]==3.17.2' psycopg2-binary boto3 (or set RAN_MLFLOW_BIN)"
store="${MLFLOW_BACKEND_STORE_URI:-}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-}"
[[ "$store" == postgresql* ]] ||
  die "set MLFLOW_BACKEND_STORE_URI=postgresql://USER:PASSWORD@HOST:PORT/DB (got '${store}')"
[[ "$artifacts" == s3://* ]] || die "set MLFLOW_ARTIFACTS_DESTINATION=s3://BUCKET/PREFIX (got '${artifacts}')"

if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  export MLFLOW_FLASK_SERVER_SECRET_KEY
fi

# No password on any command line (every local user reads those with ps): `mlflow server` reads
# its store from MLFLOW_BACKEND_STORE_URI in its environment, and `mlflow db upgrade` is given the
# URI without its password, which libpq takes from PGPASSWORD (a process's environment is private
# to its user). The password is percent-decoded as libpq expects it.
export MLFLOW_BACKEND_STORE_URI="$store"
upgrade_uri="$store" db_password=""
if [[ "$store" =~ ^([^:/]+://)([^:@/]*):([^@/]*)@(.*)$ ]]; then
  upgrade_uri="${BASH_REMATCH[1]}${BASH_REMATCH[2]}@${BASH_REMATCH[4]}"
  db_password="${BASH_REMATCH[3]//\\/\\\\}"
  db_password="$(printf '%b' "${db_password//%/\\x}")"
fi
PGPASSWORD="${db_password:-${PGPASSWORD:-}}" "$mlflow" db upgrade "$upgrade_uri" >&2 ||
  die "mlflow db upgrade failed on the backend store (see above)"
unset db_password

if [[ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]]; then
  # The config holds the auth database's password: a private file, removed when we stop.
  state="$(mktemp -d "${TMPDIR:-/tmp}/ran-mlflow-auth.XXXXXX")"
  trap 'rm -rf "$state"' EXIT
  export MLFLOW_AUTH_CONFIG_PATH="$state/basic_auth.ini"
  (umask 077; cat > "$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-$store}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS:-60}
EOF
  )
fi

args=(server --app-name basic-auth --artifacts-destination "$artifacts"
      --host "${RAN_MLFLOW_HOST:-127.0.0.1}" --port "${RAN_MLFLOW_PORT:-5000}"
      --workers "${RAN_MLFLOW_WORKERS:-4}")
[[ -z "${RAN_MLFLOW_ALLOWED_HOSTS:-}" ]] || args+=(--allowed-hosts "$RAN_MLFLOW_ALLOWED_HOSTS")
if [[ -n "${state:-}" ]]; then
  # Not exec: the trap removes the config (with its password) when the server ends.
  "$mlflow" "${args[@]}" &
  server=$!
  trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; rm -rf "$state"; exit 143' TERM INT
  wait "$server"
  exit $?
fi
exec "$mlflow" "${args[@]}"
