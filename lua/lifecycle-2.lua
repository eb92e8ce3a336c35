-- lifecycle-2.lua: suspend, reactivate or close an account. Suspended and closed accounts are refused
-- by reserve-5 (no new hold; requests in flight settle normally); closed is final. Uses lib/clock.lua.
-- KEYS[1] account hash   KEYS[2] ledger stream
-- ARGV[1] the new status: 'suspended', 'active' or 'closed'   ARGV[2] reason   ARGV[3] clock offset (ms)
-- Returns {status, account status after}; status 0 done (also when already so: no event then),
-- 10 no account, 37 the account is closed (nothing can change it).
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {10, ''} end
if current == 'closed' then
  if ARGV[1] == 'closed' then return {0, current} end
  return {37, current}
end
if current == ARGV[1] then return {0, current} end
local now = now_ms(ARGV[3])
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'status_reason', ARGV[2], 'status_ms', now)
local kind = (ARGV[1] == 'active') and 'reactivated' or ARGV[1]
redis.call('XADD', KEYS[2], '*', 'type', 'account_' .. kind, 'ts', now, 'from', current, 'reason', ARGV[2])
return {0, ARGV[1]}
