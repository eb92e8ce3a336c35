-- lib/settle.lua: ending a request's limit holds, and counting what it used.
-- give_back(lim, rid): return what r:<rid> holds. count_usage(lim, rows, kid, used, now): add the
-- actual amounts (used[metric]) to each row's cycle counter or current window bucket.
-- Returns: count_usage: {id, counter after, cap, ...} for the rows counted per cycle (for alerts).
local function give_back(lim, rid)
  local record = redis.call('HGET', lim, 'r:' .. rid)
  if not record then return end
  for field, amount in string.gmatch(record, '(%S+) (%S+)') do
    redis.call('HINCRBY', lim, field, -tonumber(amount))
  end
  redis.call('HDEL', lim, 'r:' .. rid)
end

local function count_usage(lim, rows, kid, used, now)
  local cycle = {}
  for _, l in ipairs(rows) do
    local id, metric, window, bucket = l[1], l[2], l[5], l[6]
    local prefix = (l[4] == 'k') and ('k:' .. kid .. ':') or 'a:'
    if window == 0 then
      local after = redis.call('HINCRBY', lim, 'c:' .. prefix .. id, used[metric])
      cycle[#cycle + 1] = id
      cycle[#cycle + 1] = after
      cycle[#cycle + 1] = l[3]
    elseif window > 0 then
      local current, count = math.floor(now / bucket), math.floor(window / bucket)
      redis.call('HINCRBY', lim, 'w:' .. prefix .. id .. ':' .. current, used[metric])
      redis.call('HDEL', lim, 'w:' .. prefix .. id .. ':' .. (current - count),
                 'w:' .. prefix .. id .. ':' .. (current - count - 1))
    end
  end
  return cycle
end
