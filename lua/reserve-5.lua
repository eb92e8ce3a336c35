-- reserve-5.lua: hold a request's worst case against the balance and every limit (the key's own
-- budgets first, lib/budget.lua), or refuse. Uses lib/budget.lua, lib/clock.lua, lib/cycle.lua,
-- lib/hold.lua and lib/limits.lua (prepended by the loader).
-- KEYS[1] account hash   KEYS[2] API key hash   KEYS[3] holds hash   KEYS[4] hold expiry zset
-- KEYS[5] limits hash (see lib/limits.lua)
-- ARGV[1] request id     ARGV[2] plan the caller priced with
-- ARGV[3] full credits: prompt bound + every output token   ARGV[4] minimum credits: prompt + 1 token
-- ARGV[5] lease (ms)     ARGV[6] clock offset (ms; 0 outside tests)   ARGV[7] key id
-- ARGV[8] full tokens    ARGV[9] minimum tokens   ARGV[10] full micro-USD   ARGV[11] minimum micro-USD
-- ARGV[12] limit rows as JSON ('' for none)   ARGV[13] start and ARGV[14] end (ms) of the billing cycle
-- the caller computed for now   ARGV[15] the priced plan's allowance per cycle   ARGV[16] fallback plan
-- ARGV[17] its allowance
-- Returns {status, credits held, available_after, plan, tokens held, micro-USD held, detail...}; status
-- 0 full hold, 1 lowered (detail: see lib/limits.lua tightest), 10 no account, 11 suspended (17 closed), 12 key
-- revoked, 13 key expired, 14 plan changed, 15 the request already ended, 16 stale cycle bounds (detail:
-- Redis now), 20 insufficient credits (reply[5]: credits held by requests in flight), 21 limit reached
-- (detail: limit id, used, cap, ms until it frees, scope, metric, window ms), 22 the key's budget cannot
-- pay the prompt (reply[3]: what is left of it; detail: 'cycle' or 'lifetime', its use with holds, cap).
-- A retried reserve of a live hold returns that hold again, unchanged (idempotent). The key's last_used_ms
-- (the admin API's `last_used_at`) is kept to the second: rewritten once a second old, not on every request.
local now = now_ms(ARGV[6])
local a = redis.call('HMGET', KEYS[1], 'plan', 'status', 'allow', 'extra', 'held', 'cycle_end_ms',
                     'plan_expires_ms', 'held_allow', 'agen')
if not a[1] then return {10, 0, 0, ''} end
local prior = hold_record(KEYS[3], ARGV[1])
if prior and prior.ended then return {15, 0, 0, a[1]} end
if prior then
  local left = tonumber(a[3] or '0') + tonumber(a[4] or '0') - tonumber(a[5] or '0')
  return {tonumber(prior.lowered), prior.amount, left, a[1], tonumber(prior.tokens), tonumber(prior.usd)}
end
if a[2] ~= 'active' then return {(a[2] == 'closed') and 17 or 11, 0, 0, a[1]} end
local k = redis.call('HMGET', KEYS[2], 'status', 'expires_ms', 'budget_cycle', 'budget_life', 'budget_id',
                     'last_used_ms')
if k[1] ~= 'active' then return {12, 0, 0, a[1]} end
local expires = tonumber(k[2] or '0')
if expires > 0 and now >= expires then return {13, 0, 0, a[1]} end
local status, plan, allow, gen, cycle_end = roll_cycle(KEYS[1], KEYS[5], a, now, ARGV)
if status == 16 then return {16, 0, 0, plan, 0, 0, now} end
if status == 14 or plan ~= ARGV[2] then return {14, 0, 0, plan} end
local held, held_allow = tonumber(a[5] or '0'), tonumber(a[8] or '0')
local available = allow + tonumber(a[4] or '0') - held
local want = {c = tonumber(ARGV[3]), t = tonumber(ARGV[8]), u = tonumber(ARGV[10]), n = 1}
local least = {c = tonumber(ARGV[4]), t = tonumber(ARGV[9]), u = tonumber(ARGV[11]), n = 1}
if available < least.c then return {20, 0, available, plan, held} end
if available < want.c then want.c = available end
local rows = ARGV[12] ~= '' and cjson.decode(ARGV[12]) or {}
local owner, budgets = budget_rows(k, ARGV[7], rows)
local tight = {}
local refused = check_limits(KEYS[5], rows, ARGV[7], want, least, now, cycle_end, tight)
if refused then return refusal(refused, budgets, available, plan) end
local lowered = (want.c < tonumber(ARGV[3]) or want.t < tonumber(ARGV[8]) or want.u < tonumber(ARGV[10])) and 1 or 0
hold_limits(KEYS[5], rows, ARGV[7], want, ARGV[1])
local from_allow = math.max(math.min(want.c, allow - held_allow), 0)
redis.call('HSET', KEYS[1], 'held', held + want.c, 'held_allow', held_allow + from_allow)
redis.call('HSET', KEYS[3], ARGV[1], string.format('%.0f %.0f %.0f %d %.0f %.0f', want.c, from_allow, gen, lowered,
                                                   want.t, want.u) .. (owner and (' ' .. owner) or ''))
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]), ARGV[1])
if math.abs(now - tonumber(k[6] or '0')) >= 1000 then redis.call('HSET', KEYS[2], 'last_used_ms', now) end
return tightest({lowered, want.c, available - want.c, plan, want.t, want.u}, tight, want)
