"""The index of every account, sharded into `INDEX_BUCKETS` sorted sets (`{idx:NN}:accounts`).

Each bucket is a sorted set whose scores are all 0, so its members sort by account id and can be
read a bounded page at a time (ZRANGEBYLEX from the last id read). Listings in id order merge the
buckets; jobs that need no order walk one bucket at a time. No read ever takes a whole bucket.
"""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator
from typing import Any

from gateway.keys import INDEX_BUCKETS, KeySchema, bucket_of


async def add_account(redis: Any, schema: KeySchema, account_id: str) -> None:
    """Index one account (idempotent)."""
    await redis.zadd(schema.accounts(bucket_of(account_id)), {account_id: 0})


def _after(account_id: str | None) -> str:
    return f"({account_id}" if account_id else "-"


async def bucket_page(redis: Any, schema: KeySchema, bucket: int, after: str | None, count: int) -> list[str]:
    """Up to `count` account ids of one bucket after `after` (None: from the first), in id order."""
    return list(await redis.zrangebylex(schema.accounts(bucket), _after(after), "+", start=0, num=count))


async def bucket_accounts(redis: Any, schema: KeySchema, bucket: int, batch: int = 500
                          ) -> AsyncIterator[list[str]]:
    """Every account id of one bucket, in pages of at most `batch`."""
    after: str | None = None
    while True:
        page = await bucket_page(redis, schema, bucket, after, batch)
        if page:
            yield page
        if len(page) < batch:
            return
        after = page[-1]


async def account_ids(redis: Any, schema: KeySchema, after: str | None = None, batch: int = 200
                      ) -> AsyncIterator[str]:
    """Every account id after `after`, in id order: the buckets merged, each read `batch` ids at a time
    (the first pages of all buckets in one pipeline, later pages as each runs out)."""
    pipe = redis.pipeline(transaction=False)
    for bucket in range(INDEX_BUCKETS):
        pipe.zrangebylex(schema.accounts(bucket), _after(after), "+", start=0, num=batch)
    pages: list[list[str]] = [list(page) for page in await pipe.execute()]
    positions = [0] * INDEX_BUCKETS
    heap = [(page[0], bucket) for bucket, page in enumerate(pages) if page]
    heapq.heapify(heap)
    while heap:
        account_id, bucket = heapq.heappop(heap)
        yield account_id
        positions[bucket] += 1
        if positions[bucket] == len(pages[bucket]):
            if len(pages[bucket]) < batch:
                continue  # that bucket is exhausted
            pages[bucket] = await bucket_page(redis, schema, bucket, account_id, batch)
            positions[bucket] = 0
            if not pages[bucket]:
                continue
        heapq.heappush(heap, (pages[bucket][positions[bucket]], bucket))
