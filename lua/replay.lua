-- replay.lua: sends dead letters back where they came from, one page per
-- call and each letter atomically: its original fields are appended to
-- the input stream (origin `in`) or, as a fresh entry, to the output
-- stream (origin `out:<group>`), and the letter is deleted from the
-- dead-letter stream. Not prefixed with the prelude (run by the CLI).
--
-- KEYS[1]: the dead-letter stream
-- KEYS[2]: the input stream
-- KEYS[3]: the output stream
-- ARGV[1]: first entry id to examine (XRANGE syntax: '-', '<id>', '(<id>')
-- ARGV[2]: last entry id to examine (inclusive)
-- ARGV[3]: most letters to examine
-- ARGV[4]: only letters with this reason ('' = any reason)
-- Returns: {examined, last examined id ('' if none), results...}, the
--   results being flat quadruples <dead id> <outcome> <reason> <text>:
--   outcome 'in' or 'out': replayed there; text = the new entry id
--   outcome 'skipped': another reason than ARGV[4]; text = ''
--   outcome 'route': a wrong_partition input letter, left for the caller
--     to send to its element's partition; text = ''
--   outcome 'invalid': cannot be replayed, left in place; text = why

local call = redis.call
local dead, input, out = KEYS[1], KEYS[2], KEYS[3]
local want = ARGV[4]
-- The most original values one XADD can take as Lua varargs (the Lua
-- stack holds about 8000 values).
local max_values = 7900

local entries = call('XRANGE', dead, ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local results = {}
local function report(id, outcome, reason, text)
  results[#results + 1] = id
  results[#results + 1] = outcome
  results[#results + 1] = reason
  results[#results + 1] = text
end

for _, entry in ipairs(entries) do
  local id, f = entry[1], entry[2]
  if f[1] ~= 'reason' or f[3] ~= 'detail' or f[5] ~= 'origin' or f[7] ~= 'origin_id' then
    report(id, 'invalid', '', 'not a tidemark dead letter (no reason/detail/origin/origin_id header)')
  elseif want ~= '' and f[2] ~= want then
    report(id, 'skipped', f[2], '')
  elseif #f < 10 then
    report(id, 'invalid', f[2], 'it has no original fields')
  elseif #f - 8 > max_values then
    report(id, 'invalid', f[2], 'it has too many fields to replay in one script call')
  elseif f[2] == 'wrong_partition' and f[6] == 'in' then
    -- Its element's partition (whose :in may be on another node of a
    -- cluster) is the caller's to find: left in place.
    report(id, 'route', f[2], '')
  else
    local origin, target, outcome = f[6], nil, nil
    if origin == 'in' then
      target, outcome = input, 'in'
    elseif string.sub(origin, 1, 4) == 'out:' then
      target, outcome = out, 'out'
    end
    if target then
      local new_id = call('XADD', target, '*', unpack(f, 9))
      call('XDEL', dead, id)
      report(id, outcome, f[2], new_id)
    else
      report(id, 'invalid', f[2], 'unknown origin ' .. string.format('%q', origin))
    end
  end
end

local last = ''
if #entries > 0 then
  last = entries[#entries][1]
end
local reply = {#entries, last}
for i = 1, #results do
  reply[#reply + 1] = results[i]
end
return reply
