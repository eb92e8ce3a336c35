"""Usage per day and recent ledger events, for the dashboard's chart and the operator's drill-down.

`GET /gateway/usage/daily?days=N` (key holder) and `GET /admin/accounts/{id}/usage/daily?days=N`
(operator): one row per day and model (days in the account's billing timezone, N from 1 to 90, 30 by
default), each money amount as a decimal string with its integer `_micro` twin, plus the window's
totals by key. `GET /admin/accounts/{id}/events?limit=N`: the newest ledger entries of every type.

What it costs: there is no per-day counter in Redis (settlement stays one Lua call with nothing to
add), so a series is summed from the account's ledger stream, read newest first in pages of 1000
entries, down to the window's first day and at most SERIES_SCAN_MAX entries (XREVRANGE is O(log N +
entries read)). Past that budget the answer says `truncated: true` and `complete_from`: the oldest
day it summed whole (the partly read day before it is left out rather than shown short). Retention
(`GATEWAY_LEDGER_RETENTION_DAYS`) bounds what can be shown: days before it come back empty.
"""

from __future__ import annotations

import re
import time
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from gateway.admin import check_admin
from gateway.errors import BadRequest
from gateway.ledger import TOKEN_FIELDS, admin_fields, parse_entry, usage_view
from gateway.money import amount
from gateway.state import Gateway
from gateway.store import redis_guard
from gateway.usage_routes import key_holder
from gateway.views import iso

MAX_DAYS = 90
DEFAULT_DAYS = 30
SERIES_SCAN_MAX = 50_000  # ledger entries one series reads at most (then `truncated`)
PAGE = 1000
EVENTS_MAX = 200
_WHOLE = re.compile(r"^[0-9]{1,4}$")  # ASCII digits only: str.isdigit() accepts "²", which int() refuses
_HIDDEN = {"data", "idempotency_key", "fingerprint", "_id", "ts", "type"}


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def window(days: int, timezone: str, now_ms: int) -> tuple[date, date, int]:
    """(first day, today, the first day's local midnight in ms) of the last `days` days in `timezone`."""
    zone = ZoneInfo(timezone)
    today = datetime.fromtimestamp(now_ms / 1000, zone).date()
    first = today - timedelta(days=days - 1)
    start = datetime(first.year, first.month, first.day, tzinfo=zone)
    return first, today, int(start.timestamp() * 1000)


def _parse_days(text: str | None) -> int:
    text = text or str(DEFAULT_DAYS)
    if not _WHOLE.match(text) or not 1 <= int(text) <= MAX_DAYS:
        raise BadRequest(f"'days' must be a whole number from 1 to {MAX_DAYS}.", param="days")
    return int(text)


def _sums() -> dict[str, int]:
    return {"requests": 0, "input_tokens": 0, "output_tokens": 0, "micro": 0, "usd_micro": 0}


def _add(sums: dict[str, int], event: dict[str, Any]) -> None:
    sums["requests"] += 1
    sums["input_tokens"] += _int(event.get(TOKEN_FIELDS["input_tokens"]))
    sums["output_tokens"] += _int(event.get(TOKEN_FIELDS["output_tokens"]))
    sums["micro"] += _int(event.get("cost"))
    sums["usd_micro"] += _int(event.get("usd_micro"))


def _view(sums: dict[str, int]) -> dict[str, Any]:
    return {"requests": sums["requests"], "input_tokens": sums["input_tokens"],
            "output_tokens": sums["output_tokens"], **amount("credits", sums["micro"]),
            **amount("usd", sums["usd_micro"])}


