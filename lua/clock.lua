-- clock.lua: one tick of clock mode. Raises the watermark to the Redis
-- server's TIME (ms), releases one bounded chunk of due elements, and
-- reports when the next element falls due, recording it in the next-due
-- marker that apply.lua compares new adds with (to wake the leader early).
--
-- KEYS[1]: the watermark (string)
-- KEYS[2]: the schedule (sorted set, score = ts)
-- KEYS[3]: the bodies (hash, element id -> payload blob)
-- KEYS[4]: the output stream
-- KEYS[5]: the next-due marker (string: the lowest scheduled ts)
-- KEYS[6]: the ids released lately (see release.lua)
-- ARGV[1]: max elements to release in this call
-- ARGV[2]: daemon.dedup_window in ms ('0': off, KEYS[6] unused)
-- Returns: {released, more_due (0|1), has_next (0|1), next_due_ts, now_ms}
--   next_due_ts: the lowest scheduled ts when has_next is 1 (else 0); it is
--     above the watermark unless more_due is 1
--   now_ms: the server's TIME in milliseconds

dedup_start(KEYS[6], tonumber(ARGV[2]))
local wm, now = advance_to_server_time(KEYS[1])
local released, more = release_due(KEYS[2], KEYS[3], KEYS[4], wm, tonumber(ARGV[1]))
if more then
  return {released, 1, 0, 0, now}
end
local first = call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #first == 0 then
  call('DEL', KEYS[5])
  return {released, 0, 0, 0, now}
end
if call('GET', KEYS[5]) ~= first[2] then
  call('SET', KEYS[5], first[2])
end
return {released, 0, 1, tonumber(first[2]), now}
