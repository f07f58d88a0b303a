-- prelude.lua: helpers shared by every tidemark script. The Rust side
-- prepends this file to each script's source, so it is not a script itself.
--
-- Payload blobs are concatenated MessagePack `str` objects: ts, then the
-- payload field/value pairs in order (see src/core/codec.rs).

local call = redis.call
local unpack = unpack
local msgunpack = cmsgpack.unpack

-- Releases up to `limit` due elements (score <= wm) into `out`, in
-- (ts, id) order. `wm` is the watermark as a decimal string, or false.
-- Returns: released count, and whether due elements remain.
local function release_due(sched, body, out, wm, limit)
  if not wm or limit <= 0 then
    return 0, false
  end
  local ids = call('ZRANGE', sched, '-inf', wm, 'BYSCORE', 'LIMIT', 0, limit)
  local n = #ids
  if n == 0 then
    return 0, false
  end
  local blobs = call('HMGET', body, unpack(ids))
  for i = 1, n do
    local blob = blobs[i]
    if blob then
      call('XADD', out, '*', 'id', ids[i], 'ts', msgunpack(blob))
    else
      -- The body was removed behind our back: release what we know.
      local score = call('ZSCORE', sched, ids[i])
      call('XADD', out, '*', 'id', ids[i], 'ts', string.format('%d', tonumber(score)))
    end
  end
  call('ZREM', sched, unpack(ids))
  call('HDEL', body, unpack(ids))
  local more = false
  if n == limit then
    more = #call('ZRANGE', sched, '-inf', wm, 'BYSCORE', 'LIMIT', 0, 1) > 0
  end
  return n, more
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
