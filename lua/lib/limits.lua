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
  if window == 0 then return tonumber(redis.call('HGET', lim, 'c:' .. prefix .. id) or '0'), cycle_end - now end
  if window == -2 then return tonumber(redis.call('HGET', lim, 'l:' .. prefix .. id) or '0'), 0 end
  if window < 0 then return 0, 1000 end
  -- the window's buckets that exist are the ones its list names (lib/settle.lua bump_window): only
  -- those are read, by names made from the list's own text (no number formatting)
  local current, count = math.floor(now / bucket), math.floor(window / bucket)
  local base, names, index = 'w:' .. prefix .. id .. ':', {}, {}
  for i in string.gmatch(redis.call('HGET', lim, 'b:' .. prefix .. id) or '', '%S+') do
    local n = tonumber(i)
    if n > current - count and n <= current then names[#names + 1], index[#index + 1] = base .. i, n end
  end
  if #names == 0 then return 0, 1000 end
  local used, oldest = 0
  for k, v in ipairs(redis.call('HMGET', lim, unpack(names))) do
    local x = tonumber(v or '0')
    if x > 0 then used, oldest = used + x, math.min(oldest or index[k], index[k]) end
  end
  return used, oldest and ((oldest + count) * bucket - now) or 1000
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
