-- indexkey-3.lua: add one key of an account made before the usable-keys index to that index, if it
-- can still authenticate (run once per key, then the account is marked indexed). Uses lib/clock.lua.
-- KEYS[1] account hash   KEYS[2] the key's record hash   KEYS[3] usable keys zset
-- ARGV[1] key id   ARGV[2] clock offset (ms)
-- Returns {status, indexed}; status 0 (indexed: 1 when the key counts), 10 no account.
if redis.call('EXISTS', KEYS[1]) == 0 then return {10, 0} end
local rec = redis.call('HMGET', KEYS[2], 'status', 'expires_ms')
local expires = tonumber(rec[2] or '0')
if rec[1] ~= 'active' or (expires > 0 and expires <= now_ms(ARGV[2])) then return {0, 0} end
redis.call('ZADD', KEYS[3], expires > 0 and expires or '+inf', ARGV[1])
return {0, 1}
