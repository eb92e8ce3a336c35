"""The durable ledger: drain every account's ledger stream to a sink, at least once, so Redis keeps a window.

Each account has a cursor, `gw:{acct}:shipped`: the last stream id its sink has made durable. A pass
walks the accounts index under a short lease per index shard (one shipper per shard at a time, in
whichever process took it), reads each ledger after its cursor, delivers a batch (retrying with
backoff until the sink takes it whole) and only then moves the cursors. A process that dies between
delivering and moving a cursor leaves the batch to be shipped again: receivers deduplicate by the
event id (the request id of a usage event, `account:stream id` of any other). Once an hour per shard
it trims what it shipped and what is older than the retention window, never past a cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.exports import EVENT_SOURCE
from gateway.index import bucket_accounts
from gateway.jobs import Lease, ask_buckets
from gateway.keys import INDEX_BUCKETS, KeySchema
from gateway.ledger import admin_view, cloudevent, parse_entry, shipped_key, trim, usage_view
from gateway.sinks import Sink, make_sink
from gateway.state import GATEWAY, in_background, stopping

log = logging.getLogger("gateway.shipper")

LEASE_MS = 30_000  # a shard's lease: a dead shipper's shard is taken over after at most this
TRIM_EVERY_SECONDS = 3600.0
BACKOFF_MAX_SECONDS = 60.0
_CHECK_CHUNK = 500  # accounts whose cursor and newest entry one round trip reads


# ---------------------------------------------------------------- the accounts index
# The one place that knows how accounts are listed: the sharded buckets of `gateway.index`; each
# bucket is shipped under a lease of its own.


def index_shards() -> list[int]:
    """The shards of the accounts index; each is shipped under its own lease."""
    return list(range(INDEX_BUCKETS))


async def account_ids(redis: Any, schema: KeySchema, shard: int = 0) -> AsyncIterator[str]:
    """Every account id in one bucket of the accounts index, read in bounded pages."""
    async for page in bucket_accounts(redis, schema, shard):
        for account_id in page:
            yield account_id


# ---------------------------------------------------------------- events


def to_cloudevent(account_id: str, stream_id: str, fields: dict[str, str], external_id: str | None = None
                  ) -> dict[str, Any]:
    """One ledger entry as a CloudEvent 1.0. A usage event is exactly what `gateway usage export
    --format cloudevents` writes (`id` the request id); any other is `gateway.<type>`, `id`
    `account:stream id` (stream ids repeat across accounts), its fields as `data`."""
    event = parse_entry(stream_id, fields)
    if event.get("type") == "usage" and event.get("rid"):
        return cloudevent(usage_view(account_id, event, external_id))
    view = admin_view(account_id, event)
    data = {k: v for k, v in view.items() if k not in ("id", "type", "time", "account_id")}
    return {"specversion": "1.0", "type": f"gateway.{view['type']}", "source": EVENT_SOURCE, "id": view["id"],
            "time": view["time"], "subject": account_id, "datacontenttype": "application/json", "data": data}


def _ms(stream_id: str) -> int:
    return int(stream_id.split("-")[0])


def _after(stream_id: str, cursor: str | None) -> bool:
    if cursor is None:
        return True
    a, _, b = stream_id.partition("-")
    c, _, d = cursor.partition("-")
    return (int(a), int(b or 0)) > (int(c), int(d or 0))


async def trim_shipped(redis: Any, schema: KeySchema, account_id: str, retention_ms: int,
                       protect: list[str], now_ms: int) -> int:
    """Drop the account's ledger entries older than the retention window that are shipped (and read
    by every export in `protect`); an account never shipped keeps everything. Returns entries removed."""
    cursor = await redis.get(shipped_key(schema, account_id))
    if not cursor:
        return 0
    # `trim` keeps everything from `now_ms - retention_ms` on, and what a protected export has not read:
    # handing it min(window start, cursor's millisecond) keeps the cursor's millisecond and all after it
    return await trim(redis, schema, account_id, 0, protect, min(now_ms - retention_ms, _ms(str(cursor))))


# ---------------------------------------------------------------- leases


class LeaseLost(Exception):
    """Another shipper holds the shard now: stop without moving its cursors."""


def lease_key(schema: KeySchema, shard: int) -> str:
    """The lease of one shard's shipping (gateway.jobs leases, beside the bucket's other jobs)."""
    return schema.lease(shard, "ship")


# ---------------------------------------------------------------- the shipper


@dataclass
class _Batch:
    events: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, str] = field(default_factory=dict)  # account id -> last stream id in the batch


class Shipper:
    """Ships every account's ledger to `sink`; `ship_once` is one pass, `run_forever` the background loop."""

    def __init__(self, redis: Any, schema: KeySchema, sink: Sink, *, batch: int = 500,
                 retention_ms: int = 7 * 86_400_000, protect: tuple[str, ...] = (), lease_ms: int = LEASE_MS,
                 interval_seconds: float = 1.0, backoff_seconds: float = 1.0,
                 trim_every_seconds: float = TRIM_EVERY_SECONDS, clock: Callable[[], float] = time.time) -> None:
        self.redis, self.schema, self.sink = redis, schema, sink
        self.batch = max(batch, 1)
        self.retention_ms = retention_ms
        self.protect = list(protect)
        self.lease_ms = lease_ms
        self.interval = interval_seconds
        self.backoff = backoff_seconds
        self.trim_every = trim_every_seconds
        self.clock = clock
        self.shipped = 0  # events this shipper has delivered and committed
        self._progress = asyncio.Condition()
        self._last_trim: dict[int, float] = {}

    async def run_forever(self) -> None:
        """Pass after pass; rests `interval_seconds` once a pass finds nothing new."""
        while not stopping():
            found = 0
            try:
                found = await self.ship_once()
            except Exception as exc:  # Redis down, a sink bug: never let the loop die
                if stopping():
                    raise
                log.warning("ledger shipper pass failed (%s), will retry", type(exc).__name__)
            if not found:
                await asyncio.sleep(self.interval)

    async def until_shipped(self, count: int) -> None:
        """Wait until this shipper has committed at least `count` events."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.shipped >= count)

    async def ship_once(self) -> int:
        """One pass over every shard with work that this shipper can lease; returns the events it shipped."""
        total = 0
        shards = await self._shards_with_work()
        random.shuffle(shards)  # processes that start together spread over the shards
        for shard in shards:
            lease = Lease(self.redis, lease_key(self.schema, shard), self.lease_ms)
            if not await lease.acquire():
                continue  # another process ships this shard now
            try:
                total += await self._ship_shard(shard, lease)
            except LeaseLost:
                log.warning("ledger shipper lost the lease of shard %s; another process goes on", shard)
            finally:
                with contextlib.suppress(Exception):
                    await lease.release()
        return total

    async def _shards_with_work(self) -> list[int]:
        """The shards worth a lease: every shard's first page of accounts is read in one round trip, their
        cursors and newest entries in one more per `_CHECK_CHUNK` accounts (looking needs no lease), and a
        shard with nothing new to ship is left alone unless its hourly trim is due. A shard that does not
        answer, or has more accounts than one page, is taken as before (the leased walk finds out)."""
        now, busy, looked = self.clock(), set(), {}
        pages = await ask_buckets(self.redis, lambda shard: (
            "ZRANGEBYLEX", self.schema.accounts(shard), "-", "+", "LIMIT", 0, _CHECK_CHUNK))
        for shard, page in zip(index_shards(), pages, strict=True):
            if (now - self._last_trim.get(shard, 0.0) >= self.trim_every or not isinstance(page, list)
                    or len(page) >= _CHECK_CHUNK):
                busy.add(shard)
            else:  # an empty shard has nothing to ship
                looked.update(dict.fromkeys(page, shard))
        accounts = list(looked)
        for start in range(0, len(accounts), _CHECK_CHUNK):
            chunk = accounts[start:start + _CHECK_CHUNK]
            busy.update(looked[a] for a, (_cursor, new) in zip(chunk, await self._cursors(chunk), strict=True) if new)
        return sorted(busy)

    async def _cursors(self, accounts: list[str]) -> list[tuple[str | None, bool]]:
        """Each account's cursor, and whether its ledger has an entry after it; in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for account_id in accounts:
            pipe.get(shipped_key(self.schema, account_id))
            pipe.xrevrange(self.schema.for_account(account_id).ledger, "+", "-", count=1)
        replies = await pipe.execute()
        found = []
        for i in range(len(accounts)):
            cursor, newest = replies[2 * i], replies[2 * i + 1]
            found.append((cursor, bool(newest) and _after(newest[0][0], cursor)))
        return found

    async def _ship_shard(self, shard: int, lease: Lease) -> int:
        shipped, batch = 0, _Batch()
        trimming = self.clock() - self._last_trim.get(shard, 0.0) >= self.trim_every
        chunk: list[str] = []
        async for account_id in account_ids(self.redis, self.schema, shard):
            chunk.append(account_id)
            if len(chunk) >= _CHECK_CHUNK:
                shipped += await self._ship_accounts(chunk, batch, lease, trimming)
                chunk = []
        shipped += await self._ship_accounts(chunk, batch, lease, trimming)
        shipped += await self._flush(batch, lease)
        if trimming:
            self._last_trim[shard] = self.clock()
        return shipped

    async def _ship_accounts(self, accounts: list[str], batch: _Batch, lease: Lease, trimming: bool) -> int:
        """Read the ledgers of `accounts` with anything after their cursor into `batch`, flushing it
        whenever it is full; then (hourly) trim them."""
        if not accounts:
            return 0
        if not await lease.renew():  # a long walk outlives one lease
            raise LeaseLost()
        shipped = 0
        for account_id, (cursor, new) in zip(accounts, await self._cursors(accounts), strict=True):
            if new:
                shipped += await self._read_account(account_id, cursor, batch, lease)
        if trimming:
            shipped += await self._flush(batch, lease)  # cursors first: trimming reads them
            now_ms = int(self.clock() * 1000)
            for account_id in accounts:
                await trim_shipped(self.redis, self.schema, account_id, self.retention_ms, self.protect, now_ms)
        return shipped

    async def _read_account(self, account_id: str, cursor: str | None, batch: _Batch, lease: Lease) -> int:
        ledger = self.schema.for_account(account_id).ledger
        external_id = await self.redis.hget(self.schema.for_account(account_id).account, "external_id")
        start, shipped = f"({cursor}" if cursor else "-", 0
        while True:
            room = self.batch - len(batch.events)
            entries = await self.redis.xrange(ledger, start, "+", count=room)
            for stream_id, fields in entries:
                batch.events.append(to_cloudevent(account_id, stream_id, fields, external_id))
            if entries:
                batch.last[account_id] = entries[-1][0]
                start = f"({entries[-1][0]}"
            if len(batch.events) >= self.batch:
                shipped += await self._flush(batch, lease)
            if len(entries) < room:
                return shipped

    async def _flush(self, batch: _Batch, lease: Lease) -> int:
        """Deliver the batch (retrying until the sink takes it), then move its accounts' cursors."""
        if not batch.events:
            return 0
        delay = self.backoff
        while True:
            try:
                await self.sink.deliver(batch.events)
                break
            except Exception as exc:  # the sink is down or refuses: the same batch again, later
                if stopping():
                    raise
                log.warning("ledger sink failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)
                if not await lease.renew():
                    raise LeaseLost() from exc
        if not await lease.renew():  # another shipper owns these cursors now (it re-ships: duplicates)
            raise LeaseLost()
        pipe = self.redis.pipeline(transaction=False)
        for account_id, last in batch.last.items():
            pipe.set(shipped_key(self.schema, account_id), last)
        await pipe.execute()
        count = len(batch.events)
        batch.events.clear()
        batch.last.clear()
        async with self._progress:
            self.shipped += count
            self._progress.notify_all()
        return count


SHIPPER = web.AppKey("ledger_shipper", Shipper)


async def shipper_ctx(app: web.Application) -> AsyncIterator[None]:
    """With GATEWAY_LEDGER_SINK set, ship the ledger in the background of every process (after Redis
    is connected; stopped before it closes)."""
    gw = app[GATEWAY]
    settings = gw.settings
    sink = make_sink(settings)
    if sink is None:
        yield
        return
    shipper = Shipper(gw.redis, gw.schema, sink, batch=settings.ledger_ship_batch,
                      retention_ms=int(settings.ledger_retention_days * 86_400_000),
                      protect=settings.ledger_protect_exports, interval_seconds=settings.ledger_ship_interval_seconds)
    app[SHIPPER] = shipper
    try:
        async with in_background(shipper.run_forever()):
            yield
    finally:
        await sink.close()
