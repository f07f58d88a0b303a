-- release.lua: releases due elements in one bounded chunk.
--
-- KEYS[1]: the watermark (string)
-- KEYS[2]: the schedule (sorted set, score = ts)
-- KEYS[3]: the bodies (hash, element id -> payload blob)
-- KEYS[4]: the output stream
-- KEYS[5]: the ids released lately (sorted set, id -> release time in ms;
--   see dedup_start in prelude.lua)
-- ARGV[1]: max elements to release in this call
-- ARGV[2]: daemon.dedup_window in ms ('0': off, KEYS[5] unused)
-- Returns: {released, more_due (0|1)}

dedup_start(KEYS[5], tonumber(ARGV[2]))
local wm = call('GET', KEYS[1])
local released, more = release_due(KEYS[2], KEYS[3], KEYS[4], wm, tonumber(ARGV[1]))
return {released, more and 1 or 0}
