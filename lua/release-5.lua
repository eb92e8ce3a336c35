-- release-5.lua: end a hold without any charge: the request never reached the provider, the provider
-- refused it, or the reserve's caller gave up waiting for its answer (a cancel, which may arrive
-- before the reserve itself: the tombstone it leaves makes that late reserve refuse).
-- Uses lib/balance.lua, lib/clock.lua, lib/hold.lua and lib/settle.lua.
-- KEYS[1] account hash   KEYS[2] holds hash   KEYS[3] hold expiry zset   KEYS[4] ledger stream
-- KEYS[5] limits hash (see lib/limits.lua)
-- ARGV[1] request id     ARGV[2] reason     ARGV[3] clock offset (ms)   ARGV[4] tombstone time (ms)
-- ARGV[5] the limits the request was reserved under ('' for none)   ARGV[6] key id
-- ARGV[7] '1' when the provider answered (refused): the request counts in rolling request windows
-- (the provider counts it too), never in credits, tokens or per-cycle quotas.
-- Returns {status, released}; status 0 released, 2 hold already ended or never taken (no effect).
local now = now_ms(ARGV[3])
local h = hold_record(KEYS[2], ARGV[1])
if not h then
  entomb(KEYS[2], KEYS[3], ARGV[1], 'x', now, ARGV[4])
  return {2, 0}
end
if h.ended then return {2, 0} end
local b = hold_fields(redis.call('HMGET', KEYS[1], unpack(HOLD_FIELDS)))
end_hold(KEYS[1], b, h, 0)
put_hold_fields(KEYS[1], b)
entomb(KEYS[2], KEYS[3], ARGV[1], 'x', now, ARGV[4])
give_back(KEYS[5], ARGV[1])
if ARGV[7] == '1' and ARGV[5] ~= '' then
  count_usage(KEYS[5], cjson.decode(ARGV[5]), ARGV[6], {c = 0, t = 0, u = 0, n = 1}, now, true)
end
redis.call('XADD', KEYS[4], '*', 'type', 'released', 'ts', now, 'rid', ARGV[1], 'cost', 0,
           'hold', h.amount, 'reason', ARGV[2])
return {0, h.amount}
