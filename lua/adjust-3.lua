-- adjust-3.lua: a refund (credits added to purchased credits) or a deduction (taken from the unheld
-- balance, purchased first, never below zero), with a reason, at most once per idempotency key: a
-- retry with the same key and request gets the first answer and changes nothing. Uses lib/clock.lua.
-- KEYS[1] account hash   KEYS[2] ledger stream   KEYS[3] the idempotency key's record (hash)
-- ARGV[1] micro-credits (signed, not 0)   ARGV[2] clock offset (ms)   ARGV[3] reason
-- ARGV[4] idempotency key   ARGV[5] the request's fingerprint   ARGV[6] how long the key is kept (ms)
-- ARGV[7] the adjustment's id
-- Returns {status, available_after, adjustment id}; status 0 applied, 10 no account, 35 the key was used
-- with another request, 36 a replay (the first answer's), 38 the deduction exceeds what is unheld
-- (available_after: the most that can be deducted now), 39 a refund would take the balance past 2^53 - 1
-- micro-credits, which Lua's doubles cannot hold exactly (available_after: the most refundable now).
if redis.call('EXISTS', KEYS[1]) == 0 then return {10, 0, ''} end
local seen = redis.call('HMGET', KEYS[3], 'fingerprint', 'available', 'adjustment_id')
if seen[1] and seen[1] ~= ARGV[5] then return {35, 0, ''} end
if seen[1] then return {36, tonumber(seen[2]), seen[3] or ''} end
local a = redis.call('HMGET', KEYS[1], 'allow', 'extra', 'held', 'held_allow')
local allow, extra, held, held_allow = tonumber(a[1] or '0'), tonumber(a[2] or '0'), tonumber(a[3] or '0'),
  tonumber(a[4] or '0')
local change = tonumber(ARGV[1])
if change > 0 then
  local room = 9007199254740991 - allow - extra
  if change > room then return {39, math.max(room, 0), ''} end
  extra = extra + change
else
  -- what holds claim stays: of purchased, what they hold beyond their allowance part
  local free_extra = math.max(extra - math.max(held - held_allow, 0), 0)
  local free_allow = math.max(allow - held_allow, 0)
  local most = math.max(math.min(allow + extra - held, free_extra + free_allow), 0)
  if -change > most then return {38, most, ''} end
  local from_extra = math.min(-change, free_extra)
  extra, allow = extra - from_extra, allow - (-change - from_extra)
end
redis.call('HSET', KEYS[1], 'allow', allow, 'extra', extra)
redis.call('HINCRBY', KEYS[1], 'granted', change)
redis.call('HINCRBY', KEYS[1], 'adjusted', change)
local available = allow + extra - held
redis.call('HSET', KEYS[3], 'fingerprint', ARGV[5], 'available', available, 'adjustment_id', ARGV[7])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call('XADD', KEYS[2], '*', 'type', 'adjustment', 'ts', now_ms(ARGV[2]), 'amount', change, 'reason', ARGV[3],
           'adjustment_id', ARGV[7], 'idempotency_key', ARGV[4])
return {0, available, ARGV[7]}
