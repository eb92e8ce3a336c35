-- updatekey-3.lua: change a key's label, expiry or budgets. A change that lets a key authenticate longer is
-- refused when the account's other usable keys already fill the plan's key limit (so an expired or
-- rotated key cannot be revived past it). Uses lib/clock.lua.
-- KEYS[1] the key's record hash   KEYS[2] usable keys zset   KEYS[3] ledger stream
-- ARGV[1] key id   ARGV[2] most usable keys (0: no limit)   ARGV[3] clock offset (ms)
-- ARGV[4] '1' to set the label   ARGV[5] the label   ARGV[6] new expiry (ms; 0 never; '' unchanged)
-- ARGV[7] budget per cycle, ARGV[8] lifetime budget (micro-credits; 'none' to remove; '' unchanged):
-- the next reserve applies them (lib/budget.lua); what the key spent so far still counts.
-- Returns {status, usable keys}; status 0 changed, 10 no such key, 30 the plan's key limit is reached.
local rec = redis.call('HMGET', KEYS[1], 'status', 'expires_ms')
if not rec[1] then return {10, 0} end
local now = now_ms(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local event = {'type', 'key_updated', 'ts', now, 'key_id', ARGV[1]}
if ARGV[6] ~= '' then
  local new, old = tonumber(ARGV[6]), tonumber(rec[2] or '0')
  local usable_after = rec[1] == 'active' and (new == 0 or new > now)
  if usable_after and old ~= 0 and (new == 0 or new > old) then
    local others = redis.call('ZCARD', KEYS[2])
    if redis.call('ZSCORE', KEYS[2], ARGV[1]) then others = others - 1 end
    local most = tonumber(ARGV[2])
    if most > 0 and others >= most then return {30, others} end
  end
  if usable_after then
    redis.call('ZADD', KEYS[2], new > 0 and new or '+inf', ARGV[1])
  else
    redis.call('ZREM', KEYS[2], ARGV[1])
  end
  redis.call('HSET', KEYS[1], 'expires_ms', new)
  event[#event + 1], event[#event + 2] = 'expires_ms', new
end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'label', ARGV[5])
  event[#event + 1], event[#event + 2] = 'label', ARGV[5]
end
for i, field in ipairs({'budget_cycle', 'budget_life'}) do
  local v = ARGV[6 + i]
  if v == 'none' then redis.call('HDEL', KEYS[1], field) elseif v ~= '' then redis.call('HSET', KEYS[1], field, v) end
  if v ~= '' then event[#event + 1], event[#event + 2] = field, v end
end
redis.call('XADD', KEYS[3], '*', unpack(event))
return {0, redis.call('ZCARD', KEYS[2])}
