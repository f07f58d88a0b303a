-- lock.lua: a lease lock: the clock leader's, and each partition's owner
-- (whose token apply.lua checks). Only the holder (the one whose token the
-- key holds) extends or releases it.
--
-- KEYS[1]: the lock (string: the holder's token)
-- ARGV[1]: the caller's token
-- ARGV[2]: lifetime in milliseconds; '0' releases the lock instead
-- Returns: with a lifetime, 1 if the caller holds the lock afterwards
--   (extended, or taken because it was free), else 0; when releasing,
--   1 if the caller held it and it was deleted, else 0.

local holder = call('GET', KEYS[1])
if ARGV[2] == '0' then
  if holder == ARGV[1] then
    call('DEL', KEYS[1])
    return 1
  end
  return 0
end
if holder == ARGV[1] then
  call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
