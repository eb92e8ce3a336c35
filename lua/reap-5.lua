-- reap-5.lua: return the holds of one account whose lease has expired (a crashed gateway's).
-- KEYS[1] account hash   KEYS[2] holds hash   KEYS[3] hold expiry zset   KEYS[4] ledger stream
-- KEYS[5] limits hash (see lib/limits.lua). Uses lib/clock.lua and lib/settle.lua.
-- ARGV[1] clock offset (ms)   ARGV[2] most holds to reap in one call
-- Returns {reaped count, micro-credits returned}. Idempotent: a reaped hold is gone.
local now = now_ms(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local returned = 0
for _, rid in ipairs(expired) do
  local hold = redis.call('HGET', KEYS[2], rid)
  redis.call('ZREM', KEYS[3], rid)
  if hold then
    returned = returned + tonumber(hold)
    redis.call('HDEL', KEYS[2], rid)
    give_back(KEYS[5], rid)
    redis.call('XADD', KEYS[4], '*', 'type', 'reaped', 'ts', now, 'rid', rid, 'cost', 0, 'hold', hold)
  end
end
if returned > 0 then redis.call('HINCRBY', KEYS[1], 'held', -returned) end
return {#expired, returned}
