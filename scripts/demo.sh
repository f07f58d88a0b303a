#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2317  # (SC2317: functions run from traps)
# A narrated end-to-end run of tidemark (used by `make demo`).
#
# Starts a private, throw-away redis-server and `tidemark run` against it,
# then walks through the seed scenario:
#   add a@1, b@2, c@3; watermark 2  -> a and b are released, c waits
#   add d@2 (late: ts <= watermark)  -> released at once
#   watermark 3                      -> c is released, the schedule is empty
# Every expectation is checked (polling with a deadline, DEMO_TIMEOUT seconds,
# default 15); the script exits non-zero as soon as one is not met. Finally the
# daemon is stopped with SIGTERM and must exit with status 0.
#
# Environment: TIDEMARK_BIN (default target/release/tidemark),
#              TIDEMARK_CONFIG (default config/tidemark.toml), DEMO_TIMEOUT.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${TIDEMARK_BIN:-$ROOT/target/release/tidemark}
CONFIG=${TIDEMARK_CONFIG:-$ROOT/config/tidemark.toml}
TIMEOUT=${DEMO_TIMEOUT:-15}

NS=default
IN="tidemark:{$NS}:in"
OUT="tidemark:{$NS}:out"
SCHED="tidemark:{$NS}:sched"
WM="tidemark:{$NS}:wm"
DEAD="tidemark:{$NS}:dead"

if [[ ! -x "$BIN" ]]; then
  echo "demo: $BIN not found: build it first (make build), or use make demo" >&2
  exit 1
fi
TM_ARGS=(--namespace "$NS")
if [[ -f "$CONFIG" ]]; then
  TM_ARGS=(--config "$CONFIG" "${TM_ARGS[@]}")
fi

# shellcheck source=lib-redis.sh disable=SC1091  # (SC1091: followed with shellcheck -x)
source "$ROOT/scripts/lib-redis.sh"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tidemark-demo.XXXXXX")
DAEMON_LOG=$WORK/tidemark.log
DAEMON_PID=""

