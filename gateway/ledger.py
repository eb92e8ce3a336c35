"""Reading the per-account ledger streams: event views, usage queries, cycle summaries, exports, retention.

Every settlement appends one `usage` event in the same Lua call as the charge; admin actions append
`grant`, `plan_change`, `key_created` and `key_revoked` events; holds ended without a charge append
`released` / `reaped`. Stream ids are Redis-clock milliseconds, so time ranges are id ranges.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gateway.exports import EVENT_SOURCE, PROVIDER_FORMATS
from gateway.index import bucket_page
from gateway.jobs import buckets_where, run_leased
from gateway.keys import AccountKeys, KeySchema
from gateway.money import amount
from gateway.views import iso

PAGE_MAX = 1000
SCAN_MAX = 2 * PAGE_MAX  # ledger entries one usage page reads at most, matching or not
SUMMARY_SCAN_MAX = 20_000  # ledger entries one cycle summary reads at most (then `truncated`)
#: Every token count a usage event carries, as the API names it <- as the ledger stores it. Each is
#: priced at its own rate, so each stays separate everywhere: `input_tokens` is the uncached input
#: only (billed at the input rate), beside cache reads and the 5-minute and 1-hour cache writes;
#: `reasoning_tokens` is the part of `output_tokens` spent thinking (information, not extra).
TOKEN_FIELDS = {"input_tokens": "in", "cached_input_tokens": "cached_in", "cache_write_tokens": "cache_write",
                "cache_write_1h_tokens": "cache_write_1h", "output_tokens": "out", "reasoning_tokens": "reasoning"}
#: Ledger fields the view below names; any other field an event carries is kept under `other`.
_KNOWN = {"type", "ts", "_id", "rid", "key_id", "upstream", "model", "route", "endpoint", "dialect", "cost", "hold",
          "uncollected", "usd_micro", "latency_ms", "status", "outcome", "lowered_cap", "estimated", "stream",
          *TOKEN_FIELDS.values()}
CSV_FIELDS = ("id", "time", "account_id", "external_id", "key_id", "provider", "model", "route", "endpoint",
              "dialect", *TOKEN_FIELDS, "credits", "credits_micro", "credits_held", "credits_held_micro",
              "credits_uncollected", "credits_uncollected_micro", "usd", "usd_micro", "latency_ms", "status",
              "outcome", "cap_lowered", "output_cap", "estimated", "stream", "other")


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def parse_entry(stream_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """One raw stream entry with its JSON details merged in."""
    event: dict[str, Any] = dict(fields)
    event.update(json.loads(event.pop("data", "{}") or "{}"))
    event["_id"] = stream_id
    return event


def usage_view(account_id: str, event: dict[str, Any], external_id: str | None = None) -> dict[str, Any]:
    """A usage event as the API and exports show it (`id` is the request id: a dedup key downstream).
    Every priced quantity is its own field, so `credits` + `credits_uncollected` is each count times
    its rate under the route's price (`route`), rounded up once, plus any per-request price; an
    estimate never charges more than `credits_held`. Fields this view does not name are in `other` (the
    route's other priced quantities: tool calls, service tier...). Money: decimal strings + `_micro`."""
    lowered = event.get("lowered_cap")
    return {
        "id": event.get("rid"), "time": iso(_int(event.get("ts")), "milliseconds"), "account_id": account_id,
        "external_id": external_id or None, "key_id": event.get("key_id"), "provider": event.get("upstream"),
        "model": event.get("model"),
        "route": event.get("route"), "endpoint": event.get("endpoint"), "dialect": event.get("dialect"),
        **{name: _int(event.get(stored)) for name, stored in TOKEN_FIELDS.items()},
        **amount("credits", _int(event.get("cost"))), **amount("credits_held", _int(event.get("hold"))),
        **amount("credits_uncollected", _int(event.get("uncollected"))), **amount("usd", _int(event.get("usd_micro"))),
        "latency_ms": _int(event.get("latency_ms")), "status": _int(event.get("status")),
        "outcome": event.get("outcome"), "cap_lowered": lowered is not None,
        "output_cap": None if lowered is None else _int(lowered), "estimated": bool(_int(event.get("estimated"))),
        "stream": bool(_int(event.get("stream"))),
        "other": {k: v for k, v in sorted(event.items()) if k not in _KNOWN},
    }


#: Fields of admin events (grant, adjustment, released, reaped, plan_change, key_updated) that hold
#: micro-credits, and the name each is shown under, in the two money forms (`amount`).
MICRO_FIELDS = {"amount": "credits", "cost": "credits", "hold": "credits_held", "expired": "credits_expired",
                "budget_cycle": "budget_credits_per_cycle", "budget_life": "budget_credits_lifetime"}


def admin_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """An admin event's fields as every interface shows them: micro-credit amounts as exact decimal
    credits and their `_micro` twin (a budget removed, stored as 'none': null), the rest as stored."""
    out: dict[str, Any] = {}
    for name, value in sorted(fields.items()):
        shown = MICRO_FIELDS.get(name)
        if shown is None:
            out[name] = value
        elif value == "none":
            out.update({shown: None, f"{shown}_micro": None})
        else:
            out.update(amount(shown, _int(value)))
    return out


def admin_view(account_id: str, event: dict[str, Any]) -> dict[str, Any]:
    extra = admin_fields({k: v for k, v in event.items() if k not in ("type", "ts", "_id")})
    return {"id": f"{account_id}:{event['_id']}", "type": event.get("type"),
            "time": iso(_int(event.get("ts")), "milliseconds"), "account_id": account_id, **extra}


@dataclass(frozen=True, slots=True)
class Query:
    start_ms: int | None = None
    end_ms: int | None = None
    model: str | None = None
    provider: str | None = None
    limit: int = 100
    cursor: str | None = None  # the last stream id of the previous page

    def matches(self, event: dict[str, Any]) -> bool:
        return (event.get("type") == "usage" and (self.model is None or event.get("model") == self.model)
                and (self.provider is None or event.get("upstream") == self.provider))


async def query_usage(redis: Any, account_id: str, keys: AccountKeys, q: Query, scan_max: int | None = None,
                      external_id: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """One page of usage events, oldest first; returns (events, cursor of the next page or None).
    A page reads at most `scan_max` ledger entries, however few match: when they run out first, the
    page holds what matched (perhaps nothing) and the cursor continues after the last entry read."""
    start = f"({q.cursor}" if q.cursor else (str(q.start_ms) if q.start_ms is not None else "-")
    end = str(q.end_ms) if q.end_ms is not None else "+"
    found: list[dict[str, Any]] = []
    budget = max(SCAN_MAX if scan_max is None else scan_max, q.limit)
    while budget > 0:
        count = min(max(q.limit * 2, 100), budget)
        batch = await redis.xrange(keys.ledger, start, end, count=count)
        budget -= len(batch)
        for stream_id, fields in batch:
            if fields.get("type") != "usage":
                continue  # admin and release events: no need to parse them
            event = parse_entry(stream_id, fields)
            if q.matches(event):
                found.append(usage_view(account_id, event, external_id))
                if len(found) == q.limit:
                    return found, stream_id
        if len(batch) < count:
            return found, None
        start = f"({batch[-1][0]}"
    return found, start[1:]


def _sums() -> dict[str, int]:
    return dict.fromkeys(("requests", *TOKEN_FIELDS, "micro", "uncollected", "usd_micro"), 0)


def _add(sums: dict[str, int], event: dict[str, Any]) -> None:
    sums["requests"] += 1
    for name, stored in TOKEN_FIELDS.items():
        sums[name] += _int(event.get(stored))
    for name, stored in (("micro", "cost"), ("uncollected", "uncollected"), ("usd_micro", "usd_micro")):
        sums[name] += _int(event.get(stored))


def _sums_view(sums: dict[str, int]) -> dict[str, Any]:
    """Summed usage events, each quantity as in the events (the same names and meaning)."""
    return {"requests": sums["requests"], **{name: sums[name] for name in TOKEN_FIELDS},
            **amount("credits", sums["micro"]), **amount("credits_uncollected", sums["uncollected"]),
            **amount("usd", sums["usd_micro"])}


async def cycle_summary(redis: Any, account_id: str, keys: AccountKeys, account: dict[str, str],
                        now_ms: int | None = None, scan_max: int | None = None) -> dict[str, Any]:
    """Usage of the current cycle by provider and model, a month-end projection at the current rate,
    and lifetime totals. It reads at most `scan_max` ledger entries, oldest first: past that the
    answer says `truncated: true` and sums the cycle only up to `summed_through` (the time of the last
    entry read); `GET /gateway/usage` pages through the rest."""
    start, end = _int(account.get("cycle_start_ms")), _int(account.get("cycle_end_ms"))
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    groups: dict[tuple[str, str], dict[str, int]] = {}
    totals = _sums()
    cursor, budget, last = str(start), max(SUMMARY_SCAN_MAX if scan_max is None else scan_max, 1), None
    truncated = False
    while True:
        count = min(1000, budget)
        if count == 0:  # the budget is spent: is there more of the cycle?
            truncated = bool(await redis.xrange(keys.ledger, f"({last}", "+", count=1))
            break
        batch = await redis.xrange(keys.ledger, cursor, "+", count=count)
        budget -= len(batch)
        for stream_id, fields in batch:
            last = stream_id
            if fields.get("type") != "usage":
                continue
            event = parse_entry(stream_id, fields)
            key = (str(event.get("upstream")), str(event.get("model")))
            _add(groups.setdefault(key, _sums()), event)
            _add(totals, event)
        if len(batch) < count:
            break
        cursor = f"({batch[-1][0]}"
    used = totals["micro"]
    elapsed = max(now - start, 86_400_000)  # at least a day: a few minutes in, a rate means little
    projected = used if now >= end or start == 0 else used * (end - start) // elapsed
    by_model = [{"provider": key[0], "model": key[1], **_sums_view(g)}
                for key, g in sorted(groups.items(), key=lambda item: -item[1]["micro"])]
    return {
        "account_id": account_id, "cycle_start": iso(start, "milliseconds") if start else None,
        "cycle_end": iso(end, "milliseconds") if end else None,
        **amount("credits_used", used), **amount("projected_credits_at_cycle_end", projected),
        "totals": _sums_view(totals),
        "by_model": by_model,
        "truncated": truncated,
        "summed_through": iso(int(last.split("-")[0]), "milliseconds") if truncated and last else None,
        "lifetime": {**amount("credits_used", _int(account.get("charged"))),
                     **amount("credits_granted", _int(account.get("granted"))),
                     "requests": _int(account.get("requests"))},
    }


# ---------------------------------------------------------------- exports


async def account_events(redis: Any, schema: KeySchema, account_id: str, after: str | None = None,
                         end_ms: int | None = None, start_ms: int | None = None
                         ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Usage events of one account after the stream id `after` (None: from `start_ms`, else the
    first) up to `end_ms`, oldest first, read 1000 entries at a time: yields (stream id, view)."""
    keys = schema.for_account(account_id)
    external_id = await redis.hget(keys.account, "external_id")
    start = f"({after}" if after else (str(start_ms) if start_ms is not None else "-")
    end = str(end_ms) if end_ms is not None else "+"
    while True:
        batch = await redis.xrange(keys.ledger, start, end, count=1000)
        for stream_id, fields in batch:
            event = parse_entry(stream_id, fields)
            if event.get("type") == "usage":
                yield stream_id, usage_view(account_id, event, external_id)
        if len(batch) < 1000:
            break
        start = f"({batch[-1][0]}"


def cloudevent(view: dict[str, Any]) -> dict[str, Any]:
    """CloudEvents 1.0 (structured JSON): `id` is the request id, so OpenMeter, Lago
    (`transaction_id`) and Stripe meters (`identifier`) deduplicate a re-sent event."""
    return {"specversion": "1.0", "type": "gateway.usage", "source": EVENT_SOURCE, "id": view["id"],
            "time": view["time"], "subject": view["account_id"], "datacontenttype": "application/json",
            "data": {k: v for k, v in view.items() if k not in ("id", "time", "account_id")}}


def _csv_cell(value: Any) -> Any:
    """Booleans as `true`/`false` (what spreadsheets and warehouses parse), None as an empty cell."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value


def render(views: list[dict[str, Any]], fmt: str, header: bool = True) -> str:
    """Usage views in an export format: jsonl, csv, cloudevents, or a billing provider's (stripe, lago,
    openmeter: see gateway.exports)."""
    if fmt == "jsonl":
        return "".join(json.dumps(v, separators=(",", ":")) + "\n" for v in views)
    if fmt == "cloudevents":
        return "".join(json.dumps(cloudevent(v), separators=(",", ":")) + "\n" for v in views)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows({k: _csv_cell(v.get(k)) for k in CSV_FIELDS if k != "other"}
                         | {"other": json.dumps(v["other"], separators=(",", ":")) if v.get("other") else ""}
                         for v in views)
        return out.getvalue()
    if fmt in PROVIDER_FORMATS:
        mapping = PROVIDER_FORMATS[fmt]
        return "".join(json.dumps(mapping(v), separators=(",", ":")) + "\n" for v in views)
    raise ValueError(f"unknown format {fmt!r} (jsonl, csv, cloudevents, {', '.join(PROVIDER_FORMATS)})")


async def export_cursor(redis: Any, schema: KeySchema, account_id: str, name: str) -> str | None:
    """The last stream id the export `name` has written for the account (None: nothing yet). Cursors
    live in the account's own `exports` hash, under its hash tag."""
    cursor: str | None = await redis.hget(schema.for_account(account_id).exports, name)
    return cursor


async def trim(redis: Any, schema: KeySchema, account_id: str, retention_ms: int, protect: list[str],
               now_ms: int, shipped: bool = False) -> int:
    """Drop ledger events older than the retention, but never one an export in `protect` has not
    yet read, nor (`shipped`: a ledger sink is configured) one the shipper has not delivered.
    Returns the number of entries removed."""
    cutoff = now_ms - retention_ms
    keys = schema.for_account(account_id)
    for exported in (await redis.hmget(keys.exports, protect) if protect else []):
        exported_ms = int(exported.split("-")[0]) if exported else 0
        cutoff = min(cutoff, exported_ms)  # an entry at or after the cursor's millisecond stays
    if shipped:
        cursor = await shipped_id(redis, schema, account_id)
        cutoff = min(cutoff, int(cursor.split("-")[0]) if cursor else 0)
    if cutoff <= 0:
        return 0
    return int(await redis.xtrim(keys.ledger, minid=str(cutoff), approximate=False))


TRIM_EVERY_MS = 3_600_000  # each bucket's accounts are trimmed once an hour: retention is in days
TRIM_BATCH = 200  # accounts trimmed per bucket and pass


async def trim_bucket(redis: Any, schema: KeySchema, bucket: int, retention_ms: int, protect: list[str],
                      now_ms: int, batch: int = TRIM_BATCH, every_ms: int = TRIM_EVERY_MS, shipped: bool = False
                      ) -> int:
    """Trim the next `batch` accounts of one bucket, from where the last pass (of any process) stopped;
    once the bucket is done, mark it done for `every_ms`. Returns the entries removed."""
    cursor_key, done_key = schema.job_cursor(bucket, "trim"), schema.job_done(bucket, "trim")
    after = await redis.get(cursor_key)
    ids = await bucket_page(redis, schema, bucket, after, batch)
    removed = 0
    for account_id in ids:
        removed += await trim(redis, schema, account_id, retention_ms, protect, now_ms, shipped)
    if len(ids) < batch:  # the end of the bucket: start again from the first account next time
        pipe = redis.pipeline(transaction=False)
        pipe.delete(cursor_key)
        pipe.set(done_key, now_ms, px=every_ms)
        await pipe.execute()
    else:
        await redis.set(cursor_key, ids[-1])
    return removed


async def trim_pass(redis: Any, schema: KeySchema, retention_ms: int, protect: list[str], now_ms: int,
                    batch: int = TRIM_BATCH, every_ms: int = TRIM_EVERY_MS, shipped: bool = False) -> int:
    """One batch of trimming in every bucket not trimmed within `every_ms` (every bucket's marker
    looked at once), each under its lease; returns the entries removed."""
    due = await buckets_where(redis, lambda bucket: ("EXISTS", schema.job_done(bucket, "trim")), lambda n: not n)
    return await run_leased(redis, schema, "trim", due, lambda bucket: trim_bucket(
        redis, schema, bucket, retention_ms, protect, now_ms, batch, every_ms, shipped))


# ---------------------------------------------------------------- the shipper's cursors (gateway.shipper)


def shipped_key(schema: KeySchema, account_id: str) -> str:
    """String: the stream id of the last ledger entry the shipper made durable, under the account's
    hash tag (beside its ledger). It belongs in `AccountKeys` as `shipped` once keys.py is free."""
    return f"{schema.prefix}{{{account_id}}}:shipped"


async def shipped_id(redis: Any, schema: KeySchema, account_id: str) -> str | None:
    """The last stream id of the account's ledger that the shipper has delivered to its sink (every
    entry up to it is durable outside Redis), or None when nothing has been shipped."""
    found = await redis.get(shipped_key(schema, account_id))
    return str(found) if found else None
