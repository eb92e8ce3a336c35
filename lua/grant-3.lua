-- grant-3.lua: add purchased or granted credits (they never expire) to an account, at most once per
-- idempotency key: a retry with the same key and request gets the first answer and credits nothing.
-- Uses lib/clock.lua.
-- KEYS[1] account hash   KEYS[2] ledger stream   KEYS[3] the idempotency key's record (hash)
-- ARGV[1] micro-credits to add (> 0)   ARGV[2] clock offset (ms)   ARGV[3] note
-- ARGV[4] idempotency key ('' none)   ARGV[5] the request's fingerprint   ARGV[6] how long the key is kept (ms)
-- ARGV[7] the account's counter of this kind of credit ('credited_grants' or 'credited_packs': statements)
-- Returns {status, available_after}; status 0 granted, 10 no account, 35 the idempotency key was
-- used with another request, 36 a replay (available_after: the first answer's), 39 the balance would
-- pass 2^53 - 1 micro-credits (Lua's doubles would round it; available_after: the most creditable), 37 the
-- account is closed (final: nothing could ever spend the credits; a replay still gets its first answer).
if redis.call('EXISTS', KEYS[1]) == 0 then return {10, 0} end
if ARGV[4] ~= '' then
  local seen = redis.call('HMGET', KEYS[3], 'fingerprint', 'available')
  if seen[1] and seen[1] ~= ARGV[5] then return {35, 0} end
  if seen[1] then return {36, tonumber(seen[2])} end
end
local amount = tonumber(ARGV[1])
local before = redis.call('HMGET', KEYS[1], 'allow', 'extra', 'status')
if before[3] == 'closed' then return {37, 0} end
local room = 9007199254740991 - tonumber(before[1] or '0') - tonumber(before[2] or '0')
if amount > room then return {39, math.max(room, 0)} end
redis.call('HINCRBY', KEYS[1], 'extra', amount)
redis.call('HINCRBY', KEYS[1], 'granted', amount)
if ARGV[7] == 'credited_packs' then redis.call('HINCRBY', KEYS[1], 'credited_packs', amount)
else redis.call('HINCRBY', KEYS[1], 'credited_grants', amount) end
local a = redis.call('HMGET', KEYS[1], 'allow', 'extra', 'held')
local available = tonumber(a[1] or '0') + tonumber(a[2] or '0') - tonumber(a[3] or '0')
local event = {'type', 'grant', 'ts', now_ms(ARGV[2]), 'amount', amount, 'note', ARGV[3]}
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[3], 'fingerprint', ARGV[5], 'available', available)
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
  event[#event + 1], event[#event + 2] = 'idempotency_key', ARGV[4]
end
redis.call('XADD', KEYS[2], '*', unpack(event))
return {0, available}
