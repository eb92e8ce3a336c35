-- lib/balance.lua: ending a hold (lib/hold.lua) against the account's balance fields, read by the
-- caller in one HMGET and written back in one HSET (a call per field costs more than the fields).
-- Input: the HMGET reply starting with HOLD_FIELDS; a hold record; the charge.
-- Returns: hold_fields: the fields as numbers; put_hold_fields: nothing; end_hold: the unheld balance after;
-- int_text: an integer as Redis reads one (the caller's text `s` when it is one already: no formatting).

-- the fields end_hold works on: callers HMGET them first (then any fields of their own)
local HOLD_FIELDS = {'allow', 'extra', 'held', 'held_allow', 'agen'}
local function hold_fields(a)
  local b = {allow = tonumber(a[1] or '0'), extra = tonumber(a[2] or '0'), held = tonumber(a[3] or '0'),
             held_allow = tonumber(a[4] or '0'), agen = tonumber(a[5] or '0')}
  b.was = {b.allow, b.extra, b.held, b.held_allow}
  return b
end

local function int_text(s, n)
  if s == '0' or string.find(s, '^[1-9]%d*$') then return s end
  return string.format('%.0f', n + 0)  -- '%.0f': exact below 2^53 (Lua's tostring is %.14g); + 0: never '-0'
end

-- writes what end_hold changed, in one HSET
local function put_hold_fields(acct, b)
  local args = {}
  for i, f in ipairs({'allow', 'extra', 'held', 'held_allow'}) do
    if b[f] ~= b.was[i] then
      args[#args + 1], args[#args + 2] = f, int_text('', b[f])
    end
  end
  if #args > 0 then redis.call('HSET', acct, unpack(args)) end
end

-- Take `charge` from hold `h` (allowance part first), then any rest from balance no hold claims
-- (allowance first); release what is left of `h`. The unused allowance part of a hold taken in an
-- earlier allowance generation (before a cycle rollover or a plan lapse) expires now. Changes the
-- account's fields `b` (hold_fields) in place, for put_hold_fields.
local function end_hold(acct, b, h, charge)
  b.held, b.held_allow = b.held - h.amount, b.held_allow - h.allow
  local from_allow = math.min(charge, h.allow)
  local from_extra = h.legacy and 0 or math.min(charge - from_allow, h.amount - h.allow)
  local rest = charge - from_allow - from_extra
  local allow, extra = b.allow - from_allow, b.extra - from_extra
  local unused = h.allow - from_allow
  if unused > 0 and h.gen ~= b.agen then
    allow = allow - unused
    redis.call('HINCRBY', acct, 'expired', int_text('', unused))
  end
  local spare = math.min(math.max(allow - b.held_allow, 0), rest)
  b.allow, b.extra = allow - spare, extra - (rest - spare)
  return b.allow + b.extra - b.held
end
