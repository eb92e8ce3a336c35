-- release-5.lua: end a hold without any charge (the request never reached the provider, or the
-- provider refused it): nothing is counted in any limit either.
-- KEYS[1] account hash   KEYS[2] holds hash   KEYS[3] hold expiry zset   KEYS[4] ledger stream
-- KEYS[5] limits hash (see lib/limits.lua). Uses lib/clock.lua and lib/settle.lua.
-- ARGV[1] request id     ARGV[2] reason     ARGV[3] clock offset (ms)
-- Returns {status, released}; status 0 released, 2 hold already ended (no effect).
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if not hold then return {2, 0} end
redis.call('HINCRBY', KEYS[1], 'held', -tonumber(hold))
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
give_back(KEYS[5], ARGV[1])
local now = now_ms(ARGV[3])
redis.call('XADD', KEYS[4], '*', 'type', 'released', 'ts', now, 'rid', ARGV[1], 'cost', 0,
           'hold', hold, 'reason', ARGV[2])
return {0, tonumber(hold)}
