-- prelude.lua: helpers shared by every tidemark script. The Rust side
-- prepends this file to each script's source, so it is not a script itself.
--
-- A body (payload blob) is `ts` and its value, then the element's payload
-- field/value pairs in order, as concatenated MessagePack `str` objects
-- (see src/core/codec.rs, src/store/batch.rs). Elements without payload
-- have no body.

local call = redis.call
local unpack = unpack
local msgunpack = cmsgpack.unpack

-- Producers that retry (daemon.dedup_window): a script that calls
-- dedup_start records every element it releases in a sorted set, element
-- id -> release time (the server's TIME, ms), and an add of an id released
-- less than the window ago is dropped (recently_released). Entries older
-- than the window are pruned, oldest first, at most DEDUP_PRUNE per call,
-- so the set holds about (releases per window) ids. Off (nil) otherwise.
local dedup = nil
local DEDUP_PRUNE = 2000

local function server_ms()
  if redis.replicate_commands then
    -- Redis 6.2: replicate the script's effects, so TIME may precede
    -- writes. A no-op from Redis 7.0 on, where that is the only mode.
    redis.replicate_commands()
  end
  local t = call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Turns dedup on for this call: `key` the set, `window` in ms (0: off).
local function dedup_start(key, window)
  if not window or window <= 0 then
    return
  end
  local now = server_ms()
  local cutoff = string.format('%.0f', now - window)
  dedup = {key = key, now = string.format('%.0f', now), cutoff = tonumber(cutoff)}
  local old = call('ZCOUNT', key, '-inf', '(' .. cutoff)
  if old > 0 then
    call('ZREMRANGEBYRANK', key, 0, math.min(old, DEDUP_PRUNE) - 1)
  end
end

-- Records released element ids (a list) with the current time.
local function dedup_record(ids, n)
  if not dedup or n == 0 then
    return
  end
  local args = {}
  for i = 1, n do
    args[2 * i - 1] = dedup.now
    args[2 * i] = ids[i]
  end
  call('ZADD', dedup.key, unpack(args, 1, 2 * n))
end

-- Whether element `id` was released less than the window ago.
local function recently_released(id)
  local at = call('ZSCORE', dedup.key, id)
  return at and tonumber(at) >= dedup.cutoff
end

-- Releases up to `limit` due elements (score <= wm) into `out`, in
-- (ts, id) order. `wm` is the watermark as a decimal string, or false.
-- The due elements are the lowest-ranked ones, so one ZREMRANGEBYRANK
-- removes them; bodies exist only for elements with a payload, and when
-- none exists at all the body hash is not touched.
--
-- A body starts with the `ts` field and its value, then the payload
-- ('ts' <ts> <field> <value> …, see src/store/batch.rs), so it is the
-- XADD argument list after the id as it stands: no score is fetched or
-- printed for it (printing scores is the costliest step of a release
-- otherwise). Bodies written before ts moved into them (payload only) and
-- elements without a body take ts from the scores, fetched once per call
-- when one of them is due. No payload field can be called `ts` (reserved),
-- so a body's first three bytes tell the two forms apart.
-- Returns: released count, and whether due elements remain.
-- A body that holds ts first starts with the MessagePack `str` "ts"
-- (0xa2 't' 's'); compared byte by byte, so no substring is made per element.
local byte = string.byte

local function any_due(sched, wm)
  return #call('ZRANGE', sched, '-inf', wm, 'BYSCORE', 'LIMIT', 0, 1) > 0
end

local function release_due(sched, body, out, wm, limit)
  if not wm then
    return 0, false
  end
  if limit <= 0 then
    -- The call's budget is spent: report what is due so the caller stops
    -- applying input until a release call has caught up.
    return 0, any_due(sched, wm)
  end
  local n
  if call('HLEN', body) == 0 then
    local due = call('ZRANGE', sched, '-inf', wm, 'BYSCORE', 'LIMIT', 0, limit, 'WITHSCORES')
    n = #due / 2
    if n == 0 then
      return 0, false
    end
    for i = 1, #due, 2 do
      -- Scores of integers up to 2^53 print as plain integers.
      call('XADD', out, '*', 'id', due[i], 'ts', due[i + 1])
    end
    if dedup then
      local ids = {}
      for i = 1, n do
        ids[i] = due[2 * i - 1]
      end
      dedup_record(ids, n)
    end
  else
    local ids = call('ZRANGE', sched, '-inf', wm, 'BYSCORE', 'LIMIT', 0, limit)
    n = #ids
    if n == 0 then
      return 0, false
    end
    local blobs = call('HMGET', body, unpack(ids))
    -- The same range with scores, fetched when an element needs its ts.
    local due
    for i = 1, n do
      local blob = blobs[i]
      local a, b, c
      if blob then
        a, b, c = byte(blob, 1, 3)
      end
      if a == 162 and b == 116 and c == 115 then
        call('XADD', out, '*', 'id', ids[i], msgunpack(blob))
      else
        due = due or call('ZRANGE', sched, '-inf', wm, 'BYSCORE', 'LIMIT', 0, limit, 'WITHSCORES')
        if blob then
          call('XADD', out, '*', 'id', ids[i], 'ts', due[2 * i], msgunpack(blob))
        else
          call('XADD', out, '*', 'id', ids[i], 'ts', due[2 * i])
        end
      end
    end
    call('HDEL', body, unpack(ids))
    dedup_record(ids, n)
  end
  call('ZREMRANGEBYRANK', sched, 0, n - 1)
  return n, n == limit and any_due(sched, wm)
end

-- Compares two stream entry ids ("<ms>-<seq>", decimal without leading
-- zeros): -1, 0 or 1. Numbers are compared as strings so that sequence
-- numbers above 2^53 stay exact.
local function cmp_num(a, b)
  if #a ~= #b then
    return #a < #b and -1 or 1
  end
  if a == b then
    return 0
  end
  return a < b and -1 or 1
end

local function cmp_id(a, b)
  if a == b then
    return 0
  end
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  local c = cmp_num(am, bm)
  if c ~= 0 then
    return c
  end
  return cmp_num(as, bs)
end

-- Clock mode: raises the watermark (key `wmkey`) to the Redis server's
-- TIME in milliseconds; never lowers it, so explicit watermark ops may run
-- ahead. Returns the watermark (decimal string) and the server time (ms).
local function advance_to_server_time(wmkey)
  local now = server_ms()
  local wm = call('GET', wmkey)
  if not wm or tonumber(wm) < now then
    wm = string.format('%.0f', now)
    call('SET', wmkey, wm)
  end
  return wm, now
end
