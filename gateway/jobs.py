"""Short Redis leases for the periodic jobs (reaper, webhook deliverer, ledger trim).

Every gateway process runs the same background loops; a lease per job and bucket (`SET NX PX` with a
random token, under the bucket's hash tag) lets one process at a time work on one bucket, so N
processes do not all do the same work. The holder renews its lease while it works and releases it at
the end; a process that dies stops renewing, and another takes the bucket over once the lease
expires. Leases save work, they do not make anything correct: every job stays idempotent (the
scripts are), so two runners after a long stall cost time, never money.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio.cluster import PipelineCommand

from gateway.errors import StoreUnavailable
from gateway.keys import INDEX_BUCKETS, KeySchema
from gateway.redis_client import is_cluster
from gateway.scripts import REDIS_DOWN

log = logging.getLogger("gateway.jobs")

LEASE_MS = 15_000  # a bucket's work is bounded batches: seconds at most, renewed if it runs longer


class Lease:
    """One lease: taken with SET NX PX, renewed and released only while it still holds our token
    (WATCH on the key, so a lease that expired and was taken over is never extended or deleted)."""

    def __init__(self, redis: Any, key: str, ttl_ms: int = LEASE_MS) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = secrets.token_hex(12)

    async def acquire(self) -> bool:
        return bool(await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    async def _if_ours(self, then: Callable[[Any], None]) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(self.key)
                if await pipe.get(self.key) != self.token:
                    await pipe.unwatch()
                    return False
                pipe.multi()
                then(pipe)
                await pipe.execute()
            except redis_errors.WatchError:
                return False
        return True

    async def renew(self) -> bool:
        """Extend the lease; False when it is no longer ours (it expired, someone else holds it)."""
        return await self._if_ours(lambda pipe: pipe.pexpire(self.key, self.ttl_ms))

    async def release(self) -> None:
        await self._if_ours(lambda pipe: pipe.delete(self.key))


async def _renew_forever(lease: Lease) -> None:
    while True:
        await asyncio.sleep(lease.ttl_ms / 3000)
        try:
            if not await lease.renew():
                log.warning("lease %s was lost while its job ran", lease.key)
                return
        except Exception as exc:  # Redis away: the job's own commands fail too; try again
            log.warning("lease %s not renewed (%s)", lease.key, type(exc).__name__)


@contextlib.asynccontextmanager
async def held(redis: Any, key: str, ttl_ms: int = LEASE_MS) -> AsyncIterator[bool]:
    """Try to take the lease `key` for the block: yields whether this process got it. A lease taken
    is renewed in the background while the block runs and released when it ends."""
    lease = Lease(redis, key, ttl_ms)
    if not await lease.acquire():
        yield False
        return
    renewing = asyncio.create_task(_renew_forever(lease))
    try:
        yield True
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
        with contextlib.suppress(Exception):  # unreleased, it expires by itself
            await lease.release()


async def run_leased(redis: Any, schema: KeySchema, job: str, buckets: Iterable[int],
                     work: Callable[[int], Awaitable[int]], ttl_ms: int = LEASE_MS) -> int:
    """Run `work(bucket)` for each bucket whose lease this process gets (concurrently: on a cluster
    the buckets live on different nodes); returns the sum of what the works return. A bucket whose
    work fails is logged and left to the next pass; the others go on."""

    async def one(bucket: int) -> int:
        async with held(redis, schema.lease(bucket, job), ttl_ms) as mine:
            return await work(bucket) if mine else 0

    chosen = list(buckets)
    results = await asyncio.gather(*(one(b) for b in chosen), return_exceptions=True)
    done, succeeded, away = 0, 0, None
    for bucket, result in zip(chosen, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            raise result
        if isinstance(result, (*REDIS_DOWN, StoreUnavailable)):
            away = result  # the caller's loop logs it once, not once per bucket
        elif isinstance(result, BaseException):
            log.warning("%s: bucket %d failed (%s: %s), will retry", job, bucket, type(result).__name__, result)
        else:
            done, succeeded = done + result, succeeded + 1
    if away is not None:
        if succeeded == 0:
            raise away
        log.warning("%s: some buckets unavailable (%s), will retry", job, type(away).__name__)
    return done


Command = Sequence[str | int | float]


async def ask_buckets(redis: Any, command: Callable[[int], Command]) -> list[Any]:
    """Every bucket's answer to the raw command `command(bucket)` (a key of that bucket's slot), or the
    exception that stands for it when its node did not answer; in one round trip: one non-transactional
    pipeline on a standalone Redis, one per node on a cluster (see `_ask_cluster`)."""
    commands = [command(bucket) for bucket in range(INDEX_BUCKETS)]
    if is_cluster(redis):
        return await _ask_cluster(redis, commands)
    pipe = redis.pipeline(transaction=False)
    for args in commands:
        pipe.execute_command(*args)
    try:
        return list(await pipe.execute(raise_on_error=False))
    except (*REDIS_DOWN, StoreUnavailable) as exc:  # one server: none of the buckets answered
        return [exc] * len(commands)


async def _ask_cluster(redis: Any, commands: list[Command]) -> list[Any]:
    """One pipeline per primary, written on that node's connection (redis-py's ClusterPipeline would close
    every node's connections, the hot path's too, when one node fails). A node that fails, and a command
    answered MOVED or ASK (a slot on the move), are asked again one command at a time through the client,
    which follows redirections and reads the slot map again after a failover; what still fails stays an
    exception, for that bucket only."""
    await redis.initialize()  # a no-op once the slot map is known
    by_node: dict[str, tuple[Any, list[PipelineCommand]]] = {}
    again: list[int] = []
    for position, args in enumerate(commands):
        try:
            node = redis.get_node_from_key(args[1])
        except REDIS_DOWN:  # a slot the map has no node for (yet)
            again.append(position)
            continue
        by_node.setdefault(node.name, (node, []))[1].append(PipelineCommand(position, *args))
    sent = await asyncio.gather(*(node.execute_pipeline(cmds) for node, cmds in by_node.values()),
                                return_exceptions=True)
    answers: list[Any] = [None] * len(commands)
    for (_node, cmds), failure in zip(by_node.values(), sent, strict=True):
        if isinstance(failure, asyncio.CancelledError):
            raise failure
        for cmd in cmds:
            if isinstance(failure, BaseException) or isinstance(cmd.result, REDIS_DOWN):
                again.append(cmd.position)
            else:
                answers[cmd.position] = cmd.result
    if again:
        retried = await asyncio.gather(*(redis.execute_command(*commands[i]) for i in again), return_exceptions=True)
        for i, answer in zip(again, retried, strict=True):
            answers[i] = answer
    return answers


async def buckets_where(redis: Any, command: Callable[[int], Command],
                        wanted: Callable[[Any], bool] = bool) -> list[int]:
    """The buckets whose answer to `command(bucket)` is `wanted`, every bucket asked in one round trip
    (`ask_buckets`). A bucket whose node does not answer is left out, so the others go on; only when no
    bucket answers is the error raised."""
    answers = await ask_buckets(redis, command)
    errors = [a for a in answers if isinstance(a, BaseException)]
    for error in errors:
        if not isinstance(error, (*REDIS_DOWN, StoreUnavailable)):
            raise error
    if errors and len(errors) == len(answers):
        raise errors[0]
    return [bucket for bucket, answer in enumerate(answers) if not isinstance(answer, BaseException) and wanted(answer)]


async def due_buckets(redis: Any, keys: Callable[[int], str], now_ms: int) -> list[int]:
    """The buckets of an index with an entry scored at or before `now_ms`, so that leases are taken
    only where there is work."""
    return await buckets_where(redis, lambda bucket: ("ZRANGEBYSCORE", keys(bucket), "-inf", now_ms, "LIMIT", 0, 1))
