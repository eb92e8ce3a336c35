-- lib/budget.lua: a key's own credit budgets, as limit rows (lib/limits.lua) of the account's limits
-- hash: `key_budget:<owner>` per billing cycle (its `c:` counter is cleared with the account's other
-- cycle counters when the account's cycle rolls, so it follows the account's cycle, never a clock of
-- its own) and `key_lifetime:<owner>` for ever (an `l:` counter). The owner is the key whose counters
-- they are: the key itself, or for a rotated key the key it replaced (`budget_id`), so a rotation
-- never starts a budget afresh. Settle counts a charge in both counters (budget_spent).
-- Input: the key's HMGET reply {status, expires_ms, budget_cycle, budget_life, budget_id}, its id.
-- Returns: budget_rows: the owner (nil without a budget) and how many rows it put in front of `rows`;
-- budget_spent: nothing.
local function budget_rows(k, kid, rows)
  if not (k[3] or k[4]) then return nil, 0 end
  local owner = k[5] or kid
  if k[4] then table.insert(rows, 1, {'key_lifetime:' .. owner, 'c', tonumber(k[4]), 'a', -2, 0}) end
  if k[3] then table.insert(rows, 1, {'key_budget:' .. owner, 'c', tonumber(k[3]), 'a', 0, 0}) end
  return owner, (k[3] and 1 or 0) + (k[4] and 1 or 0)
end

local function budget_spent(lim, owner, charge)
  if charge == 0 then return end
  redis.call('HINCRBY', lim, 'c:a:key_budget:' .. owner, charge)
  redis.call('HINCRBY', lim, 'l:a:key_lifetime:' .. owner, charge)
end
