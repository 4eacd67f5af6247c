#!/usr/bin/env bash
# A Ray head on this machine, bound to 127.0.0.1, with the dashboard, for `ran submit`:
#
#   cluster/local.sh start     # then: ran submit jobs/demo.yaml --address http://127.0.0.1:8265
#   cluster/local.sh status
#   cluster/local.sh stop
#
# Settings (environment): RAN_RAY_PORT (GCS, 6379), RAN_DASHBOARD_PORT (8265), RAN_RAY_CPUS
# (default: all cores), RAN_RAY_GPUS, RAN_RAY_TEMP (Ray's temp dir, /tmp/ran-ray),
# RAN_RAY_ARGS (more `ray start` flags, e.g. other ports).
#
# Token authentication is always on (RAY_AUTH_MODE=token): every request to the dashboard, the
# Jobs API, the dashboard agent, the GCS and Ray Client must carry the cluster's token, or is
# refused. The token is RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH (default
# ~/.ray/auth_token, where Ray and `ran submit` look for it); when there is none, `start` creates
# one (64 hex digits of /dev/urandom) readable by its owner only (0600, in a 0700 folder), and
# makes an existing file 0600 (Ray writes its own with the default umask, 0644). RAY_AUTH_MODE=
# disabled is refused.
#
# What listens where (cluster/README.md, "Ports"): the dashboard (whose Jobs API runs any code it
# is sent) on 127.0.0.1 only; Ray Client (10001) and the dashboard agent (52365) on 127.0.0.1 and
# the machine's address; the GCS (RAN_RAY_PORT), raylet, object manager, agent gRPC and metrics
# ports on every interface, as Ray binds them (Ray 2.60 has no flag for their address): the token
# guards them. Firewall them off on machines others can reach.
#
# The head and its jobs inherit this shell's environment, and read this machine's ~/.aws and
# ~/.mlflow/credentials: that is how they get storage and MLflow credentials (`ran submit` sends
# none, cluster/README.md).
#
# `stop` ends only the processes of this head: each carries RAN_LOCAL_HEAD=<temp dir> in its
# environment, and the head's descendants go with them. Ray 2.60 has no public way to stop one of
# several Ray instances on a machine: `ray stop` takes no address or temp dir and ends every Ray
# process it finds (e.g. a `ran train` that runs its own), so this head's processes are found and
# signalled with psutil.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${RAN_RAY_PORT:-6379}"
dashboard_port="${RAN_DASHBOARD_PORT:-8265}"
temp="${RAN_RAY_TEMP:-/tmp/ran-ray}"
dashboard="http://127.0.0.1:${dashboard_port}"
if [[ -x "${here}/.venv/bin/ray" ]]; then
  bin="${here}/.venv/bin"
else
  bin="$(dirname "$(command -v ray || echo /nonexistent/ray)")"
fi

die() { echo "local.sh: $*" >&2; exit 2; }

py="${bin}/python"
[[ -x "$py" ]] || py="$(command -v python3 || echo python3)"

