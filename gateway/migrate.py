"""Copying the global indexes of older versions into the sharded ones, once per deployment.

Before the sharded indexes, a deployment kept every account id in one set (`gw:accounts`), the
webhook queue in one sorted set (`gw:webhooks`) and each export's cursors in one hash
(`gw:export:<name>`). `migrate_once` copies the accounts and cursors into the buckets (and each
account into the reaper's `holders` index, so that holds taken by an older version are reaped too),
then sets a marker; every gateway process and every operator command calls it at start, and all but
the first only read the marker. The webhook deliverer copies the old queue's deliveries as it polls.
The old keys are left as they were (nothing reads them any more; delete them once every process
runs this version). Running it again is harmless: every copy is idempotent.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from gateway.jobs import held
from gateway.keys import KeySchema, bucket_of

log = logging.getLogger("gateway.migrate")
BATCH = 500


async def migrate(redis: Any, schema: KeySchema) -> dict[str, int]:
    """Copy the legacy indexes into the buckets (idempotent); returns what was copied."""
    copied = {"accounts": 0, "export_cursors": 0}
    now = int(time.time() * 1000)
    cursor = 0
    while True:
        cursor, ids = await redis.sscan(schema.legacy_accounts, cursor, count=BATCH)
        if ids:
            pipe = redis.pipeline(transaction=False)
            for account_id in ids:
                pipe.zadd(schema.accounts(bucket_of(account_id)), {account_id: 0})
                pipe.zadd(schema.holders(bucket_of(account_id)), {account_id: now}, nx=True)
            await pipe.execute()
            copied["accounts"] += len(ids)
        if int(cursor) == 0:
            break
    head = schema.legacy_export_pattern()[:-1]
    async for key in redis.scan_iter(match=schema.legacy_export_pattern(), count=1000):  # once, not periodic
        name = key[len(head):]
        async for account_id, stream_id in redis.hscan_iter(key, count=BATCH):
            await redis.hsetnx(schema.for_account(account_id).exports, name, stream_id)
            copied["export_cursors"] += 1
    return copied


async def copy_legacy_webhooks(redis: Any, schema: KeySchema) -> int:
    """Queue the deliveries of the single queue of older versions in their buckets too (one page per
    call; a process of an older version may still queue there during a rolling upgrade). They stay in
    the old queue until delivered or dropped, when both entries go; returns how many were copied."""
    found = await redis.zrange(schema.legacy_webhooks, 0, BATCH - 1, withscores=True)
    if found:
        pipe = redis.pipeline(transaction=False)
        for delivery, score in found:
            pipe.zadd(schema.webhooks(bucket_of(delivery)), {delivery: score}, nx=True)
        await pipe.execute()
    return len(found)


async def migrate_once(redis: Any, schema: KeySchema) -> bool:
    """Migrate unless the marker says it is done; False when another process is migrating now."""
    if await redis.exists(schema.migrated):
        return True
    async with held(redis, schema.lease(0, "migrate"), ttl_ms=60_000) as mine:
        if not mine:
            return False
        copied = await migrate(redis, schema)
        await redis.set(schema.migrated, int(time.time() * 1000))
    if any(copied.values()):
        log.info("copied the legacy indexes into the sharded ones: %s", copied)
    return True
