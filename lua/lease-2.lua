-- lease-2.lua: extend the leases of holds whose requests are still in flight (an ended or reaped
-- hold is left alone: its tombstone keeps its own time).
-- Uses lib/clock.lua and lib/hold.lua.
-- KEYS[1] holds hash   KEYS[2] hold expiry zset
-- ARGV[1] clock offset (ms)   ARGV[2] lease (ms)   ARGV[3..] request ids
-- Returns {holds renewed}.
local now = now_ms(ARGV[1])
local renewed = 0
for i = 3, #ARGV do
  local h = hold_record(KEYS[1], ARGV[i])
  if h and not h.ended then
    redis.call('ZADD', KEYS[2], 'XX', now + tonumber(ARGV[2]), ARGV[i])
    renewed = renewed + 1
  end
end
return {renewed}
