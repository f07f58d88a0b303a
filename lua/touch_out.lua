-- touch_out.lua: resets the idle time of output entries this consumer is
-- still working on, so that no other consumer claims them after claim_idle
-- while their handler runs. Counts no delivery (XCLAIM … JUSTID).
--
-- KEYS[1]: the output stream
-- ARGV[1]: the consumer group
-- ARGV[2]: this consumer
-- ARGV[3..]: entry ids
-- Returns: the entry ids that are no longer pending at this consumer

local out = KEYS[1]
local group, me = ARGV[1], ARGV[2]
-- The caller sends at most 1000 ids per call (Lua's stack bounds unpack).
local claim, lost = {out, group, me, 0}, {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local p = call('XPENDING', out, group, id, id, 1)[1]
  if p and p[2] == me then
    claim[#claim + 1] = id
  else
    lost[#lost + 1] = id
  end
end
if #claim > 4 then
  claim[#claim + 1] = 'JUSTID'
  call('XCLAIM', unpack(claim))
end
return lost
