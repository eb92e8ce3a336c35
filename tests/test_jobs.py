"""The background jobs' look at every index bucket (gateway.jobs) on a standalone Redis: every bucket
asked in one pipelined round trip, the answers bucket by bucket, and the failures the loops rely on
(the cluster's node-by-node behaviour is in test_cluster.py)."""

from __future__ import annotations

import pytest
import redis as sync_redis
from redis import exceptions as redis_errors

from gateway.embedded import free_port
from gateway.jobs import ask_buckets, buckets_where, due_buckets
from gateway.keys import INDEX_BUCKETS, KeySchema
from gateway.redis_client import connect_redis

SCHEMA = KeySchema()
NOW = 1_000_000


def _received(url: str) -> tuple[int, int]:
    """(connections received, ZRANGEBYSCORE calls) so far, counting this look's own connection."""
    with sync_redis.Redis.from_url(url) as probe:
        stats = probe.info("stats")
        calls = probe.info("commandstats").get("cmdstat_zrangebyscore", {"calls": 0})["calls"]
    return int(stats["total_connections_received"]), int(calls)


async def test_due_buckets_asks_every_bucket_in_one_round_trip(redis_url: str) -> None:
    with sync_redis.Redis.from_url(redis_url) as sync:
        for b in range(0, INDEX_BUCKETS, 3):  # every third bucket has work, half of it due only later
            sync.zadd(SCHEMA.webhooks(b), {f"d{b}": NOW - 5 if b % 2 == 0 else NOW + 1})
    redis = connect_redis(redis_url, 0.5)
    try:
        connections, calls = _received(redis_url)
        assert await due_buckets(redis, SCHEMA.webhooks, NOW) == [b for b in range(0, INDEX_BUCKETS, 6)]
        after, calls_after = _received(redis_url)
        assert after - connections - 1 == 1  # one connection for the 64 commands (-1: the probe's own)
        assert calls_after - calls == INDEX_BUCKETS
        depths = await ask_buckets(redis, lambda b: ("ZCARD", SCHEMA.webhooks(b)))
        assert depths == [1 if b % 3 == 0 else 0 for b in range(INDEX_BUCKETS)]
        # the ledger trim's question: the buckets whose marker is absent
        with sync_redis.Redis.from_url(redis_url) as sync:
            sync.set(SCHEMA.job_done(5, "trim"), 1)
        undone = await buckets_where(redis, lambda b: ("EXISTS", SCHEMA.job_done(b, "trim")), lambda n: not n)
        assert undone == [b for b in range(INDEX_BUCKETS) if b != 5]
    finally:
        await redis.aclose()


async def test_a_bucket_answering_an_error_is_not_taken_for_redis_being_away(redis_url: str) -> None:
    with sync_redis.Redis.from_url(redis_url) as sync:
        sync.set(SCHEMA.webhooks(7), "not a sorted set")
    redis = connect_redis(redis_url, 0.5)
    try:
        answers = await ask_buckets(redis, lambda b: ("ZCARD", SCHEMA.webhooks(b)))
        assert isinstance(answers[7], redis_errors.ResponseError) and answers[:7] == [0] * 7
        with pytest.raises(redis_errors.ResponseError, match="WRONGTYPE"):
            await due_buckets(redis, SCHEMA.webhooks, NOW)
    finally:
        await redis.aclose()


async def test_no_bucket_answering_raises_redis_being_away() -> None:
    redis = connect_redis(f"redis://127.0.0.1:{free_port()}/0", 0.5)  # nothing listens there
    try:
        answers = await ask_buckets(redis, lambda b: ("ZCARD", SCHEMA.webhooks(b)))
        assert len(answers) == INDEX_BUCKETS and all(isinstance(a, redis_errors.ConnectionError) for a in answers)
        with pytest.raises(redis_errors.ConnectionError):
            await due_buckets(redis, SCHEMA.webhooks, NOW)
    finally:
        await redis.aclose()
