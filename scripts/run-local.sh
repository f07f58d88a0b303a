#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2317  # (SC2317: functions run from traps)
# Run the tidemark daemon locally in the foreground (used by `make run`).
#
#   scripts/run-local.sh [RUN-ARGS...]     e.g. --consumer me --group billing
#
# With REDIS_URL set, or --redis-url among the arguments, it simply runs
#   target/release/tidemark --config config/tidemark.toml run RUN-ARGS...
# against that Redis. Otherwise it starts a private, throw-away redis-server
# on a free port (data in a temp dir), prints ready-to-paste redis-cli lines,
# runs the daemon against it and, when the daemon exits (Ctrl-C / SIGTERM are
# forwarded to it), stops that Redis and removes the temp dir. The exit status
# is the daemon's.
#
# Environment: TIDEMARK_BIN (default target/release/tidemark),
#              TIDEMARK_CONFIG (default config/tidemark.toml).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${TIDEMARK_BIN:-$ROOT/target/release/tidemark}
CONFIG=${TIDEMARK_CONFIG:-$ROOT/config/tidemark.toml}

log() { printf 'run-local: %s\n' "$*" >&2; }

if [[ ! -x "$BIN" ]]; then
  log "$BIN not found: build it first (make build), or use make run"
  exit 1
fi
CONFIG_ARGS=()
if [[ -f "$CONFIG" ]]; then
  CONFIG_ARGS=(--config "$CONFIG")
else
  log "warning: $CONFIG not found, running with built-in defaults"
fi

# An explicit Redis: nothing to manage, hand over to the daemon.
external=false
[[ -n "${REDIS_URL:-}" ]] && external=true
for arg in "$@"; do
  case "$arg" in
    --redis-url | --redis-url=*) external=true ;;
  esac
done
run_external() {
  exec "$BIN" ${CONFIG_ARGS[@]+"${CONFIG_ARGS[@]}"} run "$@"
}
if [[ "$external" == true ]]; then
  run_external "$@"
fi

# A private Redis for this run.
"$ROOT/scripts/ensure-redis.sh" >/dev/null
# shellcheck source=lib-redis.sh disable=SC1091  # (SC1091: followed with shellcheck -x)
source "$ROOT/scripts/lib-redis.sh"

DAEMON_PID=""
cleanup() {
  local rc=$?
  trap - INT TERM HUP
  if [[ -n "$DAEMON_PID" ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
  fi
  if [[ -n "${REDIS_PID:-}" ]]; then
    local port=${REDIS_PORT:-} dir=${REDIS_DIR:-}
    redis_stop
    log "stopped the private redis-server on port $port and removed $dir"
  fi
  exit "$rc"
}
trap cleanup EXIT

redis_start
export REDIS_URL=$REDIS_LOCAL_URL
P=$REDIS_PORT

# The HTTP endpoint (dashboard, /metrics, /healthz, /readyz) on a free port
# too, unless the caller chose an address.
HTTP_ARGS=()
if [[ -z "${TIDEMARK__HTTP__ADDR:-}" && " $* " != *" --http"* ]]; then
  HTTP_PORT=$(redis_free_port)
  HTTP_ARGS=(--http "127.0.0.1:$HTTP_PORT")
  DASHBOARD="Dashboard: http://127.0.0.1:$HTTP_PORT/   (also /metrics, /healthz, /readyz)"
else
  DASHBOARD="Dashboard: on the address given with --http / TIDEMARK__HTTP__ADDR"
fi
cat <<BANNER
------------------------------------------------------------------------------
tidemark: private Redis at $REDIS_URL (data in $REDIS_DIR, removed on exit)
Try, in another terminal:
  redis-cli -p $P XADD 'tidemark:{default}:in' '*' op add id hello ts 1 msg world
  redis-cli -p $P XADD 'tidemark:{default}:in' '*' op watermark ts 1
  redis-cli -p $P XRANGE 'tidemark:{default}:out' - +
  REDIS_URL=$REDIS_URL $BIN status
$DASHBOARD
Stop with Ctrl-C.
------------------------------------------------------------------------------
BANNER

# The daemon runs as a background child so that this script keeps control
# (the EXIT trap stops Redis). In its own session where setsid exists, so a
# terminal Ctrl-C reaches it exactly once: forwarded by the trap below.
if command -v setsid >/dev/null 2>&1; then
  setsid "$BIN" ${CONFIG_ARGS[@]+"${CONFIG_ARGS[@]}"} ${HTTP_ARGS[@]+"${HTTP_ARGS[@]}"} run "$@" </dev/null &
else
  "$BIN" ${CONFIG_ARGS[@]+"${CONFIG_ARGS[@]}"} ${HTTP_ARGS[@]+"${HTTP_ARGS[@]}"} run "$@" </dev/null &
fi
DAEMON_PID=$!

forwarded=false
forward() {
  forwarded=true
  kill -s "$1" "$DAEMON_PID" 2>/dev/null || true
}
trap 'forward INT' INT
trap 'forward TERM' TERM
trap 'forward TERM' HUP

# `wait` returns early (status > 128) when a trapped signal arrives; the
# daemon's real status is then collected by waiting again.
status=0
while :; do
  forwarded=false
  if wait "$DAEMON_PID"; then status=0; else status=$?; fi
  if [[ "$forwarded" == true ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    continue
  fi
  if [[ "$forwarded" == true ]]; then
    # The daemon may already have exited: its status is still on record.
    if wait "$DAEMON_PID" 2>/dev/null; then status=0; else
      rc=$?
      ((rc == 127)) || status=$rc
    fi
  fi
  break
done
DAEMON_PID=""
log "tidemark exited with status $status"
exit "$status"
