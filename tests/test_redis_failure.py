"""Invariant 6: with Redis unreachable the gateway fails closed with a clear 503, never hangs,
forwards nothing, and recovers by itself when Redis returns."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest
import redis as sync_redis
from conftest import Harness, emulator_state

from gateway.embedded import EmbeddedRedis

BODY = {"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]}
#: A hang detector, not a speed measurement: the configured Redis timeout is 0.5 s, and a request
#: that waited on a dead Redis (default socket timeouts are minutes) would blow far past this.
HANG = 3.0


async def _post(h: Harness, key: str) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    resp = await asyncio.wait_for(h.client.post("/v1/chat/completions", json=BODY,
                                                headers={"Authorization": f"Bearer {key}"}), HANG)
    return resp.status, await resp.json(), time.monotonic() - started


async def test_redis_down_gives_503_then_recovers(isolated: Harness, own_redis: EmbeddedRedis) -> None:
    account, key = await isolated.account(credits=1)
    assert (await _post(isolated, key))[0] == 200
    forwarded = emulator_state(isolated.emulator).total_requests
    own_redis.stop()
    status, payload, _elapsed = await _post(isolated, key)
    assert status == 503
    assert payload["error"]["code"] == "service_unavailable"
    assert emulator_state(isolated.emulator).total_requests == forwarded  # nothing went upstream
    ready = await isolated.client.get("/ready")
    assert ready.status == 503 and (await ready.json())["redis"] is False
    assert (await isolated.client.get("/health")).status == 200  # alive, just not ready
    metrics = await (await isolated.client.get("/metrics")).text()
    assert "gateway_redis_errors_total 1.0" in metrics
    own_redis.start()
    status, _payload, _ = await _post(isolated, key)
    assert status == 200
    isolated.redis = sync_redis.Redis.from_url(own_redis.url)
    assert (await isolated.assert_conserved(account))["requests"] == 2


async def test_a_hung_redis_fails_closed_instead_of_hanging(isolated: Harness, own_redis: EmbeddedRedis) -> None:
    _account, key = await isolated.account(credits=1)
    assert (await _post(isolated, key))[0] == 200  # the key is now in the auth cache
    own_redis.pause()  # the server accepts nothing and answers nothing
    try:
        status, payload, elapsed = await _post(isolated, key)
    finally:
        own_redis.resume()
    assert status == 503, payload
    assert elapsed < HANG
    assert (await _post(isolated, key))[0] == 200


async def test_the_sdk_sees_a_503_and_no_answer_without_metering(isolated: Harness, own_redis: EmbeddedRedis) -> None:
    _account, key = await isolated.account(credits=1)
    sdk = isolated.sdk(key)
    own_redis.stop()
    with pytest.raises(openai.InternalServerError) as info:
        await sdk.chat.completions.create(model="demo-mini", messages=BODY["messages"])
    assert info.value.status_code == 503
    own_redis.start()
    done = await sdk.chat.completions.create(model="demo-mini", messages=BODY["messages"])
    assert done.choices[0].message.content
