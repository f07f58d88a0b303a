-- registry.lua: the namespace's live daemons, a sorted set whose scores
-- are when each registration expires (ms on the Redis server's clock, so
-- pod clocks never matter).
--
-- KEYS[1]: the registry (sorted set: daemon name -> expiry ms)
-- ARGV[1]: this daemon's name
-- ARGV[2]: lifetime in milliseconds; '0' removes this daemon instead
-- Returns: the names of the daemons registered and not expired

if redis.replicate_commands then
  -- Redis 6.2: replicate effects, so TIME may precede writes.
  redis.replicate_commands()
end
local t = call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
if ARGV[2] == '0' then
  call('ZREM', KEYS[1], ARGV[1])
else
  call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[2])), ARGV[1])
  -- The registry outlives its members by a little, never forever.
  call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 4)
end
return call('ZRANGE', KEYS[1], 0, -1)
