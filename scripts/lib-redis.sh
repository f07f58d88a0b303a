# shellcheck shell=bash disable=SC2034  # the REDIS_* variables are read by the sourcing scripts
# Sourced helper: start and stop a private, throw-away redis-server.
#
#   source scripts/lib-redis.sh
#   trap redis_stop EXIT     # or call redis_stop from your own EXIT trap
#   redis_start              # sets REDIS_PORT, REDIS_PID, REDIS_DIR, REDIS_LOCAL_URL
#
# The server listens on 127.0.0.1 on a free port, keeps its data (AOF only,
# no RDB snapshots) in a mktemp -d directory and is not daemonized: it runs
# as a background child of the calling script. Where setsid(1) exists it runs
# in its own session, so a Ctrl-C in the terminal does not shut it down
# before the tidemark daemon has stopped; redis_stop shuts it down.

REDIS_PORT=""
REDIS_PID=""
REDIS_DIR=""
REDIS_LOCAL_URL=""

_redis_log() { printf '%s\n' "$*" >&2; }

# Prints a TCP port that is currently free on 127.0.0.1.
redis_free_port() {
  local port
  if command -v python3 >/dev/null 2>&1 &&
    port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])' 2>/dev/null) &&
    [[ -n "$port" ]]; then
    echo "$port"
  else
    echo $((20000 + RANDOM % 40000))
  fi
}

# Succeeds when the server on $REDIS_PORT answers PING and is our process
# (not some other Redis that already owned the port).
_redis_is_ours() {
  [[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]] || return 1
  local pid
  pid=$(redis-cli -p "$REDIS_PORT" info server 2>/dev/null | tr -d '\r' | sed -n 's/^process_id://p')
  [[ "$pid" == "$REDIS_PID" ]]
}

# Starts one redis-server on a fresh port; waits for PING (REDIS_START_TIMEOUT
# seconds, default 10). Returns 2 if the port was taken (caller may retry).
_redis_start_once() {
  REDIS_PORT=$(redis_free_port)
  local args=(--port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes
    --dir "$REDIS_DIR" --daemonize no)
  : >"$REDIS_DIR/redis.log"
  if command -v setsid >/dev/null 2>&1; then
    setsid redis-server "${args[@]}" >>"$REDIS_DIR/redis.log" 2>&1 </dev/null &
  else
    redis-server "${args[@]}" >>"$REDIS_DIR/redis.log" 2>&1 </dev/null &
  fi
  REDIS_PID=$!

  local deadline=$((SECONDS + ${REDIS_START_TIMEOUT:-10}))
  while ((SECONDS < deadline)); do
    if _redis_is_ours; then
      return 0
    fi
    if ! kill -0 "$REDIS_PID" 2>/dev/null; then
      wait "$REDIS_PID" 2>/dev/null || true
      REDIS_PID=""
      if grep -qi 'address already in use' "$REDIS_DIR/redis.log"; then
        return 2
      fi
      return 1
    fi
    sleep 0.1
  done
  return 1
}

# Starts the private server; on failure prints its log and returns 1.
redis_start() {
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    _redis_log "redis-server/redis-cli not found on PATH (run scripts/ensure-redis.sh)"
    return 1
  fi
  REDIS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/tidemark-redis.XXXXXX")
  local attempt rc
  for attempt in 1 2 3 4 5; do
    rc=0
    _redis_start_once || rc=$?
    if ((rc == 0)); then
      REDIS_LOCAL_URL="redis://127.0.0.1:$REDIS_PORT"
      return 0
    fi
    if ((rc == 2)); then
      _redis_log "port $REDIS_PORT was taken, retrying with another one (attempt $attempt)"
      continue
    fi
    break
  done
  _redis_log "private redis-server did not become ready on port $REDIS_PORT; its log ($REDIS_DIR/redis.log):"
  sed 's/^/  | /' "$REDIS_DIR/redis.log" >&2 || true
  redis_stop
  return 1
}

# Stops the private server (if running) and removes its directory. Idempotent.
redis_stop() {
  if [[ -n "${REDIS_PID:-}" ]]; then
    if kill -0 "$REDIS_PID" 2>/dev/null; then
      redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || kill "$REDIS_PID" 2>/dev/null || true
      local deadline=$((SECONDS + 5))
      while kill -0 "$REDIS_PID" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.1
      done
      kill -9 "$REDIS_PID" 2>/dev/null || true
    fi
    wait "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=""
  fi
  if [[ -n "${REDIS_DIR:-}" ]]; then
    rm -rf "$REDIS_DIR"
    REDIS_DIR=""
  fi
}
