"""The auto-pipelined Redis connection of the hot path (gateway.redis_client.AutoPipeline), against a
real redis-server: commands of one tick share a write and get their own replies in order, Redis
errors map to redis-py's exceptions, and a Redis that stops answering fails fast and is reconnected
to once it is back."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis import exceptions as redis_errors

from gateway.embedded import EmbeddedRedis
from gateway.redis_client import AutoPipeline, PipelinedRedis, connect_redis
from gateway.scripts import REDIS_DOWN


async def test_commands_issued_in_one_tick_share_a_write_and_get_their_own_replies(redis_url: str) -> None:
    auto = AutoPipeline.from_url(redis_url, timeout=1.0)
    assert auto is not None
    writes = 0
    try:
        await auto.execute("PING")
        conn = auto._conn
        assert conn is not None and conn.transport is not None
        real_write = conn.transport.write

        def counting(data: bytes) -> None:
            nonlocal writes
            writes += 1
            real_write(data)

        conn.transport.write = counting  # type: ignore[method-assign]
        replies = await asyncio.gather(*(auto.execute("INCRBY", "t:auto", n) for n in range(1, 101)))
        assert replies == [n * (n + 1) // 2 for n in range(1, 101)]
        assert writes == 1
        assert await auto.execute("GET", "t:auto") == "5050"
    finally:
        await auto.aclose()


async def test_a_redis_error_becomes_the_redis_py_exception_and_the_connection_goes_on(redis_url: str) -> None:
    auto = AutoPipeline.from_url(redis_url, timeout=1.0)
    assert auto is not None
    try:
        missing, typed = await asyncio.gather(auto.execute("EVALSHA", "0" * 40, 0),
                                              auto.execute("SET", "t:s", "v"), return_exceptions=True)
        assert isinstance(missing, redis_errors.NoScriptError)
        assert typed is True or typed == "OK"
        with pytest.raises(redis_errors.ResponseError):
            await auto.execute("HGET", "t:s", "field")  # WRONGTYPE
        assert await auto.execute("GET", "t:s") == "v"
    finally:
        await auto.aclose()


async def test_a_paused_redis_fails_fast_and_a_resumed_one_is_used_again(own_redis: EmbeddedRedis) -> None:
    auto = AutoPipeline.from_url(own_redis.url, timeout=0.3)
    assert auto is not None
    try:
        assert await auto.execute("PING") == "PONG"
        own_redis.pause()
        started = time.monotonic()
        results = await asyncio.gather(auto.execute("PING"), auto.execute("PING"), return_exceptions=True)
        assert all(isinstance(r, REDIS_DOWN) for r in results)
        assert time.monotonic() - started < 1.0
        own_redis.resume()
        assert await auto.execute("PING") == "PONG"
    finally:
        own_redis.resume()
        await auto.aclose()


async def test_a_stopped_redis_is_a_connection_error_and_a_restarted_one_is_reconnected(
        own_redis: EmbeddedRedis) -> None:
    auto = AutoPipeline.from_url(own_redis.url, timeout=0.5)
    assert auto is not None
    try:
        assert await auto.execute("PING") == "PONG"
        own_redis.stop()
        with pytest.raises(REDIS_DOWN):
            await auto.execute("PING")
        own_redis.start()
        assert await auto.execute("PING") == "PONG"
    finally:
        await auto.aclose()


def test_only_plain_standalone_urls_get_a_pipelined_connection(redis_url: str) -> None:
    assert AutoPipeline.from_url("rediss://localhost:6380/0", 1.0) is None
    assert AutoPipeline.from_url("redis+cluster://a:1,b:2", 1.0) is None
    client = connect_redis(redis_url, 1.0)
    assert isinstance(client, PipelinedRedis) and client.auto is not None


async def test_a_dropped_connection_never_answers_for_its_successor(redis_url: str) -> None:
    auto = AutoPipeline.from_url(redis_url, timeout=0.2)
    assert auto is not None
    try:
        await auto.execute("SET", "t:late", "first")
        # a reply that takes longer than the timeout drops the connection; the late reply must not
        # be taken for the next command's, on the next connection
        slow = asyncio.ensure_future(auto.execute("EVAL", "local t = redis.call('TIME') "
                                                  "while true do local n = redis.call('TIME') "
                                                  "if (n[1] - t[1]) * 1000000 + n[2] - t[2] > 400000 then break end "
                                                  "end return 'slow'", 0))
        with pytest.raises(redis_errors.TimeoutError):
            await slow
        replies = await asyncio.gather(*(auto.execute("GET", "t:late") for _ in range(20)),
                                       return_exceptions=True)
        assert all(r == "first" or isinstance(r, REDIS_DOWN) for r in replies)
        await asyncio.sleep(0.4)
        assert await auto.execute("GET", "t:late") == "first"
    finally:
        await auto.aclose()