# `procs list`: the PIDs of this head, one a line: the processes whose environment holds
# RAN_LOCAL_HEAD=$temp and all their descendants (the dashboard's module processes retitle
# themselves over their environment with setproctitle, so only their parentage ties them to this
# head). `procs stop`: SIGTERM them (the raylet and GCS shut down in order), SIGKILL whatever is
# left after 10 s, and fail naming any survivor. This script and its shells are never counted.
procs() {
  "$py" - "$1" "$temp" <<'EOF'
import contextlib
import sys
import time

try:
    import psutil
except ImportError:
    print(f"local.sh: psutil is not installed for {sys.executable}; run `make setup` first",
          file=sys.stderr)
    sys.exit(2)

action, temp = sys.argv[1], sys.argv[2]
me = psutil.Process()
ours = {me.pid, *(p.pid for p in me.parents())}


def running(proc):
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def head():
    found = {}
    for proc in psutil.process_iter():
        if proc.pid in ours:
            continue
        with contextlib.suppress(psutil.Error):  # gone meanwhile, or another user's
            if proc.environ().get("RAN_LOCAL_HEAD") == temp:
                found.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
    return {pid: p for pid, p in found.items() if pid not in ours and running(p)}


def signal_and_wait(procs, send, seconds):
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            send(proc)
    deadline = time.monotonic() + seconds
    while (procs := [p for p in procs if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return procs


if action == "list":
    print("\n".join(str(pid) for pid in sorted(head())))
else:
    left = signal_and_wait(list(head().values()), psutil.Process.terminate, 10.0)
    # Those seen at first too: orphans of a killed parent no longer descend from the head.
    left = signal_and_wait(list(({p.pid: p for p in left} | head()).values()), psutil.Process.kill, 5.0)
    left = sorted({p.pid for p in left} | set(head()))
    if left:
        sys.exit(f"local.sh: some processes survived: {' '.join(map(str, left))}")
EOF
}

# Bearer token header for the dashboard, where Ray keeps it.
auth_header() {
  local token="${RAY_AUTH_TOKEN:-}"
  local file="${RAY_AUTH_TOKEN_PATH:-${HOME}/.ray/auth_token}"
  [[ -z "$token" && -r "$file" ]] && token="$(tr -d '[:space:]' < "$file")"
  [[ -n "$token" ]] && echo "Authorization: Bearer ${token}"
  return 0
}

# The token every request must carry: RAY_AUTH_TOKEN, else the token file, created private when
# there is none.
token_file="${RAY_AUTH_TOKEN_PATH:-${HOME}/.ray/auth_token}"
ensure_token() {
  [[ "${RAY_AUTH_MODE:-token}" == token ]] ||
    die "RAY_AUTH_MODE=${RAY_AUTH_MODE}: this head runs with token authentication only (unset it)"
  [[ -n "${RAY_AUTH_TOKEN:-}" ]] && return 0
  if [[ ! -s "$token_file" ]]; then
    (umask 077 && mkdir -p "$(dirname "$token_file")" &&
      od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$token_file") ||
      die "cannot write the Ray auth token to ${token_file}"
    echo "created the Ray auth token ${token_file} (0600); clients send it (ran submit reads it there)"
  fi
  chmod 600 "$token_file" || die "cannot make ${token_file} private (chmod 600)"
}

dashboard_up() {
  local header
  header="$(auth_header)"
  curl --silent --fail --max-time 5 ${header:+-H "$header"} "${dashboard}/api/version" > /dev/null
}

start() {
  [[ -x "${bin}/ray" ]] || die "ray not found: run \`make setup\` (or activate the venv) first"
  local pids
  pids="$(procs list)"
  [[ -z "$pids" ]] || die "a head is already running (temp dir ${temp}); \`$0 stop\` first"
  ensure_token
  mkdir -p "$temp"
  local cpus=() gpus=()
  [[ -n "${RAN_RAY_CPUS:-}" ]] && cpus=(--num-cpus "$RAN_RAY_CPUS")
  [[ -n "${RAN_RAY_GPUS:-}" ]] && gpus=(--num-gpus "$RAN_RAY_GPUS")
  # shellcheck disable=SC2086  # RAN_RAY_ARGS is a list of flags
  # RAY_ADDRESS reaches every process of the head: with other Ray instances on this machine (a
  # `ran train` with its own local Ray), the State API that Ray Train uses cannot pick one itself.
  RAN_LOCAL_HEAD="$temp" RAY_ADDRESS="127.0.0.1:${port}" RAY_AUTH_MODE=token PATH="${bin}:${PATH}" \
    "${bin}/ray" start --head \
    --node-ip-address 127.0.0.1 --port "$port" \
    --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" \
    --temp-dir "$temp" --disable-usage-stats "${cpus[@]}" "${gpus[@]}" ${RAN_RAY_ARGS:-} > "${temp}/start.log" 2>&1 \
    || { cat "${temp}/start.log" >&2; die "ray start failed (log above)"; }
  for _ in $(seq 1 120); do
    dashboard_up && break
    sleep 0.5
  done
  dashboard_up || die "the dashboard did not answer at ${dashboard}; see ${temp}/session_latest/logs"
  echo "Ray head on 127.0.0.1:${port}, dashboard ${dashboard}"
  echo "  ran submit jobs/demo.yaml --address ${dashboard} --wait"
  echo "  ray job submit --address ${dashboard} --working-dir . -- ran train jobs/demo.yaml"
}

stop() {
  local pids
  pids="$(procs list)"
  if [[ -z "$pids" ]]; then
    echo "no head running (temp dir ${temp})"
    return 0
  fi
  procs stop || exit 2
  echo "stopped the head (temp dir ${temp})"
}

status() {
  local pids
  pids="$(procs list)"
  if [[ -z "$pids" ]]; then
    echo "not running (temp dir ${temp})"
    return 1
  fi
  echo "running: $(echo "$pids" | wc -l) processes (temp dir ${temp})"
  if dashboard_up; then
    echo "dashboard ${dashboard} is up"
  else
    echo "dashboard ${dashboard} does not answer"
    return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
