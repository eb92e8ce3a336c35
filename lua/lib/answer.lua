-- lib/answer.lua: the reserve's replies beyond a plain hold (see reserve-5.lua), and what they need.
-- Input: a reply, and what lib/limits.lua check_limits found (`tight`, or the refusal `r`).
-- Returns: note_window: nothing; tightest: the reply with the windows appended; refusal: the reply.

-- keeps in `tight`, per metric n and t, the request or token window (rolling or per cycle) of row `l`
-- with the least room: {cap, room, ms until whole again}. A cycle quota is whole again at the cycle's
-- end (`frees`), a rolling window once the bucket of now has left it.
local function note_window(tight, l, room, frees, now)
  if l[5] < 0 or (l[2] ~= 'n' and l[2] ~= 't') or (tight[l[2]] and tight[l[2]][2] <= room) then return end
  local whole = frees
  if l[5] > 0 then whole = (math.floor(now / l[6]) + math.floor(l[5] / l[6])) * l[6] - now end
  tight[l[2]] = {l[3], room, whole}
end

-- `reply` with the tightest request and token windows of `tight` (check_limits) after the hold `want`
-- appended as cap, remaining, ms until whole (-1 -1 -1 for a metric without one), when there is one
local function tightest(reply, tight, want)
  if not (tight.n or tight.t) then return reply end
  for _, m in ipairs({'n', 't'}) do
    local w = tight[m] or {-1, want[m] - 1, -1}
    reply[#reply + 1], reply[#reply + 2], reply[#reply + 3] = w[1], w[2] - want[m], w[3]
  end
  return reply
end

-- the reserve's reply to a refusal of check_limits: 22 when one of the first `budgets` rows (the
-- key's own budgets, lib/budget.lua) refused, else 21 (see reserve-5.lua)
local function refusal(r, budgets, available, plan)
  if r[8] <= budgets then
    return {22, 0, math.max(r[3] - r[2], 0), plan, 0, 0, r[7] == 0 and 'cycle' or 'lifetime', r[2], r[3]}
  end
  return {21, 0, available, plan, 0, 0, r[1], r[2], r[3], r[4], r[5], r[6], r[7]}
end

