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
# `stop` ends only the processes of this head: each carries RAN_LOCAL_HEAD=<temp dir> in its
# environment. (`ray stop` would also end every other Ray on the machine, e.g. a `ran train`
# that runs its own.)
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

# PIDs of this user's processes whose environment holds RAN_LOCAL_HEAD=$temp (one grep over all),
# and all their descendants: the dashboard's module processes retitle themselves over their
# environment (setproctitle), so only their parentage ties them to this head.
head_pids() {
  local roots
  roots="$(grep -lzxF "RAN_LOCAL_HEAD=${temp}" /proc/[0-9]*/environ 2>/dev/null \
    | sed -e 's#^/proc/##' -e 's#/environ$##' | grep -vxF -e "$$" -e "$BASHPID" || true)"
  [[ -n "$roots" ]] || return 0
  # /proc/PID/stat: "PID (COMM) STATE PPID ..."; COMM may hold spaces and parentheses.
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v roots="$roots" '
    { pid = $1; rest = $0; sub(/^.*\) /, "", rest); split(rest, f, " "); parent[pid] = f[2] }
    END {
      n = split(roots, r, "\n"); for (i = 1; i <= n; i++) keep[r[i]] = 1
      do { grown = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grown = 1 } } while (grown)
      for (p in keep) print p
    }' | grep -vxF -e "$$" -e "$BASHPID" || true
}

# Bearer token header for the dashboard, where Ray keeps it.
auth_header() {
  local token="${RAY_AUTH_TOKEN:-}"
  local file="${RAY_AUTH_TOKEN_PATH:-${HOME}/.ray/auth_token}"
  [[ -z "$token" && -r "$file" ]] && token="$(tr -d '[:space:]' < "$file")"
  [[ -n "$token" ]] && echo "Authorization: Bearer ${token}"
  return 0
}

dashboard_up() {
  local header
  header="$(auth_header)"
  curl --silent --fail --max-time 5 ${header:+-H "$header"} "${dashboard}/api/version" > /dev/null
}

start() {
  [[ -x "${bin}/ray" ]] || die "ray not found: run \`make setup\` (or activate the venv) first"
  [[ -z "$(head_pids)" ]] || die "a head is already running (temp dir ${temp}); \`$0 stop\` first"
  mkdir -p "$temp"
  local cpus=() gpus=()
  [[ -n "${RAN_RAY_CPUS:-}" ]] && cpus=(--num-cpus "$RAN_RAY_CPUS")
  [[ -n "${RAN_RAY_GPUS:-}" ]] && gpus=(--num-gpus "$RAN_RAY_GPUS")
  # shellcheck disable=SC2086  # RAN_RAY_ARGS is a list of flags
  # RAY_ADDRESS reaches every process of the head: with other Ray instances on this machine (a
  # `ran train` with its own local Ray), the State API that Ray Train uses cannot pick one itself.
  RAN_LOCAL_HEAD="$temp" RAY_ADDRESS="127.0.0.1:${port}" PATH="${bin}:${PATH}" "${bin}/ray" start --head \
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
  pids="$(head_pids)"
  if [[ -z "$pids" ]]; then
    echo "no head running (temp dir ${temp})"
    return 0
  fi
  # SIGTERM lets the raylet and GCS shut down in order; whatever is left after 10 s is killed.
  local first="$pids"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  local deadline=$((SECONDS + 10))
  while [[ -n "$(head_pids)" && $SECONDS -lt $deadline ]]; do
    sleep 0.5
  done
  # The processes seen at first too: orphans of a killed parent no longer descend from the head.
  pids="$(printf '%s\n' $first $(head_pids) | sort -u)"
  # shellcheck disable=SC2086
  [[ -n "$pids" ]] && { kill -KILL $pids 2>/dev/null || true; }
  sleep 0.5
  [[ -z "$(head_pids)" ]] || die "some processes survived: $(head_pids | tr '\n' ' ')"
  echo "stopped the head (temp dir ${temp})"
}

status() {
  local pids
  pids="$(head_pids)"
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
