-- lib/cycle.lua: the lazy start of a new billing cycle, and a lapsed subscription's fallback.
-- Input: the account hash, limits hash, account fields `a` (HMGET order of reserve-5), now, ARGV.
-- Returns: status (0 go on, 14 plan changed, 16 stale bounds), the plan, and the allowance left.
local function roll_cycle(acct, lim, a, now, argv)
  local plan, allow = a[1], tonumber(a[3] or '0')
  local plan_expires = tonumber(a[7] or '0')
  if plan_expires > 0 and now >= plan_expires then
    local fallback_allow = tonumber(argv[17])
    redis.call('HSET', acct, 'plan', argv[16], 'allow', fallback_allow, 'plan_expires_ms', 0)
    redis.call('HINCRBY', acct, 'granted', fallback_allow)
    redis.call('HINCRBY', acct, 'expired', allow)
    redis.call('HDEL', acct, 'next_plan', 'next_allow')
    return 14, argv[16], fallback_allow
  end
  if now < tonumber(a[6] or '0') then return 0, plan, allow end
  local cs, ce = tonumber(argv[13]), tonumber(argv[14])
  if not (cs <= now and now < ce) then return 16, plan, allow end
  local new_plan, new_allow = plan, tonumber(argv[15])
  if a[8] then
    new_plan, new_allow = a[8], tonumber(a[9] or '0')
  elseif plan ~= argv[2] then
    return 14, plan, allow  -- priced with another plan's allowance: let the caller re-price first
  end
  redis.call('HSET', acct, 'plan', new_plan, 'allow', new_allow, 'cycle_start_ms', cs, 'cycle_end_ms', ce,
             'cycle_used', 0, 'cycle_requests', 0, 'cycle_tokens', 0)
  redis.call('HINCRBY', acct, 'granted', new_allow)
  redis.call('HINCRBY', acct, 'expired', allow)
  redis.call('HDEL', acct, 'next_plan', 'next_allow')
  for _, f in ipairs(redis.call('HKEYS', lim)) do
    if string.sub(f, 1, 2) == 'c:' then redis.call('HDEL', lim, f) end
  end
  return 0, new_plan, new_allow
end
