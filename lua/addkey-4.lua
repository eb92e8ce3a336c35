-- addkey-4.lua: register a new API key record, unless the account already has its plan's most keys.
-- Uses lib/clock.lua.
-- KEYS[1] account hash   KEYS[2] key ids set   KEYS[3] the new key's record hash   KEYS[4] ledger stream
-- ARGV[1] key id   ARGV[2] most active keys the plan allows (0: no limit)   ARGV[3] clock offset (ms)
-- ARGV[4] what the ledger event says of it (label)   ARGV[5..] record field, value...
-- Returns {status, active keys}; status 0 added, 10 no account, 30 the plan's key limit is reached.
if redis.call('EXISTS', KEYS[1]) == 0 then return {10, 0} end
local active = tonumber(redis.call('HGET', KEYS[1], 'active_keys') or '0')
local most = tonumber(ARGV[2])
if most > 0 and active >= most then return {30, active} end
redis.call('HSET', KEYS[3], unpack(ARGV, 5))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'active_keys', 1)
redis.call('XADD', KEYS[4], '*', 'type', 'key_created', 'ts', now_ms(ARGV[3]), 'key_id', ARGV[1], 'note', ARGV[4])
return {0, active + 1}
