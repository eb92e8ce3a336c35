-- settle-5.lua: charge a request's actual cost, count it in every limit, end its holds and record one
-- event; a hold under a key budget counts its charge there (lib/budget.lua). Uses lib/budget.lua,
-- lib/balance.lua, lib/clock.lua, lib/hold.lua and lib/settle.lua. The account hash is read once.
-- KEYS[1] account hash   KEYS[2] holds hash   KEYS[3] hold expiry zset   KEYS[4] ledger stream
-- KEYS[5] limits hash (see lib/limits.lua)
-- ARGV[1] request id     ARGV[2] actual cost (micro-credits)   ARGV[3] clock offset (ms)
-- ARGV[4] key id         ARGV[5] the event's descriptive fields as one JSON object
-- ARGV[6] the limits the request was reserved under (JSON, as reserve-5 ARGV[12]; '' for none)
-- ARGV[7] actual tokens  ARGV[8] actual micro-USD   ARGV[9] how long the ended hold's tombstone stays (ms)
-- Returns {status, charged, available_after, cycle used, cycle start, balance after (allowance +
-- purchased), per-cycle limits as id, value, cap...}; status 0 settled, 2 already ended (no effect).
-- The charge exceeds the hold only out of credits no other hold claims, and never below zero. A hold
-- the reaper returned (its lease ran out) is still charged, out of unclaimed credits. What could not
-- be collected is recorded in the event as `uncollected` and in the account's `uncollected` total.
local now = now_ms(ARGV[3])
local h = hold_record(KEYS[2], ARGV[1])
if h and h.ended and h.ended ~= 'r' then return {2, 0, 0} end
local reaped = '0'
if not h or h.ended then
  h, reaped = {amount = 0, text = '0', allow = 0, gen = -1, budget = h and h.budget}, '1'
end
local a = redis.call('HMGET', KEYS[1], 'allow', 'extra', 'held', 'held_allow', 'agen', 'cycle_start_ms')
local b, actual = hold_fields(a), tonumber(ARGV[2])
local charge = math.min(actual, h.amount + math.max(b.allow + b.extra - b.held, 0))
local available = end_hold(KEYS[1], b, h, charge)
put_hold_fields(KEYS[1], b)
-- counters by HINCRBY, and the event, given the caller's own text where it can (no number formatting)
local c = (charge == actual) and int_text(ARGV[2], actual) or int_text('', charge)
redis.call('HINCRBY', KEYS[1], 'charged', c)
local cycle_used = redis.call('HINCRBY', KEYS[1], 'cycle_used', c)
redis.call('HINCRBY', KEYS[1], 'requests', '1')
redis.call('HINCRBY', KEYS[1], 'cycle_requests', '1')
local tokens = tonumber(ARGV[7])
if tokens ~= 0 then
  redis.call('HINCRBY', KEYS[1], 'tokens', int_text(ARGV[7], tokens))
  redis.call('HINCRBY', KEYS[1], 'cycle_tokens', int_text(ARGV[7], tokens))
end
local uncollected = (actual > charge) and int_text('', actual - charge) or '0'
if uncollected ~= '0' then redis.call('HINCRBY', KEYS[1], 'uncollected', uncollected) end
entomb(KEYS[2], KEYS[3], ARGV[1], 's', now, ARGV[9])
give_back(KEYS[5], ARGV[1])
if h.budget then budget_spent(KEYS[5], h.budget, charge) end
local counted = {}
if ARGV[6] ~= '' then
  local used = {c = charge, t = tokens, u = tonumber(ARGV[8]), n = 1}
  counted = count_usage(KEYS[5], cjson.decode(ARGV[6]), ARGV[4], used, now, false)
end
redis.call('XADD', KEYS[4], '*', 'type', 'usage', 'ts', now, 'rid', ARGV[1], 'key_id', ARGV[4],
           'cost', c, 'hold', h.text or h.amount, 'uncollected', uncollected, 'reaped', reaped, 'data', ARGV[5])
local reply = {0, charge, available, cycle_used, tonumber(a[6] or '0'), b.allow + b.extra}
for _, v in ipairs(counted) do reply[#reply + 1] = v end
return reply
