"""Statements: what an account was credited and used in each billing cycle, past and current.

Exact without scanning history: as a cycle ends (lazily, in the reserve that starts the next one:
lua/lib/cycle.lua `close_cycle`), the account hash gets one `close:<cycle start>` snapshot of the
balance and of the cumulative counters (granted, charged, expired, grants, packs, adjustments). A
cycle's figures are the differences between its closing snapshot and the previous one (the live
counters for the cycle now open), so `opening + credited - used = closing` holds to the micro-credit:
it is the conservation invariant (granted = balance + charged + expired) between two moments.

- `used` is what was charged (settled) in the cycle; a request in flight at the rollover is charged in
  the cycle where it settles, and its hold stays in the balance (`closing` includes held credits).
- `allowance` is the plan's allowance credited in the cycle (at its start, and by an upgrade);
  `expired` is the allowance that lapsed (the unheld part at the cycle's end, or removed by a
  downgrade). The allowance of a month without any request is never credited: its cycle never starts.
- `by_model` / `by_key` sum the cycle's usage events, reading at most SUMMARY_SCAN_MAX ledger entries
  (then `truncated: true`); the totals above never depend on that read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.config import Config
from gateway.errors import BadRequest, NotFound
from gateway.keys import AccountKeys
from gateway.ledger import SUMMARY_SCAN_MAX, parse_entry
from gateway.money import amount
from gateway.views import iso


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The balance and cumulative counters at a cycle's end (or now, for the open cycle)."""

    start_ms: int
    end_ms: int
    at_ms: int  # when the cycle was closed (the rollover): usage events after it belong to the next
    plan: str
    balance: int = 0
    granted: int = 0
    charged: int = 0
    expired: int = 0
    grants: int = 0
    packs: int = 0
    adjusted: int = 0


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def closed_cycles(account: dict[str, str]) -> list[Snapshot]:
    """The account's closed cycles, oldest first, from its `close:*` snapshots."""
    found = []
    for field, value in account.items():
        if not field.startswith("close:"):
            continue
        parts = value.split(" ")
        numbers = [_int(p) for p in parts[:9]]
        found.append(Snapshot(_int(field[6:]), numbers[0], numbers[1], parts[9] if len(parts) > 9 else "",
                              *numbers[2:9]))
    return sorted(found, key=lambda s: s.start_ms)


def live(account: dict[str, str]) -> Snapshot:
    """The open cycle's counters now."""
    return Snapshot(_int(account.get("cycle_start_ms")), _int(account.get("cycle_end_ms")), 0,
                    account.get("plan", ""), _int(account.get("allow")) + _int(account.get("extra")),
                    _int(account.get("granted")), _int(account.get("charged")), _int(account.get("expired")),
                    _int(account.get("credited_grants")), _int(account.get("credited_packs")),
                    _int(account.get("adjusted")))


