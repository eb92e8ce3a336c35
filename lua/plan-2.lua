-- plan-2.lua: change an account's plan: an upgrade at once, crediting the allowance difference for
-- the rest of the cycle; a downgrade at the next cycle; optionally a subscription end.
-- Uses lib/clock.lua.
-- KEYS[1] account hash   KEYS[2] ledger stream
-- ARGV[1] the plan the caller read (the change is refused if it moved)   ARGV[2] new plan
-- ARGV[3] when: 'now' or 'next_cycle'   ARGV[4] the new plan's allowance   ARGV[5] the current one's
-- ARGV[6] subscription end (ms; 0 none, -1 unchanged)   ARGV[7] clock offset (ms)
-- Returns {status, credited}; status 0 done, 10 no account, 14 the plan moved (read it again).
local plan = redis.call('HGET', KEYS[1], 'plan')
if not plan then return {10, 0} end
if plan ~= ARGV[1] then return {14, 0} end
local credited = 0
if ARGV[3] == 'now' then
  credited = math.max(tonumber(ARGV[4]) - tonumber(ARGV[5]), 0)
  redis.call('HSET', KEYS[1], 'plan', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'allow', credited)
  redis.call('HINCRBY', KEYS[1], 'granted', credited)
  redis.call('HDEL', KEYS[1], 'next_plan', 'next_allow')
else
  redis.call('HSET', KEYS[1], 'next_plan', ARGV[2], 'next_allow', ARGV[4])
end
if tonumber(ARGV[6]) >= 0 then redis.call('HSET', KEYS[1], 'plan_expires_ms', ARGV[6]) end
redis.call('XADD', KEYS[2], '*', 'type', 'plan_change', 'ts', now_ms(ARGV[7]), 'from', plan, 'to', ARGV[2],
           'when', ARGV[3], 'amount', credited, 'expires_ms', ARGV[6])
return {0, credited}
