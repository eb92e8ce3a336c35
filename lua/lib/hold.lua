-- lib/hold.lua: a hold's record in the holds hash, and ending it against the account's buckets.
-- Live: `amount allowance-part allowance-generation lowered tokens micro-USD [budget owner]` (a bare
-- amount is a hold taken before holds had parts: it is ended against the unheld balance; the budget
-- owner is the key id whose budget counters the charge goes to, see lib/budget.lua). Ended: a
-- tombstone `~s` settled, `~x` released or cancelled, `~r` reaped (`~r <owner>` for a hold under a key
-- budget, so a late settle still counts in it); kept until its hold-expiry score passes.
-- Returns: hold_record: nil, {ended = state, budget} or the live fields; end_hold: the unheld balance after.
local function hold_record(holds, rid)
  local v = redis.call('HGET', holds, rid)
  if not v then return nil end
  if string.sub(v, 1, 1) == '~' then
    return {ended = string.sub(v, 2, 2), budget = #v > 3 and string.sub(v, 4) or nil}
  end
  local f = {}
  for x in string.gmatch(v, '%S+') do f[#f + 1] = x end
  if not f[2] then return {amount = tonumber(f[1]), allow = 0, legacy = true, lowered = 0, tokens = 0, usd = 0} end
  return {amount = tonumber(f[1]), allow = tonumber(f[2]), gen = tonumber(f[3]), lowered = tonumber(f[4]),
          tokens = tonumber(f[5]), usd = tonumber(f[6]), budget = f[7]}
end

local function entomb(holds, expiry, rid, state, now, keep)
  redis.call('HSET', holds, rid, '~' .. state)
  redis.call('ZADD', expiry, now + tonumber(keep), rid)
end

-- Take `charge` from hold `h` (allowance part first), then any rest from balance no hold claims
-- (allowance first); release what is left of `h`. The unused allowance part of a hold taken in an
-- earlier allowance generation (before a cycle rollover or a plan lapse) expires now.
local function end_hold(acct, h, charge)
  local a = redis.call('HMGET', acct, 'allow', 'extra', 'held', 'held_allow', 'agen')
  local allow, extra = tonumber(a[1] or '0'), tonumber(a[2] or '0')
  local held, held_allow = tonumber(a[3] or '0') - h.amount, tonumber(a[4] or '0') - h.allow
  local from_allow = math.min(charge, h.allow)
  local from_extra = h.legacy and 0 or math.min(charge - from_allow, h.amount - h.allow)
  local rest = charge - from_allow - from_extra
  allow, extra = allow - from_allow, extra - from_extra
  local unused = h.allow - from_allow
  if unused > 0 and h.gen ~= tonumber(a[5] or '0') then
    allow = allow - unused
    redis.call('HINCRBY', acct, 'expired', unused)
  end
  local spare = math.min(math.max(allow - held_allow, 0), rest)
  allow, extra = allow - spare, extra - (rest - spare)
  redis.call('HSET', acct, 'allow', allow, 'extra', extra, 'held', held, 'held_allow', held_allow)
  return allow + extra - held
end