def _zone(account: dict[str, str], config: Config) -> ZoneInfo:
    plan = config.plans.get(account.get("plan", ""))
    try:
        return ZoneInfo(account.get("timezone") or (plan.timezone if plan else "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _iso(ms: int) -> str | None:
    return iso(ms) if ms else None


@dataclass(frozen=True, slots=True)
class Cycle:
    label: str
    opening: Snapshot
    closing: Snapshot
    open: bool


def cycles(account: dict[str, str], config: Config) -> list[Cycle]:
    """Every cycle of the account, newest first: the open one, then the closed ones."""
    zone = _zone(account, config)
    closed = closed_cycles(account)
    now = live(account)
    zero = Snapshot(0, 0, _int(account.get("created_ms")), "")
    found = []
    previous = zero
    for snap in [*closed, now]:
        label = datetime.fromtimestamp(snap.start_ms / 1000, zone).strftime("%Y-%m") if snap.start_ms else "-"
        found.append(Cycle(label, previous, snap, snap is now))
        previous = snap
    return found[::-1]


def find_cycle(account: dict[str, str], config: Config, cycle: str) -> Cycle:
    """The cycle `cycle` names: 'current' or YYYY-MM (the month it starts in, in the plan's timezone)."""
    every = cycles(account, config)
    if cycle == "current":
        return every[0]
    try:
        datetime.strptime(cycle, "%Y-%m")
    except ValueError:
        raise BadRequest("The cycle must be 'current' or a month as YYYY-MM.", param="cycle") from None
    for found in every:
        if found.label == cycle:
            return found
    raise NotFound(f"No billing cycle starting in {cycle} for this account.")


def totals(account_id: str, account: dict[str, str], c: Cycle) -> dict[str, Any]:
    """A statement's figures (no breakdown): see the module docstring for what each one means."""
    o, e = c.opening, c.closing
    grants, packs, adjustments = e.grants - o.grants, e.packs - o.packs, e.adjusted - o.adjusted
    allowance = (e.granted - o.granted) - grants - packs - adjustments
    expired, used = e.expired - o.expired, e.charged - o.charged
    credited = allowance + grants + packs + adjustments - expired
    return {
        "account_id": account_id, "external_id": account.get("external_id") or None, "cycle": c.label,
        "start": _iso(e.start_ms), "end": _iso(e.end_ms), "closed_at": None if c.open else _iso(e.at_ms),
        "plan": e.plan, "status": "open" if c.open else "closed",
        **amount("opening", o.balance), **amount("allowance", allowance), **amount("grants", grants),
        **amount("packs", packs), **amount("adjustments", adjustments), **amount("expired", expired),
        **amount("credited", credited), **amount("used", used), **amount("closing", e.balance),
    }


async def breakdown(redis: Any, keys: AccountKeys, c: Cycle, clock_offset_ms: int = 0,
                    scan_max: int = SUMMARY_SCAN_MAX) -> dict[str, Any]:
    """The cycle's usage by model and by key, from its usage events (those settled after the previous
    cycle closed and before this one did), reading at most `scan_max` ledger entries."""
    since, until = c.opening.at_ms, (c.closing.at_ms or None)
    # stream ids are Redis time; event `ts` is the scripts' clock (shifted by the test-only offset)
    cursor = str(max(since - max(clock_offset_ms, 0), 0))
    end = str(until) if until is not None and clock_offset_ms == 0 else "+"
    models: dict[str, dict[str, int]] = {}
    by_key: dict[str, dict[str, int]] = {}
    budget, truncated = scan_max, False
    while True:
        count = min(1000, budget)
        if count == 0:
            truncated = bool(await redis.xrange(keys.ledger, cursor, end, count=1))
            break
        batch = await redis.xrange(keys.ledger, cursor, end, count=count)
        budget -= len(batch)
        for stream_id, fields in batch:
            ts = _int(fields.get("ts"))
            if fields.get("type") != "usage" or ts < since or (until is not None and ts >= until):
                continue
            event = parse_entry(stream_id, fields)
            cost = _int(event.get("cost"))
            m = models.setdefault(str(event.get("model")), dict.fromkeys(("requests", "in", "out", "c", "u"), 0))
            for name, n in (("requests", 1), ("in", _int(event.get("in"))), ("out", _int(event.get("out"))),
                            ("c", cost), ("u", _int(event.get("usd_micro")))):
                m[name] += n
            k = by_key.setdefault(str(event.get("key_id")), {"requests": 0, "c": 0})
            k["requests"] += 1
            k["c"] += cost
        if len(batch) < count:
            break
        cursor = f"({batch[-1][0]}"
    labels: list[Any] = []
    if by_key:
        pipe = redis.pipeline(transaction=False)
        for key_id in by_key:
            pipe.hget(keys.api_key(key_id), "label")
        labels = await pipe.execute()
    return {
        "by_model": [{"model": model, "requests": m["requests"], "input_tokens": m["in"], "output_tokens": m["out"],
                      **amount("used", m["c"]), **amount("usd", m["u"])}
                     for model, m in sorted(models.items(), key=lambda item: -item[1]["c"])],
        "by_key": [{"key_id": key_id, "name": label or "", "requests": k["requests"], **amount("used", k["c"])}
                   for (key_id, k), label in sorted(zip(by_key.items(), labels, strict=True),
                                                    key=lambda item: -item[0][1]["c"])],
        "truncated": truncated,
    }


async def statement(redis: Any, keys: AccountKeys, account_id: str, account: dict[str, str], config: Config,
                    cycle: str, clock_offset_ms: int = 0) -> dict[str, Any]:
    """One cycle's full statement: figures and usage breakdowns."""
    found = find_cycle(account, config, cycle)
    return {**totals(account_id, account, found),
            **await breakdown(redis, keys, found, clock_offset_ms)}


def statement_list(account_id: str, account: dict[str, str], config: Config) -> list[dict[str, Any]]:
    """Every cycle's figures, newest first (no breakdowns: one read of the account record)."""
    return [totals(account_id, account, c) for c in cycles(account, config)]

