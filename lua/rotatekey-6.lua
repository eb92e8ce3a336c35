-- rotatekey-6.lua: replace an active key by a new one with the same expiry; the old key stays usable
-- for a grace period. The replacement takes the old key's place under the plan's key limit, and the
-- old key counts until its grace ends, so a rotation is refused while the account is already over
-- the limit (another rotation's grace period still running). Uses lib/clock.lua.
-- KEYS[1] account hash   KEYS[2] key ids set   KEYS[3] old key's record   KEYS[4] new key's record
-- KEYS[5] usable keys zset (key id scored by expiry)   KEYS[6] ledger stream
-- ARGV[1] old key id   ARGV[2] new key id   ARGV[3] most usable keys (0: no limit)
-- ARGV[4] clock offset (ms)   ARGV[5] grace (ms)   ARGV[6] ledger note   ARGV[7..] new record field, value...
-- Returns {status, detail, old key's new expiry}; status 0 rotated (detail: usable keys), 10 no
-- account or key, 30 key limit (detail: usable keys), 33 not active (detail: 'revoked' or 'expired'),
-- 34 already rotated (detail: its replacement), 37 the account is closed.
if redis.call('EXISTS', KEYS[1]) == 0 then return {10, 0, 0} end
if redis.call('HGET', KEYS[1], 'status') == 'closed' then return {37, 0, 0} end  -- final: no new key
local old = redis.call('HMGET', KEYS[3], 'status', 'expires_ms', 'rotated_to')
if not old[1] then return {10, 0, 0} end
local now = now_ms(ARGV[4])
local expires = tonumber(old[2] or '0')
if old[1] ~= 'active' then return {33, old[1], 0} end
if expires > 0 and expires <= now then return {33, 'expired', 0} end
if old[3] then return {34, old[3], 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
local others = redis.call('ZCARD', KEYS[5])
if redis.call('ZSCORE', KEYS[5], ARGV[1]) then others = others - 1 end
local most = tonumber(ARGV[3])
if most > 0 and others >= most then return {30, others + 1, 0} end
local grace_end = now + tonumber(ARGV[5])
if expires > 0 then grace_end = math.min(grace_end, expires) end
redis.call('HSET', KEYS[3], 'expires_ms', grace_end, 'rotated_to', ARGV[2])
if grace_end > now then redis.call('ZADD', KEYS[5], grace_end, ARGV[1]) else redis.call('ZREM', KEYS[5], ARGV[1]) end
redis.call('HSET', KEYS[4], 'expires_ms', expires, unpack(ARGV, 7))
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[5], expires > 0 and expires or '+inf', ARGV[2])
redis.call('XADD', KEYS[6], '*', 'type', 'key_created', 'ts', now, 'key_id', ARGV[2], 'note', ARGV[6])
redis.call('XADD', KEYS[6], '*', 'type', 'key_rotated', 'ts', now, 'key_id', ARGV[1], 'new_key_id', ARGV[2],
           'old_key_expires_ms', grace_end)
return {0, redis.call('ZCARD', KEYS[5]), grace_end}
