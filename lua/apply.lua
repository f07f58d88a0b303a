-- apply.lua: applies a batch of input entries and acknowledges them in one
-- atomic step, in input-stream order, each at most once.
--
-- KEYS[1]: the input stream
-- KEYS[2]: the watermark (string)
-- KEYS[3]: the schedule (sorted set, score = ts)
-- KEYS[4]: the bodies (hash, element id -> 'ts' <ts> <payload…> as in
--   prelude.lua; only elements with a payload)
-- KEYS[5]: the output stream
-- KEYS[6]: the dead-letter stream
-- KEYS[7]: clock mode's next-due marker (string; see clock.lua)
-- KEYS[8]: the partition's owner lock (string: the owning daemon's token)
-- KEYS[9]: the ids released lately (sorted set, id -> release time in ms;
--   see dedup_start in prelude.lua)
-- ARGV[1]: the input consumer group
-- ARGV[2]: max elements released by watermark advances in this call
-- ARGV[3]: the number of entries that follow
-- ARGV[4]: clock mode: '1' raises the watermark to the server's TIME (ms)
--   first, and an add scheduled before the marker in KEYS[7] lowers the
--   marker and is announced on the channel ARGV[5] to wake the clock
--   leader; '0' leaves KEYS[7] and ARGV[5] unused
-- ARGV[5]: clock mode's wake-up channel
-- ARGV[6]: the caller's owner token: unless '' (no fence), nothing is done
--   and 'fenced' is 1 when KEYS[8] does not hold it (ownership moved to
--   another daemon: a deposed owner that wakes up applies nothing)
-- ARGV[7]: one byte per entry: '1' where another entry id could lie
--   between the previous entry's id and this one's, '0' where the two ids
--   are adjacent (same ms, next seq). The first byte is not used.
-- ARGV[8]: the form of the batch, which is sent once, in one form:
--   'E' (entries): ARGV[9] holds the entries, sorted by entry id, as one
--     MessagePack array of `str` objects (src/core/codec.rs), one run of
--     items per entry, each one of
--     <entry id> 'A' <element id> <ts> <body, '' if no payload>     (add)
--     <entry id> 'C' <element id>                                   (cancel)
--     <entry id> 'W' <ts>                                           (watermark)
--     <entry id> 'D' <reason> <detail> <blob: original fields>      (dead letter)
--     <entry id> 'X'                                                (entry deleted from the stream)
--   'B' (bulk): only adds, each element id once: ARGV[9] the smallest ts,
--     and as sequences of MessagePack `str` objects: ARGV[10] the ZADD
--     arguments (ts, id, …), ARGV[11] the HSET arguments (id, body, …,
--     for adds with a payload), ARGV[12] the ids of adds without
--     payload, ARGV[13] the entry ids, ARGV[14] the pairs of neighbouring
--     entry ids that ARGV[7] marks with '1'
-- ARGV[#ARGV] (the last, after either form): daemon.dedup_window in ms;
--   '0' turns it off (KEYS[9] unused). With a window, an add of an element
--   released less than the window ago is dropped (acknowledged, counted as
--   'duplicates', not applied), and every release is recorded in KEYS[9]
-- Returns: name/value pairs {'processed', n, 'released', n, 'more_due', 0|1,
--   'blocked', 0|1, 'adds', n, 'cancels', n, 'watermarks', n, 'dead', n,
--   'late', n, 'fenced', 0|1, 'duplicates', n}
--   processed: how many leading entries are done (applied now, or found
--     already applied); the caller keeps the rest for a later call.
--   more_due: due elements remain; call release.lua before more input.
--   blocked: an older input entry is still pending elsewhere, so the
--     entries from `processed` on must wait for it (guarantee 4).
--
-- Invariant kept between ops: nothing in the schedule is due. An op after a
-- watermark advance that left due elements is not applied in this call.
--
-- Exactly once and in order rest on the group's pending list: an entry is
-- applied only while it is pending and no older entry is pending outside
-- the batch, and acknowledging it is part of applying it. So an entry
-- leaves the pending list only when applied, and once applied it never
-- returns there; and while an entry is pending, nothing newer can be
-- applied. Hence the fast path: if the oldest pending entry of the whole
-- group is our first entry, every entry of the batch is pending and none
-- was applied (each was delivered after the first, which has been pending
-- ever since), and an entry may be applied unless some other entry is
-- pending between it and the previous one, which can only be where ARGV[7]
-- says an id could lie. Otherwise (a redelivery, a lost reply, another
-- daemon's older entries) the batch is walked against the oldest pending
-- entries one by one.

local input, wmkey, sched, body, out, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local group = ARGV[1]
local budget = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local clock = ARGV[4] == '1'

local function outcome(processed, released, more_due, blocked, adds, cancels, watermarks, deadn, late, dups)
  return {'processed', processed, 'released', released, 'more_due', more_due, 'blocked', blocked,
    'adds', adds, 'cancels', cancels, 'watermarks', watermarks, 'dead', deadn, 'late', late, 'fenced', 0,
    'duplicates', dups or 0}
end

if ARGV[6] ~= '' and call('GET', KEYS[8]) ~= ARGV[6] then
  local r = outcome(0, 0, 0, 0, 0, 0, 0, 0, 0)
  r[#r - 2] = 1
  return r
end

dedup_start(KEYS[9], tonumber(ARGV[#ARGV]))

local wm
if clock then
  wm = advance_to_server_time(wmkey)
else
  wm = call('GET', wmkey)
end

local released, more = release_due(sched, body, out, wm, budget)
budget = budget - released
if more then
  return outcome(0, released, 1, 0, 0, 0, 0, 0, 0)
end
local wmn = wm and tonumber(wm)
-- Whether any body may exist: if not, payload-less adds and cancels need
-- not delete one.
local bodies = call('HLEN', body) > 0

-- Clock mode: wakes the clock leader (channel `channel`) when it sleeps
-- past `earliest` (number and text), the earliest ts scheduled by this
-- call, lowering its marker `marker_key`.
local function wake_clock(marker_key, channel, earliest, earliest_ts)
  local marker = call('GET', marker_key)
  if not marker or earliest < tonumber(marker) then
    call('SET', marker_key, earliest_ts)
    call('PUBLISH', channel, earliest_ts)
  end
end

local gaps = ARGV[7]
local bulk = ARGV[8] == 'B'
-- The per-entry arguments, unpacked only for the loop below: a bulk batch
-- usually needs just its first entry id, the first of ARGV[13].
local args, first
if bulk then
  local _
  _, first = cmsgpack.unpack_one(ARGV[13])
else
  args = msgunpack(ARGV[9])
  first = args[1]
end

-- The per-entry view of a bulk batch, for when it cannot be applied whole.
local function entries_of_bulk()
  local z, acks = {msgunpack(ARGV[10])}, {msgunpack(ARGV[13])}
  local blobs = {}
  if ARGV[11] ~= '' then
    local h = {msgunpack(ARGV[11])}
    for j = 1, #h, 2 do
      blobs[h[j]] = h[j + 1]
    end
  end
  local t, n = {}, 0
  for j = 1, count do
    local id = z[2 * j]
    t[n + 1], t[n + 2], t[n + 3], t[n + 4], t[n + 5] = acks[j], 'A', id, z[2 * j - 1], blobs[id] or ''
    n = n + 5
  end
  return t
end
local oldest = call('XPENDING', input, group, '-', '+', 1)[1]
local fast = oldest ~= nil and oldest[1] == first
-- Fast path: the next entry whose gap to its predecessor must be checked.
local next_gap = fast and string.find(gaps, '1', 2, true)
-- Bulk: on the fast path, a batch of adds none of which is due, with no
-- other entry pending between its entries, is applied by a few calls on
-- the ready-made argument lists; otherwise it goes through the loop below.
-- With dedup on, a batch holding an id released lately goes through the
-- loop below, which drops that add.
local function any_recently_released()
  if not dedup then
    return false
  end
  local z = {msgunpack(ARGV[10])}
  local ids = {}
  for j = 2, #z, 2 do
    ids[j / 2] = z[j]
  end
  local at = call('ZMSCORE', dedup.key, unpack(ids))
  for j = 1, #at do
    if at[j] and tonumber(at[j]) >= dedup.cutoff then
      return true
    end
  end
  return false
end
if fast and bulk and not (wmn and tonumber(ARGV[9]) <= wmn) and not any_recently_released() then
  local apart = {msgunpack(ARGV[14])}
  local clear = true
  for j = 1, #apart, 2 do
    if #call('XPENDING', input, group, '(' .. apart[j], '(' .. apart[j + 1], 1) > 0 then
      clear = false
      break
    end
  end
  if clear then
    call('ZADD', sched, msgunpack(ARGV[10]))
    if ARGV[11] ~= '' then
      call('HSET', body, msgunpack(ARGV[11]))
    end
    if bodies and ARGV[12] ~= '' then
      call('HDEL', body, msgunpack(ARGV[12]))
    end
    call('XACK', input, group, msgunpack(ARGV[13]))
    if clock then
      wake_clock(KEYS[7], ARGV[5], tonumber(ARGV[9]), ARGV[9])
    end
    return outcome(count, released, 0, 0, count, 0, 0, 0, 0)
  end
end

args = args or entries_of_bulk()

-- Slow path: the oldest pending entries of the whole group, in id order.
-- Walking our batch against them tells, per entry, whether it is still
-- pending (apply it), already acknowledged (a redelivery: skip it), or
-- preceded by an older entry pending elsewhere (stop: order first).
local pending, k
if not fast then
  if oldest and cmp_id(first, oldest[1]) > 0 then
    pending = {oldest}
  else
    pending = call('XPENDING', input, group, '-', '+', count)
  end
  k = 1
end

-- Scheduling adds are buffered so a run of them costs one ZADD, one HSET
-- and one HDEL. An id seen twice in a run flushes first, so the later add
-- wins in every key. Explicit lengths: `#t` costs a search on each use.
local zadd, hset, hdel, buffered = {}, {}, {}, {}
local nz, nh, nd = 0, 0, 0
local function flush()
  if nz > 0 then
    call('ZADD', sched, unpack(zadd, 1, nz))
    if nh > 0 then
      call('HSET', body, unpack(hset, 1, nh))
    end
    if nd > 0 then
      call('HDEL', body, unpack(hdel, 1, nd))
    end
    zadd, hset, hdel, buffered = {}, {}, {}, {}
    nz, nh, nd = 0, 0, 0
  end
end

-- A body holds `ts` itself (see release_due in prelude.lua).
local function emit(id, ts, blob)
  if blob == '' then
    call('XADD', out, '*', 'id', id, 'ts', ts)
  else
    call('XADD', out, '*', 'id', id, msgunpack(blob))
  end
end

local acks, nacks = {}, 0
local processed, blocked = 0, 0
local adds, cancels, watermarks, deadn, late, dups = 0, 0, 0, 0, 0, 0
-- Clock mode: the earliest ts scheduled by this call (number and text).
local earliest, earliest_ts
local i = 1
local prev
for n = 1, count do
  local sid, code = args[i], args[i + 1]
  local width = 3
  if code == 'A' or code == 'D' then
    width = 5
  elseif code == 'X' then
    width = 2
  end
  -- c: 0 apply, < 0 already applied (skip), > 0 wait for an older entry.
  local c = -1
  if fast then
    c = 0
    if n == next_gap then
      next_gap = string.find(gaps, '1', n + 1, true)
      if #call('XPENDING', input, group, '(' .. prev, '(' .. sid, 1) > 0 then
        c = 1
      end
    end
    prev = sid
  else
    local p = pending[k]
    if p then
      local pid = p[1]
      if pid == sid then
        c = 0
      else
        c = cmp_id(sid, pid)
      end
    end
  end
  if c > 0 then
    blocked = 1
    break
  end
  local stop = false
  if c == 0 then
    if not fast then
      k = k + 1
    end
    nacks = nacks + 1
    acks[nacks] = sid
    if code == 'A' and dedup and recently_released(args[i + 2]) then
      -- A producer's retry of an add released lately: dropped.
      dups = dups + 1
    elseif code == 'A' then
      local id, ts, blob = args[i + 2], args[i + 3], args[i + 4]
      adds = adds + 1
      if wmn and tonumber(ts) <= wmn then
        -- Late: released at once, replacing any scheduled version.
        flush()
        if call('ZREM', sched, id) == 1 and bodies then
          call('HDEL', body, id)
        end
        emit(id, ts, blob)
        dedup_record({id}, dedup and 1 or 0)
        late = late + 1
      else
        if buffered[id] then
          flush()
        end
        buffered[id] = true
        if clock and (not earliest or tonumber(ts) < earliest) then
          earliest, earliest_ts = tonumber(ts), ts
        end
        zadd[nz + 1] = ts
        zadd[nz + 2] = id
        nz = nz + 2
        if blob ~= '' then
          hset[nh + 1] = id
          hset[nh + 2] = blob
          nh = nh + 2
          bodies = true
        elseif bodies then
          nd = nd + 1
          hdel[nd] = id
        end
      end
    elseif code == 'C' then
      flush()
      if call('ZREM', sched, args[i + 2]) == 1 and bodies then
        call('HDEL', body, args[i + 2])
      end
      cancels = cancels + 1
    elseif code == 'W' then
      local ts = args[i + 2]
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
      call('XADD', dead, '*', 'reason', args[i + 2], 'detail', args[i + 3],
        'origin', 'in', 'origin_id', sid, msgunpack(args[i + 4]))
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
if nacks > 0 then
  call('XACK', input, group, unpack(acks, 1, nacks))
end
if earliest then
  wake_clock(KEYS[7], ARGV[5], earliest, earliest_ts)
end
return outcome(processed, released, more and 1 or 0, blocked, adds, cancels, watermarks, deadn, late, dups)
