"""The reaper's index of accounts that may hold credits, and one reaping pass over it.

A hold lives in its account's keys (`{acct}:holds`, `{acct}:hexp`), and the reserve script can write
nothing else (invariant 4). So that the reaper never has to SCAN the keyspace, every account is put
into its bucket of the `holders` index (`{idx:NN}:holders`, account -> when to look at it, ms) BEFORE
any hold is taken for it: `HolderIndex.before_reserve` runs ahead of every reserve script call.

The rules that keep a hold from ever being left out of the index:
- a gateway indexes an account with a score at least `INDEX_HORIZON_MS` ahead (ZADD GT: scores only
  grow), and takes holds for it on the strength of that entry for `REINDEX_AFTER_S` at most;
- the reaper looks only at entries whose score has passed, reaps the account, and then either moves
  the entry on to the account's earliest hold or tombstone expiry (ZADD GT XX), or, when the account
  has none left, removes it, but only if its score is still the one it read (WATCH): a gateway that
  indexed it meanwhile changed the score.
So an entry a gateway relies on is never removed before its reserve has long landed (the horizon is
four times the reuse window), and a reserve that lands before the reaper reads the account's holds
is seen by it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis import exceptions as redis_errors

from gateway.jobs import due_buckets, run_leased
from gateway.keys import KeySchema, bucket_of
from gateway.metering import Meter

log = logging.getLogger("gateway.reaper")

INDEX_HORIZON_MS = 60_000  # an account a gateway indexed is not looked at sooner than this
REINDEX_AFTER_S = 15.0  # a gateway indexes an account again when its own entry is older than this
REAP_BATCH = 100  # accounts reaped per bucket and pass
_CACHE_MAX = 100_000


def wall_ms(offset_ms: int = 0) -> int:
    return int(time.time() * 1000) + offset_ms


class HolderIndex:
    """Puts an account into its `holders` bucket before a hold is taken for it (see the module doc)."""

    def __init__(self, redis: Any, schema: KeySchema, clock_offset_ms: Callable[[], int]) -> None:
        self.redis = redis
        self.schema = schema
        self.clock_offset_ms = clock_offset_ms
        self._indexed: dict[str, float] = {}  # account id -> monotonic time its entry was written

    async def index(self, account_id: str) -> None:
        """Index the account (one ZADD), unless this process did so less than REINDEX_AFTER_S ago."""
        started = time.monotonic()  # the reuse window counts from before the write, never after
        if started - self._indexed.get(account_id, -REINDEX_AFTER_S) < REINDEX_AFTER_S:
            return
        await self.redis.zadd(self.schema.holders(bucket_of(account_id)),
                              {account_id: wall_ms(self.clock_offset_ms()) + INDEX_HORIZON_MS}, gt=True)
        if len(self._indexed) >= _CACHE_MAX:
            self._indexed.clear()
        self._indexed[account_id] = started

    async def before_reserve(self, keys: Sequence[str]) -> None:
        """A `ScriptRunner` guard for the reserve script (its first key is the account hash)."""
        account_id = self.schema.account_id_of(keys[0])
        if account_id is None:
            raise ValueError(f"not an account key: {keys[0]!r}")
        await self.index(account_id)


async def _forget_if_unchanged(redis: Any, key: str, account_id: str, score: float) -> bool:
    """ZREM the account from the bucket only while its score is still `score` (compare and delete)."""
    async with redis.pipeline(transaction=True) as pipe:
        try:
            await pipe.watch(key)
            if await pipe.zscore(key, account_id) != score:
                await pipe.unwatch()
                return False
            pipe.multi()
            pipe.zrem(key, account_id)
            await pipe.execute()
        except redis_errors.WatchError:
            return False
    return True


async def reap_bucket(redis: Any, schema: KeySchema, meter: Meter, bucket: int, now_ms: int) -> int:
    """Reap the due accounts of one bucket (at most REAP_BATCH); returns the holds reaped."""
    key = schema.holders(bucket)
    due = await redis.zrangebyscore(key, "-inf", now_ms, start=0, num=REAP_BATCH, withscores=True)
    reaped = 0
    for account_id, score in due:
        keys = schema.for_account(account_id)
        try:
            count, _returned = await meter.reap(keys)
        except redis_errors.ResponseError as exc:  # one account's failure never stops the others
            log.warning("reaper: account %s: %s", account_id, exc)
            continue
        reaped += count
        earliest = await redis.zrange(keys.hold_expiry, 0, 0, withscores=True)
        if earliest:  # holds in flight or tombstones: come back when the first of them expires
            await redis.zadd(key, {account_id: max(int(earliest[0][1]), now_ms + 1000)}, gt=True, xx=True)
        else:
            await _forget_if_unchanged(redis, key, account_id, score)
    return reaped


async def reap_pass(redis: Any, schema: KeySchema, meter: Meter) -> int:
    """One pass: every bucket with due accounts whose lease this process gets; the holds reaped."""
    now = wall_ms(meter.clock_offset_ms)
    buckets = await due_buckets(redis, schema.holders, now)
    return await run_leased(redis, schema, "reap", buckets,
                            lambda bucket: reap_bucket(redis, schema, meter, bucket, now))

