-- lib/hold.lua: a hold's record in the holds hash (lib/balance.lua ends it against the account).
-- Live: `amount allowance-part allowance-generation lowered tokens micro-USD [budget owner]` (a bare
-- amount is a hold taken before holds had parts: it is ended against the unheld balance; the budget
-- owner is the key id whose budget counters the charge goes to, see lib/budget.lua). Ended: a
-- tombstone `~s` settled, `~x` released or cancelled, `~r` reaped (`~r <owner>` for a hold under a key
-- budget, so a late settle still counts in it); kept until its hold-expiry score passes.
-- Returns: hold_record: nil, {ended = state, budget} or the live fields (`text`: the amount as stored;
-- lowered, tokens and micro-USD may be text); entomb: nothing.
local function hold_record(holds, rid)
  local v = redis.call('HGET', holds, rid)
  if not v then return nil end
  if string.sub(v, 1, 1) == '~' then
    return {ended = string.sub(v, 2, 2), budget = #v > 3 and string.sub(v, 4) or nil}
  end
  -- the live format in one match: only the amounts are numbers (the rest is read on a retry only)
  local n, allow, gen, lowered, tokens, usd, owner = string.match(v, '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) ?(%S*)$')
  if n then
    return {amount = tonumber(n), text = n, allow = tonumber(allow), gen = tonumber(gen), lowered = lowered,
            tokens = tokens, usd = usd, budget = owner ~= '' and owner or nil}
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
