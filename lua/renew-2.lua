-- renew-2.lua: move a subscription's end on (the caller computed it from the end it read); the plan,
-- a pending plan change and the balances are left as they are. Uses lib/clock.lua.
-- KEYS[1] account hash   KEYS[2] ledger stream
-- ARGV[1] the end the caller read (ms)   ARGV[2] the new end (ms)   ARGV[3] clock offset (ms)
-- ARGV[4] months added (for the ledger)
-- Returns {status, end}; status 0 renewed, 10 no account, 14 the end moved (read it again),
-- 31 the subscription has no end, 32 its end has passed (end: that end).
local a = redis.call('HMGET', KEYS[1], 'plan', 'plan_expires_ms')
if not a[1] then return {10, 0} end
local ends = tonumber(a[2] or '0')
if ends == 0 then return {31, 0} end
local now = now_ms(ARGV[3])
if ends <= now then return {32, ends} end
if ends ~= tonumber(ARGV[1]) then return {14, ends} end
redis.call('HSET', KEYS[1], 'plan_expires_ms', ARGV[2])
redis.call('XADD', KEYS[2], '*', 'type', 'subscription_renewed', 'ts', now, 'plan', a[1], 'months', ARGV[4],
           'from_ms', ends, 'expires_ms', ARGV[2])
return {0, tonumber(ARGV[2])}
