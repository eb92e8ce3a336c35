-- reap-5.lua: return the holds of one account whose lease has expired (their gateway is gone: a
-- live request renews its lease), and forget tombstones whose time has passed.
-- KEYS[1] account hash   KEYS[2] holds hash   KEYS[3] hold expiry zset   KEYS[4] ledger stream
-- KEYS[5] limits hash (see lib/limits.lua). Uses lib/balance.lua, lib/clock.lua, lib/hold.lua
-- and lib/settle.lua.
-- ARGV[1] clock offset (ms)   ARGV[2] most entries to look at in one call   ARGV[3] tombstone time (ms)
-- Returns {holds reaped, micro-credits returned}. Idempotent: a reaped hold leaves a tombstone `~r`,
-- so that a late settle still charges its request (settle-5.lua), in its key's budget too (`~r <owner>`).
local now = now_ms(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
if #expired == 0 then return {0, 0} end
local reaped, returned = 0, 0
-- every reaped hold ends in `b`, written back once
local b = hold_fields(redis.call('HMGET', KEYS[1], unpack(HOLD_FIELDS)))
for _, rid in ipairs(expired) do
  local h = hold_record(KEYS[2], rid)
  if not h or h.ended then
    redis.call('HDEL', KEYS[2], rid)
    redis.call('ZREM', KEYS[3], rid)
  else
    reaped, returned = reaped + 1, returned + h.amount
    end_hold(KEYS[1], b, h, 0)
    entomb(KEYS[2], KEYS[3], rid, h.budget and ('r ' .. h.budget) or 'r', now, ARGV[3])
    give_back(KEYS[5], rid)
    redis.call('XADD', KEYS[4], '*', 'type', 'reaped', 'ts', now, 'rid', rid, 'cost', 0, 'hold', h.amount)
  end
end
put_hold_fields(KEYS[1], b)
return {reaped, returned}
