-- reserve-4.lua: hold the worst-case cost of one request, or what the balance affords.
-- KEYS[1] account hash   KEYS[2] API key hash   KEYS[3] holds hash   KEYS[4] hold expiry zset
-- ARGV[1] request id     ARGV[2] plan the caller priced with
-- ARGV[3] full cost: prompt bound + every output token the request may produce (micro-credits)
-- ARGV[4] minimum cost: prompt bound + one output token (micro-credits)
-- ARGV[5] lease (ms)     ARGV[6] clock offset (ms; 0 outside tests)
-- Returns {status, held, available_after, plan}; status 0 full hold, 1 lowered hold (everything
-- available), 10 no account, 11 disabled, 12 key revoked, 13 key expired, 14 plan changed,
-- 15 duplicate request id, 20 insufficient credits.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[6])
local a = redis.call('HMGET', KEYS[1], 'plan', 'status', 'allow', 'extra', 'held')
if not a[1] then return {10, 0, 0, ''} end
local plan = a[1]
if a[2] ~= 'active' then return {11, 0, 0, plan} end
local k = redis.call('HMGET', KEYS[2], 'status', 'expires_ms')
if k[1] ~= 'active' then return {12, 0, 0, plan} end
local expires = tonumber(k[2] or '0')
if expires > 0 and now >= expires then return {13, 0, 0, plan} end
if plan ~= ARGV[2] then return {14, 0, 0, plan} end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return {15, 0, 0, plan} end
local available = tonumber(a[3] or '0') + tonumber(a[4] or '0') - tonumber(a[5] or '0')
local hold = tonumber(ARGV[3])
local status = 0
if available < hold then
  if available < tonumber(ARGV[4]) then return {20, 0, available, plan} end
  hold = available
  status = 1
end
redis.call('HINCRBY', KEYS[1], 'held', hold)
redis.call('HSET', KEYS[3], ARGV[1], hold)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]), ARGV[1])
return {status, hold, available - hold, plan}
