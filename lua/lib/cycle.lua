-- lib/cycle.lua: the lazy start of a new billing cycle, and a lapsed subscription's fallback.
-- Input: the account hash, limits hash, account fields `a` (HMGET order of reserve-5), now, ARGV. A
-- queued change's fields, rarely set, are read only when a cycle ends.
-- A queued plan change (next_plan) applies at the first cycle starting at or after next_from_ms.
-- Only the unheld part of the allowance expires: what requests in flight hold of it (held_allow)
-- is carried into the new allowance generation and ends with them (lib/balance.lua end_hold).
-- Returns: status (0 go on, 14 plan changed, 16 stale bounds), the plan, the allowance, its generation
-- and the end of the cycle now (ms).
-- close_cycle: the snapshot a statement reads (gateway.statements), written as the old cycle ends, its
-- unheld allowance expired: field `close:<its start>` = "end rolled_at balance granted charged expired
-- grants packs adjusted plan" (balance = allowance + purchased, holds included; the rest cumulative).
local function close_cycle(acct, a, expiring, carried, now)
  local p = redis.call('HMGET', acct, 'cycle_start_ms', 'granted', 'charged', 'expired', 'credited_grants',
                       'credited_packs', 'adjusted')
  if not p[1] then return end
  local n = {tonumber(a[6] or '0'), now, carried + tonumber(a[4] or '0'), tonumber(p[2] or '0'),
             tonumber(p[3] or '0'), tonumber(p[4] or '0') + expiring, tonumber(p[5] or '0'),
             tonumber(p[6] or '0'), tonumber(p[7] or '0')}
  local parts = {}
  for i, v in ipairs(n) do parts[i] = string.format('%.0f', v) end
  parts[#parts + 1] = a[1]
  redis.call('HSET', acct, 'close:' .. p[1], table.concat(parts, ' '))
end

local function roll_cycle(acct, lim, a, now, argv)
  local plan, allow, gen = a[1], tonumber(a[3] or '0'), tonumber(a[9] or '0')
  local carried = tonumber(a[8] or '0')
  local new_plan, new_allow, status, applied
  local plan_expires = tonumber(a[7] or '0')
  if plan_expires > 0 and now >= plan_expires then
    new_plan, new_allow, status, applied = argv[16], tonumber(argv[17]), 14, true  -- a lapse drops a queued change
    redis.call('HSET', acct, 'plan_expires_ms', 0)
  elseif now < tonumber(a[6] or '0') then
    return 0, plan, allow, gen, tonumber(a[6])
  else
    local cs, ce = tonumber(argv[13]), tonumber(argv[14])
    if not (cs <= now and now < ce) then return 16, plan, allow, gen end
    local q = redis.call('HMGET', acct, 'next_plan', 'next_allow', 'next_from_ms')
    if q[1] and cs >= tonumber(q[3] or '0') then  -- a queued change, due from this cycle on
      new_plan, new_allow, applied = q[1], tonumber(q[2] or '0'), true
    elseif plan ~= argv[2] then
      return 14, plan, allow, gen  -- priced with another plan's allowance: let the caller re-price first
    else
      new_plan, new_allow = plan, tonumber(argv[15])
    end
    status = 0
    close_cycle(acct, a, allow - carried, carried, now)
    redis.call('HSET', acct, 'cycle_start_ms', cs, 'cycle_end_ms', ce, 'cycle_used', 0, 'cycle_requests', 0,
               'cycle_tokens', 0)
    for _, f in ipairs(redis.call('HKEYS', lim)) do
      if string.sub(f, 1, 2) == 'c:' then redis.call('HDEL', lim, f) end
    end
  end
  redis.call('HSET', acct, 'plan', new_plan, 'allow', new_allow + carried, 'cycle_allowance', new_allow,
             'agen', gen + 1)
  redis.call('HINCRBY', acct, 'granted', new_allow)
  redis.call('HINCRBY', acct, 'expired', allow - carried)
  if applied then redis.call('HDEL', acct, 'next_plan', 'next_allow', 'next_from_ms') end
  return status, new_plan, new_allow + carried, gen + 1, tonumber(argv[14])
end
