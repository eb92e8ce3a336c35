-- revokekey-3.lua: revoke an API key once (a second revocation changes nothing); it stops counting
-- against the plan's key limit at once. Uses lib/clock.lua.
-- KEYS[1] the key's record hash   KEYS[2] usable keys zset   KEYS[3] ledger stream
-- ARGV[1] clock offset (ms)   ARGV[2] key id   ARGV[3] why (note for the ledger)
-- Returns {status}; status 0 revoked, 2 already revoked, 10 no such key.
if redis.call('EXISTS', KEYS[1]) == 0 then return {10} end
if redis.call('HGET', KEYS[1], 'status') ~= 'active' then return {2} end
redis.call('HSET', KEYS[1], 'status', 'revoked')
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('XADD', KEYS[3], '*', 'type', 'key_revoked', 'ts', now_ms(ARGV[1]), 'key_id', ARGV[2], 'note', ARGV[3])
return {0}
