-- lib/limits.lua: limit rows [id, metric c|t|u|n, cap, scope a|k, window ms (0 cycle, -1 in flight,
-- -2 lifetime), bucket ms] checked, held, counted and given back in the limits hash (`lim`).
-- Fields: `h:<scope>:<id>` what requests in flight hold of each limit, `c:<scope>:<id>` cycle counters
-- (cleared when the account's cycle rolls, lib/cycle.lua), `l:<scope>:<id>` lifetime counters,
-- `w:<scope>:<id>:<bucket>` window buckets (`b:<scope>:<id>` lists the live ones),
-- `r:<rid>` what one request holds (`field amount ...`).
-- Returns: see each function.
local function scope_of(scope, kid) return scope == 'k' and ('k:' .. kid .. ':') or 'a:' end

-- {used, ms until some of it frees} of one limit row at `now`
local function limit_used(lim, l, prefix, now, cycle_end)
  local id, window, bucket = l[1], l[5], l[6]
  if window == 0 then
    return tonumber(redis.call('HGET', lim, 'c:' .. prefix .. id) or '0'), cycle_end - now
  elseif window == -2 then
    return tonumber(redis.call('HGET', lim, 'l:' .. prefix .. id) or '0'), 0
  elseif window < 0 then
    return 0, 1000
  end
  local current, count = math.floor(now / bucket), math.floor(window / bucket)
  local names = {}
  for i = current - count + 1, current do names[#names + 1] = 'w:' .. prefix .. id .. ':' .. i end
  local used, frees = 0, 1000
  for i, v in ipairs(redis.call('HMGET', lim, unpack(names))) do
    if v and tonumber(v) > 0 then
      if used == 0 then frees = (current - count + i + count) * bucket - now end
      used = used + tonumber(v)
    end
  end
  return used, frees
end

-- lowers want[metric] to each limit's room; returns nil, or the refusal {id, used, cap, frees, scope,
-- metric, window, row index}. `tight` (a table) collects the tightest windows (lib/answer.lua).
local function check_limits(lim, rows, kid, want, least, now, cycle_end, tight)
  for i, l in ipairs(rows) do
    local prefix = scope_of(l[4], kid)
    local used, frees = limit_used(lim, l, prefix, now, cycle_end)
    used = used + tonumber(redis.call('HGET', lim, 'h:' .. prefix .. l[1]) or '0')
    local room = l[3] - used
    if room < least[l[2]] then return {l[1], used, l[3], frees, l[4], l[2], l[5], i} end
    if room < want[l[2]] then want[l[2]] = room end
    if tight then note_window(tight, l, room, frees, now) end
  end
  return nil
end

-- holds want[metric] in each row's own held field (a provider's cap never sees another's calls),
-- and records what it held under r:<rid>
local function hold_limits(lim, rows, kid, want, rid)
  local record = {}
  for _, l in ipairs(rows) do
    local field = 'h:' .. scope_of(l[4], kid) .. l[1]
    redis.call('HINCRBY', lim, field, want[l[2]])
    record[#record + 1] = field .. ' ' .. string.format('%.0f', want[l[2]])
  end
  if #record > 0 then redis.call('HSET', lim, 'r:' .. rid, table.concat(record, ' ')) end
end
