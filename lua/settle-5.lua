-- settle-5.lua: charge a request's actual cost, count it in every limit, release the rest of its
-- holds and record one event.
-- KEYS[1] account hash   KEYS[2] holds hash   KEYS[3] hold expiry zset   KEYS[4] ledger stream
-- KEYS[5] limits hash (see lib/limits.lua). Uses lib/clock.lua and lib/settle.lua.
-- ARGV[1] request id     ARGV[2] actual cost (micro-credits)   ARGV[3] clock offset (ms)
-- ARGV[4] key id         ARGV[5] the event's descriptive fields as one JSON object
-- ARGV[6] the limits the request was reserved under (JSON, as reserve-5 ARGV[12]; '' for none)
-- ARGV[7] actual tokens  ARGV[8] actual micro-USD
-- Returns {status, charged, available_after, cycle used, cycle start, per-cycle limits as id, value,
-- cap...}; status 0 settled, 2 hold already ended (no effect).
-- The charge exceeds the hold only out of credits no other hold claims, and never below zero;
-- what could not be collected is recorded in the event as `uncollected`.
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if not hold then return {2, 0, 0} end
hold = tonumber(hold)
local a = redis.call('HMGET', KEYS[1], 'allow', 'extra', 'held')
local allow = tonumber(a[1] or '0')
local extra = tonumber(a[2] or '0')
local held = tonumber(a[3] or '0')
local actual = tonumber(ARGV[2])
local charge = actual
if charge > hold then
  local free = allow + extra - held
  if free < 0 then free = 0 end
  charge = math.min(actual, hold + free)
end
local from_allow = math.min(charge, allow)
allow = allow - from_allow
extra = extra - (charge - from_allow)
held = held - hold
redis.call('HSET', KEYS[1], 'allow', allow, 'extra', extra, 'held', held)
redis.call('HINCRBY', KEYS[1], 'charged', charge)
redis.call('HINCRBY', KEYS[1], 'cycle_used', charge)
redis.call('HINCRBY', KEYS[1], 'requests', 1)
redis.call('HINCRBY', KEYS[1], 'cycle_requests', 1)
redis.call('HINCRBY', KEYS[1], 'tokens', tonumber(ARGV[7]))
redis.call('HINCRBY', KEYS[1], 'cycle_tokens', tonumber(ARGV[7]))
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local now = now_ms(ARGV[3])
give_back(KEYS[5], ARGV[1])
local counted = {}
if ARGV[6] ~= '' then
  local used = {c = charge, t = tonumber(ARGV[7]), u = tonumber(ARGV[8]), n = 1}
  counted = count_usage(KEYS[5], cjson.decode(ARGV[6]), ARGV[4], used, now)
end
redis.call('XADD', KEYS[4], '*', 'type', 'usage', 'ts', now, 'rid', ARGV[1], 'key_id', ARGV[4],
           'cost', charge, 'hold', hold, 'uncollected', actual - charge, 'data', ARGV[5])
local c = redis.call('HMGET', KEYS[1], 'cycle_used', 'cycle_start_ms')
local reply = {0, charge, allow + extra - held, tonumber(c[1] or '0'), tonumber(c[2] or '0')}
for _, v in ipairs(counted) do reply[#reply + 1] = v end
return reply