async def daily_series(gw: Gateway, account_id: str, timezone: str, days: int, now_ms: int | None = None,
                       scan_max: int = SERIES_SCAN_MAX) -> dict[str, Any]:
    """The account's usage events of the last `days` days summed by (local day, model), and by key.

    Events are dated by their `ts` (the scripts' clock); the stream is read by id (Redis' own clock),
    from `start - clock offset`: the offset is 0 in production, and tests only move it forward, so
    every event dated in the window has an id at or after that bound."""
    offset = gw.meter.clock_offset_ms if gw.meter is not None else 0
    now = int(time.time() * 1000) + offset if now_ms is None else now_ms
    first, today, start_ms = window(days, timezone, now)
    zone = ZoneInfo(timezone)
    ledger = gw.schema.for_account(account_id).ledger
    groups: dict[tuple[str, str], dict[str, int]] = {}
    by_key: dict[str, dict[str, int]] = {}
    cursor, budget, truncated_at = "+", scan_max, None
    async with redis_guard():
        while budget > 0:
            count = min(PAGE, budget)
            batch = await gw.redis.xrevrange(ledger, cursor, str(max(start_ms - offset, 0)), count=count)
            budget -= len(batch)
            for stream_id, fields in batch:
                if fields.get("type") != "usage":
                    continue
                ts = _int(fields.get("ts"))
                if ts < start_ms:
                    continue
                event = parse_entry(stream_id, fields)
                day = datetime.fromtimestamp(ts / 1000, zone).date().isoformat()
                _add(groups.setdefault((day, str(event.get("model"))), _sums()), event)
                _add(by_key.setdefault(str(event.get("key_id") or ""), _sums()), event)
            if len(batch) < count:
                break
            cursor = f"({batch[-1][0]}"
            if budget == 0 and await gw.redis.xrevrange(ledger, cursor, str(max(start_ms - offset, 0)), count=1):
                truncated_at = _int(batch[-1][1].get("ts")) or int(batch[-1][0].split("-")[0])
    complete_from = first
    if truncated_at is not None:  # the day read last is only partly summed: leave it out
        partial = datetime.fromtimestamp(truncated_at / 1000, zone).date()
        complete_from = partial + timedelta(days=1)
        groups = {k: v for k, v in groups.items() if k[0] >= complete_from.isoformat()}
    rows = [{"date": day, "model": model, **_view(sums)} for (day, model), sums in sorted(groups.items())]
    return {"account_id": account_id, "timezone": timezone, "days": days, "from": first.isoformat(),
            "to": today.isoformat(), "data": rows,
            "by_key": [{"key_id": key_id, **_view(sums)}
                       for key_id, sums in sorted(by_key.items(), key=lambda item: -item[1]["micro"])],
            "truncated": truncated_at is not None,
            "complete_from": complete_from.isoformat()}


def event_view(account_id: str, stream_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """One ledger entry of any type, for a list of recent events: usage events as the usage API shows
    them; admin events with their own fields, micro-credit amounts in the two money forms."""
    event = parse_entry(stream_id, fields)
    kind = str(event.get("type"))
    time_iso = iso(_int(event.get("ts")), "milliseconds")
    if kind == "usage":
        view = usage_view(account_id, event)
        cost = _int(event.get("cost"))
        return {"id": f"{account_id}:{stream_id}", "type": kind, "time": time_iso, "model": view["model"],
                "key_id": view["key_id"], "input_tokens": view["input_tokens"],
                "output_tokens": view["output_tokens"], **amount("credits", cost),
                **amount("usd", _int(event.get("usd_micro"))),
                "status": view["status"], "outcome": view["outcome"]}
    out: dict[str, Any] = {"id": f"{account_id}:{stream_id}", "type": kind, "time": time_iso}
    own = admin_fields({k: v for k, v in event.items() if k not in _HIDDEN and not k.endswith("_micro")})
    out.update({k: v for k, v in own.items() if isinstance(v, str | int | float | bool) or v is None})
    return out


async def recent_events(gw: Gateway, account_id: str, limit: int) -> list[dict[str, Any]]:
    """The account's newest `limit` ledger entries, newest first (one XREVRANGE)."""
    async with redis_guard():
        batch = await gw.redis.xrevrange(gw.schema.for_account(account_id).ledger, "+", "-", count=limit)
    return [event_view(account_id, stream_id, fields) for stream_id, fields in batch]


def _timezone(gw: Gateway, account: dict[str, str]) -> str:
    plan = gw.config.plans.get(account.get("plan", ""))
    return account.get("timezone") or (plan.timezone if plan else "UTC")


async def my_daily(request: web.Request) -> web.Response:
    gw, account_id, account = await key_holder(request)
    days = _parse_days(request.query.get("days"))
    return web.json_response(await daily_series(gw, account_id, _timezone(gw, account), days))


async def account_daily(request: web.Request) -> web.Response:
    gw, store = check_admin(request)
    days = _parse_days(request.query.get("days"))
    account_id = request.match_info["account_id"]
    account = await store.account_raw(account_id)
    return web.json_response(await daily_series(gw, account_id, _timezone(gw, account), days))


async def account_events(request: web.Request) -> web.Response:
    """GET /admin/accounts/{id}/events?limit=N (1-200, 50 by default): the newest ledger entries."""
    gw, store = check_admin(request)
    text = request.query.get("limit", "50")
    if not _WHOLE.match(text) or not 1 <= int(text) <= EVENTS_MAX:
        raise BadRequest(f"'limit' must be a whole number from 1 to {EVENTS_MAX}.", param="limit")
    account_id = request.match_info["account_id"]
    await store.account_raw(account_id)
    return web.json_response({"data": await recent_events(gw, account_id, int(text))})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/gateway/usage/daily", my_daily)
    app.router.add_get("/admin/accounts/{account_id}/usage/daily", account_daily)
    app.router.add_get("/admin/accounts/{account_id}/events", account_events)
