-- lib/settle.lua: ending a request's limit holds, and counting what it used.
-- give_back(lim, rid): return what r:<rid> holds. count_usage(lim, rows, kid, used, now, windows_only):
-- add the actual amounts (used[metric]) to each row's cycle counter (unless windows_only) or current
-- window bucket; buckets that left their window are deleted (b:<scope>:<id> lists the live ones).
-- Returns: count_usage: {id, counter after, cap, ...} for the rows counted per cycle (for alerts).
local function give_back(lim, rid)
  local record = redis.call('HGET', lim, 'r:' .. rid)
  if not record then return end
  for field, amount in string.gmatch(record, '(%S+) (%S+)') do
    redis.call('HINCRBY', lim, field, 0 - tonumber(amount))  -- never -0: Redis < 7.2 rejects '-0'
  end
  redis.call('HDEL', lim, 'r:' .. rid)
end

-- A bucket that had counted something before is listed already, and nothing left the window since
-- it was listed (buckets leave it only when `current` moves on, and the first bump of a new bucket
-- deletes them): only a new bucket rewrites the list.
local function bump_window(lim, name, current, count, amount)
  if redis.call('HINCRBY', lim, 'w:' .. name .. ':' .. current, amount) > amount then return end
  local live, stale = {}, {}
  for i in string.gmatch(redis.call('HGET', lim, 'b:' .. name) or '', '%S+') do
    if tonumber(i) <= current - count then stale[#stale + 1] = 'w:' .. name .. ':' .. i
    elseif tonumber(i) ~= current then live[#live + 1] = i end
  end
  live[#live + 1] = string.format('%.0f', current)
  if #stale > 0 then redis.call('HDEL', lim, unpack(stale)) end
  redis.call('HSET', lim, 'b:' .. name, table.concat(live, ' '))
end

local function count_usage(lim, rows, kid, used, now, windows_only)
  local cycle = {}
  for _, l in ipairs(rows) do
    local id, metric, window, bucket = l[1], l[2], l[5], l[6]
    local prefix = (l[4] == 'k') and ('k:' .. kid .. ':') or 'a:'
    if window == 0 and not windows_only then
      local after = redis.call('HINCRBY', lim, 'c:' .. prefix .. id, used[metric])
      cycle[#cycle + 1] = id
      cycle[#cycle + 1] = after
      cycle[#cycle + 1] = l[3]
    elseif window > 0 and used[metric] > 0 then
      bump_window(lim, prefix .. id, math.floor(now / bucket), math.floor(window / bucket), used[metric])
    end
  end
  return cycle
end
