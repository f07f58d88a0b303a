-- forget_consumer.lua: removes a consumer from a group, unless it has
-- entries pending. XGROUP DELCONSUMER drops a consumer's pending entries
-- with it; checking in the same call means an entry it read after the
-- caller looked is never dropped (it would be neither acknowledged nor
-- claimed by anyone, ever).
--
-- KEYS[1]: the stream
-- ARGV[1]: the consumer group
-- ARGV[2]: the consumer
-- Returns: 1 if it was removed, 0 if it has entries pending (or is gone)

local pending = call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then
  return 0
end
return call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) >= 0 and 1 or 0
