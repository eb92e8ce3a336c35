-- lib/clock.lua: the time every script uses, from Redis TIME (never a caller's clock).
-- Input: offset, the test-only clock shift in ms (0 in production).
-- Returns: milliseconds since the epoch.
local function now_ms(offset)
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + (offset == '0' and 0 or tonumber(offset))
end
