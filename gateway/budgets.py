"""Per-key credit budgets: what an operator may set on a key, and how a key view shows them.

A key may carry a budget per billing cycle and a lifetime budget (micro-credits in its record,
`budget_cycle` and `budget_life`); the reserve script holds each request against them in the same
atomic call as the account's balance and limits (lua/lib/budget.lua). Their counters live in the
account's limits hash: `c:a:key_budget:<owner>` (cleared when the account's billing cycle rolls),
`l:a:key_lifetime:<owner>` and what requests in flight hold, `h:a:key_budget:<owner>` /
`h:a:key_lifetime:<owner>`. The owner is the key, or for a rotated key the key it replaced
(`budget_id`), so rotation carries the spend along. Spend is counted while a key has a budget.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import BadRequest
from gateway.keys import AccountKeys
from gateway.money import credits_to_micro, format_credits

#: Request field -> key record field.
BUDGET_FIELDS = {"budget_credits_per_cycle": "budget_cycle", "budget_credits_lifetime": "budget_life"}


def parse_budget(body: dict[str, Any], name: str) -> int | None:
    """A budget in credits (decimal string or number) as micro-credits; None for null (no budget).
    The caller checks `name in body` first: an absent field leaves the budget unchanged."""
    value = body[name]
    if value is None:
        return None
    try:
        micro = credits_to_micro(value)
    except ValueError as exc:
        raise BadRequest(f"Invalid '{name}': {exc}.", param=name) from None
    if micro <= 0:
        raise BadRequest(f"'{name}' must be a positive number of credits (null for no budget).", param=name)
    return micro


def budget_changes(body: dict[str, Any]) -> dict[str, int | None]:
    """The budgets a request sets: record field -> micro-credits, or None to remove (absent: unchanged)."""
    return {field: parse_budget(body, name) for name, field in BUDGET_FIELDS.items() if name in body}


def budget_pairs(changes: dict[str, int | None]) -> list[str]:
    """A new key's record fields for its budgets (`field, value, ...`)."""
    return [item for field, micro in changes.items() if micro is not None for item in (field, str(micro))]


def owner_of(key_id: str, rec: dict[str, str]) -> str:
    return rec.get("budget_id") or key_id


async def sharing_keys(redis: Any, keys: AccountKeys, key_id: str, rec: dict[str, str]) -> list[str]:
    """The account's other keys that spend from the same counters as `key_id` (a rotation's old and new
    keys): a budget set on one is set on all, or an old key in its grace period would go on spending
    up to the cap its replacement no longer has."""
    owner = owner_of(key_id, rec)
    others = sorted(k for k in await redis.smembers(keys.key_ids) if k != key_id)
    pipe = redis.pipeline(transaction=False)
    for other in others:
        pipe.hget(keys.api_key(other), "budget_id")
    return [other for other, budget_id in zip(others, await pipe.execute(), strict=True)
            if (budget_id or other) == owner]


def counter_fields(owner: str) -> list[str]:
    """The limits-hash fields of one budget owner: spent this cycle, for ever, held by each budget."""
    return [f"c:a:key_budget:{owner}", f"l:a:key_lifetime:{owner}", f"h:a:key_budget:{owner}",
            f"h:a:key_lifetime:{owner}"]


def _money(name: str, micro: int | None) -> dict[str, Any]:
    return {name: None if micro is None else format_credits(micro), f"{name}_micro": micro}


def budget_view(rec: dict[str, str], counters: list[str | None], cycle_over: bool) -> dict[str, Any]:
    """A key's budget fields (contracts.md): the budgets, spent this cycle and for ever, and what is
    left of the tighter one after what requests in flight hold (all null without a budget: a key's
    spend is counted only while it has one; the statement's by_key has every key's usage). `cycle_over`:
    the account's cycle has ended and no request has started the next yet (its counters are stale)."""
    per_cycle = int(rec["budget_cycle"]) if rec.get("budget_cycle") else None
    lifetime = int(rec["budget_life"]) if rec.get("budget_life") else None
    spent_cycle: int | None
    spent_life: int | None
    spent_cycle, spent_life, held_cycle, held_life = (int(v or 0) for v in counters)
    if cycle_over:
        spent_cycle = 0
    rooms = [cap - spent - held for cap, spent, held in ((per_cycle, spent_cycle, held_cycle),
                                                         (lifetime, spent_life, held_life)) if cap is not None]
    if per_cycle is None and lifetime is None:  # a key's spend is counted only while it has a budget
        spent_cycle = spent_life = None
    return {**_money("budget_credits_per_cycle", per_cycle), **_money("budget_credits_lifetime", lifetime),
            **_money("spent_this_cycle", spent_cycle), **_money("spent_lifetime", spent_life),
            **_money("budget_remaining", max(min(rooms), 0) if rooms else None)}


async def with_budgets(redis: Any, keys: AccountKeys, views: list[dict[str, Any]],
                       records: list[dict[str, str]], now_ms: int) -> list[dict[str, Any]]:
    """`views` (key views of `records`) with their budget fields, read in one round trip."""
    pipe = redis.pipeline(transaction=False)
    pipe.hget(keys.account, "cycle_end_ms")
    for view, rec in zip(views, records, strict=True):
        pipe.hmget(keys.limits, counter_fields(owner_of(view["id"], rec)))
    cycle_end, *counters = await pipe.execute()
    over = int(cycle_end or 0) <= now_ms
    return [{**view, **budget_view(rec, c, over)} for view, rec, c in zip(views, records, counters, strict=True)]


def cli_budgets(per_cycle: str | None, lifetime: str | None) -> dict[str, int | None]:
    """`--budget` / `--lifetime-budget` of the CLI ('none' removes one; absent: unchanged)."""
    given = {"budget_credits_per_cycle": per_cycle, "budget_credits_lifetime": lifetime}
    return budget_changes({k: None if v.lower() == "none" else v for k, v in given.items() if v is not None})
