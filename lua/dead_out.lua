-- dead_out.lua: moves output entries to the dead-letter stream and
-- acknowledges them, atomically, if they are still pending at this consumer
-- (another consumer may have claimed one meanwhile: then it is its call).
--
-- KEYS[1]: the output stream
-- KEYS[2]: the dead-letter stream
-- ARGV[1]: the consumer group
-- ARGV[2]: this consumer
-- ARGV[3..]: triples of entry id, reason code, detail
-- Returns: the entry ids moved (or acknowledged, if deleted from the stream)

local out, dead = KEYS[1], KEYS[2]
local group, me = ARGV[1], ARGV[2]
local moved = {}
for i = 3, #ARGV - 2, 3 do
  local id = ARGV[i]
  local p = call('XPENDING', out, group, id, id, 1)[1]
  if p and p[2] == me then
    local e = call('XRANGE', out, id, id)[1]
    if e then
      call('XADD', dead, '*', 'reason', ARGV[i + 1], 'detail', ARGV[i + 2],
        'origin', 'out:' .. group, 'origin_id', id, unpack(e[2]))
    end
    call('XACK', out, group, id)
    moved[#moved + 1] = id
  end
end
return moved
