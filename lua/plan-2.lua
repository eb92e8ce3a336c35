-- plan-2.lua: change an account's plan, at once or at the next cycle; optionally a subscription end.
-- At once, the allowance follows the new plan without ever crediting more in one cycle than the
-- largest plan held in it (`cycle_allowance`): an upgrade credits max(new - cycle_allowance, 0); a
-- downgrade lowers `allow` to what the new plan leaves after this cycle's use (never below what
-- holds draw on it), the removed part counted as expired. A `cycle_allowance` written in an earlier
-- cycle (`cycle_allowance_start` is not this cycle's start) is the current plan's. Uses lib/clock.lua.
-- KEYS[1] account hash   KEYS[2] ledger stream
-- ARGV[1] the plan the caller read (the change is refused if it moved)   ARGV[2] new plan
-- ARGV[3] when: 'now' or 'next_cycle'   ARGV[4] the new plan's allowance   ARGV[5] the current one's
-- ARGV[6] subscription end (ms; 0 none, -1 unchanged)   ARGV[7] clock offset (ms)
-- ARGV[8] next_cycle: the start of the next cycle by the calendar (ms); the change waits for it even
-- if the cycle now running has not been started yet (cycles start lazily, at the next reserve)
-- Returns {status, credited, removed}; status 0 done, 10 no account, 14 the plan moved (read it again).
local a = redis.call('HMGET', KEYS[1], 'plan', 'allow', 'extra', 'held', 'held_allow', 'cycle_allowance',
                     'cycle_used', 'cycle_allowance_start', 'cycle_start_ms')
local plan = a[1]
if not plan then return {10, 0, 0} end
if plan ~= ARGV[1] then return {14, 0, 0} end
local credited, removed = 0, 0
if ARGV[3] == 'now' then
  local new_allow, allow = tonumber(ARGV[4]), tonumber(a[2] or '0')
  local cycle_allowance = tonumber(a[6] or ARGV[5])
  if a[8] ~= a[9] then cycle_allowance = tonumber(ARGV[5]) end
  redis.call('HSET', KEYS[1], 'cycle_allowance', math.max(new_allow, cycle_allowance),
             'cycle_allowance_start', a[9] or '0')
  if new_allow >= cycle_allowance then
    credited = new_allow - cycle_allowance
  else
    -- what holds claim of the allowance stays (held_allow; before that field, held beyond `extra`)
    local extra, held = tonumber(a[3] or '0'), tonumber(a[4] or '0')
    local floor = math.max(tonumber(a[5] or '0'), held - extra, 0)
    local target = math.max(math.min(allow, new_allow - tonumber(a[7] or '0')), floor)
    removed = math.max(allow - target, 0)
  end
  redis.call('HSET', KEYS[1], 'plan', ARGV[2], 'allow', allow + credited - removed)
  redis.call('HINCRBY', KEYS[1], 'granted', credited)
  redis.call('HINCRBY', KEYS[1], 'expired', removed)
  redis.call('HDEL', KEYS[1], 'next_plan', 'next_allow', 'next_from_ms')
else
  redis.call('HSET', KEYS[1], 'next_plan', ARGV[2], 'next_allow', ARGV[4], 'next_from_ms', ARGV[8])
end
if tonumber(ARGV[6]) >= 0 then redis.call('HSET', KEYS[1], 'plan_expires_ms', ARGV[6]) end
redis.call('XADD', KEYS[2], '*', 'type', 'plan_change', 'ts', now_ms(ARGV[7]), 'from', plan, 'to', ARGV[2],
           'when', ARGV[3], 'amount', credited, 'expired', removed, 'expires_ms', ARGV[6])
return {0, credited, removed}
