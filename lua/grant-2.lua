-- grant-2.lua: add purchased or granted credits (they never expire) to an account.
-- KEYS[1] account hash   KEYS[2] ledger stream
-- ARGV[1] micro-credits to add (> 0)   ARGV[2] clock offset (ms)   ARGV[3] note
-- Returns {status, available_after}; status 0 granted, 10 no account.
if redis.call('EXISTS', KEYS[1]) == 0 then return {10, 0} end
local amount = tonumber(ARGV[1])
redis.call('HINCRBY', KEYS[1], 'extra', amount)
redis.call('HINCRBY', KEYS[1], 'granted', amount)
local a = redis.call('HMGET', KEYS[1], 'allow', 'extra', 'held')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
redis.call('XADD', KEYS[2], '*', 'type', 'grant', 'ts', now, 'amount', amount, 'note', ARGV[3])
return {0, tonumber(a[1] or '0') + tonumber(a[2] or '0') - tonumber(a[3] or '0')}
