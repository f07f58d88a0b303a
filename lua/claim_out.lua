-- claim_out.lua: claims output entries for this consumer and, in the same
-- atomic step, dead-letters those already delivered max_deliveries times.
--
-- KEYS[1]: the output stream
-- KEYS[2]: the dead-letter stream
-- ARGV[1]: the consumer group
-- ARGV[2]: this consumer
-- ARGV[3]: min idle time (ms): younger entries are left alone
-- ARGV[4]: most entries to take
-- ARGV[5]: max_deliveries
-- ARGV[6]: 'idle': any consumer's entries (XAUTOCLAIM from cursor ARGV[7]);
--          'peer': the entries of consumer ARGV[7] (one whose lease expired)
-- ARGV[7]: the cursor ('0-0' to start) or the peer's name
-- Returns: {next_cursor, claimed, dead}
--   next_cursor: where the next 'idle' call goes on ('0-0': scan complete)
--   claimed: flat {entry_id, delivery, {f1, v1, ...}, ...}: entries now
--            pending at this consumer, delivery counting this delivery
--   dead: entry ids moved to the dead-letter stream and acknowledged
--
-- A delivery count is read before the entry is delivered again: an entry
-- delivered max_deliveries times already is dead-lettered, never delivered
-- once more. Entries deleted from the stream while pending are acknowledged.

local out, dead = KEYS[1], KEYS[2]
local group, me = ARGV[1], ARGV[2]
local min_idle, count, max = ARGV[3], ARGV[4], tonumber(ARGV[5])

-- {entry_id, deliveries so far}
local found = {}
local cursor = '0-0'
if ARGV[6] == 'idle' then
  -- JUSTID: takes ownership without counting a delivery (counted below,
  -- only for entries that are delivered).
  local r = call('XAUTOCLAIM', out, group, me, min_idle, ARGV[7], 'COUNT', count, 'JUSTID')
  cursor = r[1]
  for _, id in ipairs(r[2]) do
    local p = call('XPENDING', out, group, id, id, 1)[1]
    if p then
      found[#found + 1] = {id, tonumber(p[4])}
    end
  end
else
  for _, p in ipairs(call('XPENDING', out, group, 'IDLE', min_idle, '-', '+', count, ARGV[7])) do
    found[#found + 1] = {p[1], tonumber(p[4])}
  end
end

local claimed, moved = {}, {}
for _, f in ipairs(found) do
  local id, deliveries = f[1], f[2]
  if deliveries >= max then
    local e = call('XRANGE', out, id, id)[1]
    if e then
      call('XADD', dead, '*', 'reason', 'max_deliveries',
        'detail', 'delivered ' .. deliveries .. ' times without being acknowledged (max_deliveries ' .. max .. ')',
        'origin', 'out:' .. group, 'origin_id', id, unpack(e[2]))
      moved[#moved + 1] = id
    end
    call('XACK', out, group, id)
  else
    -- Counts this delivery; a deleted entry comes back empty (Redis 7 also
    -- drops it from the pending list, Redis 6.2 needs the XACK).
    local e = call('XCLAIM', out, group, me, 0, id)[1]
    if e then
      claimed[#claimed + 1] = id
      claimed[#claimed + 1] = deliveries + 1
      claimed[#claimed + 1] = e[2]
    else
      call('XACK', out, group, id)
    end
  end
end
return {cursor, claimed, moved}
