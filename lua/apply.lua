-- apply.lua: applies a batch of input entries and acknowledges them in one
-- atomic step, in input-stream order, each at most once.
--
-- KEYS[1]: the input stream
-- KEYS[2]: the watermark (string)
-- KEYS[3]: the schedule (sorted set, score = ts)
-- KEYS[4]: the bodies (hash, element id -> payload blob; only elements with a payload)
-- KEYS[5]: the output stream
-- KEYS[6]: the dead-letter stream
-- KEYS[7]: clock mode's next-due marker (string; see clock.lua)
-- ARGV[1]: the input consumer group
-- ARGV[2]: max elements released by watermark advances in this call
-- ARGV[3]: the number of entries that follow
-- ARGV[4]: clock mode: '1' raises the watermark to the server's TIME (ms)
--   first, and an add scheduled before the marker in KEYS[7] lowers the
--   marker and is announced on the channel ARGV[5] to wake the clock
--   leader; '0' leaves KEYS[7] and ARGV[5] unused
-- ARGV[5]: clock mode's wake-up channel
-- ARGV[6..]: the entries, sorted by entry id, each one of
--   <entry id> 'A' <element id> <ts> <payload blob, '' if none>   (add)
--   <entry id> 'C' <element id>                                   (cancel)
--   <entry id> 'W' <ts>                                           (watermark)
--   <entry id> 'D' <reason> <detail> <blob: original fields>      (dead letter)
--   <entry id> 'X'                                                (entry deleted from the stream)
-- Returns: {processed, released, more_due, blocked, adds, cancels,
--           watermarks, dead, late}
--   processed: how many leading entries are done (applied now, or found
--     already applied); the caller keeps the rest for a later call.
--   more_due: due elements remain; call release.lua before more input.
--   blocked: an older input entry is still pending elsewhere, so the
--     entries from `processed` on must wait for it (guarantee 4).
--
-- Invariant kept between ops: nothing in the schedule is due. An op after a
-- watermark advance that left due elements is not applied in this call.

local input, wmkey, sched, body, out, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local group = ARGV[1]
local budget = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local clock = ARGV[4] == '1'

local wm
if clock then
  wm = advance_to_server_time(wmkey)
else
  wm = call('GET', wmkey)
end
local released, more = release_due(sched, body, out, wm, budget)
budget = budget - released
if more then
  return {0, released, 1, 0, 0, 0, 0, 0, 0}
end
local wmn = wm and tonumber(wm)
-- Whether any body may exist: if not, payload-less adds and cancels need
-- not delete one.
local bodies = call('HLEN', body) > 0

-- The oldest pending entries of the whole group, in id order. Walking our
-- batch against them tells, per entry, whether it is still pending (apply
-- it), already acknowledged (a redelivery: skip it), or preceded by an
-- older entry pending elsewhere (stop: order first).
local pending = call('XPENDING', input, group, '-', '+', count)
local k = 1

-- Scheduling adds are buffered so a run of them costs one ZADD, one HSET
-- and one HDEL. An id seen twice in a run flushes first, so the later add
-- wins in every key.
local zadd, hset, hdel, buffered = {}, {}, {}, {}
local function flush()
  if #zadd > 0 then
    call('ZADD', sched, unpack(zadd))
    if #hset > 0 then
      call('HSET', body, unpack(hset))
    end
    if #hdel > 0 then
      call('HDEL', body, unpack(hdel))
    end
    zadd, hset, hdel, buffered = {}, {}, {}, {}
  end
end

local function emit(id, ts, blob)
  if blob == '' then
    call('XADD', out, '*', 'id', id, 'ts', ts)
  else
    call('XADD', out, '*', 'id', id, 'ts', ts, msgunpack(blob))
  end
end

local acks = {}
local processed, blocked = 0, 0
local adds, cancels, watermarks, deadn, late = 0, 0, 0, 0, 0
-- Clock mode: the earliest ts scheduled by this call (number and text).
local earliest, earliest_ts
local i = 6
for _ = 1, count do
  local sid, code = ARGV[i], ARGV[i + 1]
  local width = 3
  if code == 'A' or code == 'D' then
    width = 5
  elseif code == 'X' then
    width = 2
  end
  local p = pending[k]
  local c = -1
  if p then
    c = cmp_id(sid, p[1])
  end
  if c > 0 then
    blocked = 1
    break
  end
  local stop = false
  if c == 0 then
    k = k + 1
    acks[#acks + 1] = sid
    if code == 'A' then
      local id, ts, blob = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
      adds = adds + 1
      if wmn and tonumber(ts) <= wmn then
        -- Late: released at once, replacing any scheduled version.
        flush()
        if call('ZREM', sched, id) == 1 and bodies then
          call('HDEL', body, id)
        end
        emit(id, ts, blob)
        late = late + 1
      else
        if buffered[id] then
          flush()
        end
        buffered[id] = true
        if clock and (not earliest or tonumber(ts) < earliest) then
          earliest, earliest_ts = tonumber(ts), ts
        end
        zadd[#zadd + 1] = ts
        zadd[#zadd + 1] = id
        if blob ~= '' then
          hset[#hset + 1] = id
          hset[#hset + 1] = blob
          bodies = true
        elseif bodies then
          hdel[#hdel + 1] = id
        end
      end
    elseif code == 'C' then
      flush()
      if call('ZREM', sched, ARGV[i + 2]) == 1 and bodies then
        call('HDEL', body, ARGV[i + 2])
      end
      cancels = cancels + 1
    elseif code == 'W' then
      local ts = ARGV[i + 2]
      watermarks = watermarks + 1
      if not wmn or tonumber(ts) > wmn then
        flush()
        call('SET', wmkey, ts)
        wm, wmn = ts, tonumber(ts)
        local n, m = release_due(sched, body, out, wm, budget)
        released = released + n
        budget = budget - n
        more = m
        stop = m
      end
    elseif code == 'D' then
      call('XADD', dead, '*', 'reason', ARGV[i + 2], 'detail', ARGV[i + 3],
        'origin', 'in', 'origin_id', sid, msgunpack(ARGV[i + 4]))
      deadn = deadn + 1
    end
    -- 'X': the entry was deleted from the stream; acknowledging is all.
  end
  processed = processed + 1
  i = i + width
  if stop then
    break
  end
end

flush()
if #acks > 0 then
  call('XACK', input, group, unpack(acks))
end
if earliest then
  -- Wake the clock leader only when it sleeps past this element.
  local marker = call('GET', KEYS[7])
  if not marker or earliest < tonumber(marker) then
    call('SET', KEYS[7], earliest_ts)
    call('PUBLISH', ARGV[5], earliest_ts)
  end
end
return {processed, released, more and 1 or 0, blocked, adds, cancels, watermarks, deadn, late}
