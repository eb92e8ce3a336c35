-- revokekey-2.lua: revoke an API key once (a second revocation changes nothing).
-- KEYS[1] account hash   KEYS[2] the key's record hash
-- ARGV[1] unused (kept for the common argument shape)
-- Returns {status}; status 0 revoked, 2 already revoked, 10 no such key.
if redis.call('EXISTS', KEYS[2]) == 0 then return {10} end
if redis.call('HGET', KEYS[2], 'status') ~= 'active' then return {2} end
redis.call('HSET', KEYS[2], 'status', 'revoked')
redis.call('HINCRBY', KEYS[1], 'active_keys', -1)
return {0}
