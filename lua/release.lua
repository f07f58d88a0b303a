-- release.lua: releases due elements in one bounded chunk.
--
-- KEYS[1]: the watermark (string)
-- KEYS[2]: the schedule (sorted set, score = ts)
-- KEYS[3]: the bodies (hash, element id -> payload blob)
-- KEYS[4]: the output stream
-- ARGV[1]: max elements to release in this call
-- Returns: {released, more_due (0|1)}

local wm = call('GET', KEYS[1])
local released, more = release_due(KEYS[2], KEYS[3], KEYS[4], wm, tonumber(ARGV[1]))
return {released, more and 1 or 0}
