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
# is the daemon's. Unless groups are chosen (--group, TIDEMARK__DAEMON__GROUPS
# or daemon.groups in the config file), the daemon creates the output group
# "billing" that the README's examples read.
#
# Started in the background from a script (`make run &`), the shell starts it
# with SIGINT ignored, which no trap can undo: stop it with SIGTERM instead
# (`kill PID`, the banner prints the PID; `kill` of make works too, make
# passes SIGTERM on).
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

# The output group the README's examples read, unless groups are chosen.
GROUP_ARGS=()
GROUP_NOTE="Output groups: as configured (--group, TIDEMARK__DAEMON__GROUPS or daemon.groups)."
chosen=false
[[ -n "${TIDEMARK__DAEMON__GROUPS:-}" ]] && chosen=true
for arg in "$@"; do
  case "$arg" in
    --group | --group=*) chosen=true ;;
  esac
done
if [[ -f "$CONFIG" ]] && grep -Eq '^[[:space:]]*groups[[:space:]]*=[[:space:]]*\[[[:space:]]*[^][:space:]]' "$CONFIG"; then
  chosen=true
fi
if [[ "$chosen" == false ]]; then
  GROUP_ARGS=(--group billing)
  GROUP_NOTE="Output group \"billing\" created on 'tidemark:{default}:out' (make run ARGS=\"--group G\" to choose others)."
fi

# SIGINT ignored on entry (started in the background by a script) cannot be
# trapped: say how to stop instead.
if [[ "$(trap -p INT)" == "trap -- '' SIGINT" ]]; then
  STOP="Stop with: kill $$   (SIGTERM; SIGINT is ignored here: started in the background by a script)"
else
  STOP="Stop with Ctrl-C, or from another shell: kill $$   (SIGTERM)"
fi

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
$GROUP_NOTE
Try, in another terminal:
  redis-cli -p $P XADD 'tidemark:{default}:in' '*' op add id hello ts 1 msg world
  redis-cli -p $P XADD 'tidemark:{default}:in' '*' op watermark ts 1
  redis-cli -p $P XRANGE 'tidemark:{default}:out' - +
  redis-cli -p $P XREADGROUP GROUP billing worker-1 COUNT 10 STREAMS 'tidemark:{default}:out' '>'
  REDIS_URL=$REDIS_URL $BIN status
  REDIS_URL=$REDIS_URL $BIN consume --group reminders -- python3 $ROOT/examples/remind.py
$DASHBOARD
$STOP
------------------------------------------------------------------------------
BANNER

# The daemon runs as a background child so that this script keeps control
# (the EXIT trap stops Redis). In its own session where setsid exists, so a
# terminal Ctrl-C reaches it exactly once: forwarded by the trap below.
if command -v setsid >/dev/null 2>&1; then
  setsid "$BIN" ${CONFIG_ARGS[@]+"${CONFIG_ARGS[@]}"} ${HTTP_ARGS[@]+"${HTTP_ARGS[@]}"} run \
    ${GROUP_ARGS[@]+"${GROUP_ARGS[@]}"} "$@" </dev/null &
else
  "$BIN" ${CONFIG_ARGS[@]+"${CONFIG_ARGS[@]}"} ${HTTP_ARGS[@]+"${HTTP_ARGS[@]}"} run \
    ${GROUP_ARGS[@]+"${GROUP_ARGS[@]}"} "$@" </dev/null &
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