cleanup() {
  local rc=$?
  if [[ -n "$DAEMON_PID" ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    local deadline=$((SECONDS + 5))
    while kill -0 "$DAEMON_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
  fi
  redis_stop
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- output helpers ---------------------------------------------------------

# Prints arguments as a shell command line, quoting where needed.
quote_args() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=" $a"
    else
      out+=" '${a//\'/\'\\\'\'}'"
    fi
  done
  printf '%s' "${out# }"
}

if [[ -t 1 ]]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi
step() { printf '\n%s## %s%s\n' "$BOLD" "$*" "$PLAIN"; }
note() { printf '   %s\n' "$*"; }
ok() { printf '   ok: %s\n' "$*"; }

# `tidemark ARGS...`: shown, then run against the private Redis.
tm() {
  printf '$ %s\n' "$(quote_args tidemark "$@")"
  "$BIN" "${TM_ARGS[@]}" "$@"
}

# `redis-cli ARGS...`: shown, then run (formatted like in a terminal).
rcli() {
  printf '$ %s\n' "$(quote_args redis-cli -p "$REDIS_PORT" "$@")"
  redis-cli -p "$REDIS_PORT" --no-raw "$@"
}

# Quiet redis-cli, for checks.
q() { redis-cli -p "$REDIS_PORT" "$@"; }

strip_ansi() { sed $'s/\033\\[[0-9;]*m//g'; }

show_daemon_log() {
  echo "--- tidemark log (last 40 lines) ---" >&2
  tail -n 40 "$DAEMON_LOG" | strip_ansi >&2 || true
  echo "------------------------------------" >&2
}

die() {
  printf '\ndemo: FAILED: %s\n' "$*" >&2
  show_daemon_log
  exit 1
}

# --- checks -------------------------------------------------------------------

# The `id` field of every output entry, in stream order, space-separated.
OUT_IDS_LUA='
local ids = {}
for _, entry in ipairs(redis.call("XRANGE", KEYS[1], "-", "+")) do
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == "id" then ids[#ids + 1] = fields[i + 1]; break end
  end
end
return ids'
out_ids() { q EVAL "$OUT_IDS_LUA" 1 "$OUT" | tr '\n' ' ' | sed 's/ $//'; }

daemon_alive() { [[ -n "$DAEMON_PID" ]] && kill -0 "$DAEMON_PID" 2>/dev/null; }

# wait_for DESCRIPTION COMMAND...: polls COMMAND until it succeeds; fails the
# demo after TIMEOUT seconds or as soon as the daemon dies.
wait_for() {
  local what=$1
  shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@"; do
    daemon_alive || die "tidemark exited while waiting for: $what"
    ((SECONDS < deadline)) || die "timed out after ${TIMEOUT}s waiting for: $what"
    sleep 0.05
  done
}
out_len_is() { [[ "$(q XLEN "$OUT")" == "$1" ]]; }
sched_len_is() { [[ "$(q ZCARD "$SCHED")" == "$1" ]]; }
input_group_exists() { q XINFO GROUPS "$IN" 2>/dev/null | grep -qx name; }

expect_out_ids() {
  local got
  got=$(out_ids)
  [[ "$got" == "$1" ]] || die "expected the output stream to hold [$1], it holds [$got]"
  ok "output stream holds exactly: $1"
}

# --- the scenario -------------------------------------------------------------

step "Start a private Redis and the daemon"
redis_start
export REDIS_URL=$REDIS_LOCAL_URL
note "Redis: $REDIS_URL (throw-away, data in $REDIS_DIR)"
note "tidemark = $(quote_args "$BIN" "${TM_ARGS[@]}"), with REDIS_URL set"
# The output group "readers" stands for a downstream consumer: it is created
# at startup, and the output stream is never trimmed below what it has read.
# In its own session (setsid) so that a Ctrl-C reaches it only via cleanup.
RUN_ARGS=(--http off run --consumer demo --group readers)
if command -v setsid >/dev/null 2>&1; then
  NO_COLOR=1 setsid "$BIN" "${TM_ARGS[@]}" "${RUN_ARGS[@]}" >"$DAEMON_LOG" 2>&1 </dev/null &
else
  NO_COLOR=1 "$BIN" "${TM_ARGS[@]}" "${RUN_ARGS[@]}" >"$DAEMON_LOG" 2>&1 </dev/null &
fi
DAEMON_PID=$!
printf '$ %s &    # pid %s, log in %s\n' "$(quote_args tidemark "${RUN_ARGS[@]}")" "$DAEMON_PID" "$DAEMON_LOG"
wait_for "the daemon to create its consumer group on $IN" input_group_exists
ok "daemon is up (consumer group on $IN exists)"

step "Add three elements: a@1, b@2, c@3 (no watermark yet, so nothing is due)"
tm add --id a --ts 1 --field note=alpha
tm add --id b --ts 2 --field note=bravo
tm add --id c --ts 3 --field note=charlie
wait_for "3 scheduled elements in $SCHED" sched_len_is 3
rcli ZRANGE "$SCHED" 0 -1 WITHSCORES
out_len_is 0 || die "nothing may be released before the first watermark, but $OUT has $(q XLEN "$OUT") entries"
ok "all three are scheduled, the output stream is empty"

step "Watermark 2: elements with ts <= 2 are due"
tm watermark 2
wait_for "2 entries in $OUT" out_len_is 2
rcli XRANGE "$OUT" - +
expect_out_ids "a b"

step "Add d@2 after the watermark passed 2: a late element is released at once"
tm add --id d --ts 2 --field note=delta
wait_for "3 entries in $OUT" out_len_is 3
rcli XREVRANGE "$OUT" + - COUNT 1
expect_out_ids "a b d"

step "c (ts 3) is still waiting for the watermark"
rcli ZRANGE "$SCHED" 0 -1 WITHSCORES
[[ "$(q ZRANGE "$SCHED" 0 -1 WITHSCORES | tr '\n' ' ')" == "c 3 " ]] ||
  die "expected only c (score 3) in $SCHED"
ok "the schedule holds only c"
tm status

step "Watermark 3: c is released, the schedule ends empty"
tm watermark 3
wait_for "4 entries in $OUT" out_len_is 4
wait_for "an empty $SCHED" sched_len_is 0
rcli XRANGE "$OUT" - +
expect_out_ids "a b d c"
rcli ZCARD "$SCHED"
rcli GET "$WM"
[[ "$(q GET "$WM")" == 3 ]] || die "expected the watermark to be 3"
[[ "$(q XLEN "$DEAD")" == 0 ]] || die "unexpected dead letters in $DEAD"
ok "schedule empty, watermark 3, no dead letters"
tm status --json

step "Stop the daemon with SIGTERM"
printf '$ kill -TERM %s\n' "$DAEMON_PID"
kill -TERM "$DAEMON_PID"
deadline=$((SECONDS + TIMEOUT))
while daemon_alive; do
  ((SECONDS < deadline)) || die "tidemark did not exit within ${TIMEOUT}s of SIGTERM"
  sleep 0.05
done
status=0
wait "$DAEMON_PID" || status=$?
DAEMON_PID=""
((status == 0)) || die "tidemark exited with status $status after SIGTERM (expected 0)"
ok "tidemark exited with status 0"
note "its log ended with:"
tail -n 3 "$DAEMON_LOG" | strip_ansi | sed 's/^/     | /'

printf '\ndemo: OK\n'
