-- addkey-5.lua: register a new API key record, unless the account already has as many usable keys
-- (active and unexpired, rotated ones until their grace ends) as its plan allows.
-- Uses lib/clock.lua.
-- KEYS[1] account hash   KEYS[2] key ids set   KEYS[3] the new key's record hash
-- KEYS[4] usable keys zset (key id scored by expiry)   KEYS[5] ledger stream
-- ARGV[1] key id   ARGV[2] most usable keys the plan allows (0: no limit)   ARGV[3] clock offset (ms)
-- ARGV[4] what the ledger event says of it (label)   ARGV[5] expiry (ms; 0 never)
-- ARGV[6..] record field, value...
-- Returns {status, usable keys}; status 0 added, 10 no account, 30 the plan's key limit is reached, 37 the
-- account is closed.
if redis.call('EXISTS', KEYS[1]) == 0 then return {10, 0} end
if redis.call('HGET', KEYS[1], 'status') == 'closed' then return {37, 0} end  -- final: a key it could never use
local now = now_ms(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local usable = redis.call('ZCARD', KEYS[4])
local most = tonumber(ARGV[2])
if most > 0 and usable >= most then return {30, usable} end
redis.call('HSET', KEYS[3], unpack(ARGV, 6))
redis.call('SADD', KEYS[2], ARGV[1])
local expires = tonumber(ARGV[5])
if expires == 0 then expires = '+inf' end
redis.call('ZADD', KEYS[4], expires, ARGV[1])
redis.call('XADD', KEYS[5], '*', 'type', 'key_created', 'ts', now, 'key_id', ARGV[1], 'note', ARGV[4])
return {0, usable + 1}
