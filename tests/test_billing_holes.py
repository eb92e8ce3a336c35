"""Issue 10's holes in the bill, each reproduced against a real redis-server: leases that outlive
their requests, streams dropped early, rollovers with holds in flight, retried and lost script
calls, Redis stalls, and limits that leak or count the wrong requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from conftest import Harness, emulator_state, make_settings

from gateway.app import create_app
from gateway.embedded import EmbeddedRedis
from gateway.keys import KeySchema
from gateway.limits import Limit, encode
from gateway.metering import Meter, PlanChanged, Quote, ReserveSpec

PLANS = """
default_plan: free
plans:
  free: {monthly_credits: 1, credit_usd: 1, models: ["demo-*"]}
  pro: {monthly_credits: 20, credit_usd: 1, models: ["demo-*"]}
  rpm: {monthly_credits: 100, credit_usd: 1, models: ["demo-*"], limits: {requests_per_minute: 2}}
"""
AUTH = "Authorization"
MICRO = 1_000_000


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # short leases, renewed every lease/4, and a reaper that runs all the time
    return {"hold_lease_seconds": 0.8, "reap_interval_seconds": 0.1, "client_stall_seconds": 1.0}


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "demo-mini", "messages": [{"role": "user", "content": text}], **extra}


async def _until(condition: Any, seconds: float = 10.0) -> None:
    """Await a condition that background work (retries, the reaper) makes true; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.05)


def _spec(q: Quote, allowance: int, rows: str = "") -> ReserveSpec:
    return ReserveSpec(q.prompt_tokens_bound + q.max_output_tokens, q.prompt_tokens_bound + 1, 0, 0, rows,
                       (0, 2**52), allowance, "free", MICRO)


def _flat(cost: int) -> Quote:
    """A quote whose whole cost is `cost`, from the first token on (no lowering possible)."""
    return Quote(1, 1, cost, cost, cost)


# ---------------------------------------------------------------- 1. leases outlived


async def test_a_stream_longer_than_its_lease_keeps_its_hold_and_is_billed_in_full(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    body = _chat("[[emu out=40 delay_ms=60]]", stream=True)  # ~2.4 s, three leases of 0.8 s
    async with harness.client.post("/v1/chat/completions", json=body, headers={AUTH: f"Bearer {key}"}) as resp:
        assert resp.status == 200
        first = await resp.content.readline()
        assert first.startswith(b"data:")
        await asyncio.sleep(2.0)  # the reaper ran ~20 times meanwhile
        assert harness.holds(account), "the hold of a request in flight was reaped"
        await resp.read()
    await harness.assert_conserved(account)
    events = [e for e in harness.ledger(account) if e["type"] in ("usage", "reaped", "released")]
    assert [e["type"] for e in events] == ["usage"]
    assert events[0]["estimated"] == "0" and int(events[0]["out"]) == 40 and events[0]["uncollected"] == "0"


async def test_a_settle_after_its_hold_was_reaped_charges_what_the_balance_can_pay(harness: Harness) -> None:
    account, _key = await harness.account(credits="0.000400")  # 400 micro-credits, plus the free allowance
    meter, keys = harness.gw.meter, KeySchema().for_account(account)
    assert meter is not None
    key_id = (await harness.gw.store.list_keys(account))[0]["id"]  # type: ignore[union-attr]
    await meter.reserve(keys, key_id, "req_gone", "free", _flat(300), _spec(_flat(300), MICRO))
    later = Meter(meter.runner, meter.lease_ms, clock_offset_ms=60_000)
    assert (await later.reap(keys))[0] == 1
    available = harness.state(account)["allow"] + harness.state(account)["extra"]
    settled = await meter.settle(keys, "req_gone", key_id, available + 500, {"outcome": "ok"})
    assert settled.settled and settled.charged == available  # everything it could pay ...
    event = [e for e in harness.ledger(account) if e["type"] == "usage"][-1]
    assert event["reaped"] == "1" and int(event["uncollected"]) == 500  # ... and the rest on record
    assert int(harness.redis.hget(keys.account, "uncollected")) == 500
    await harness.assert_conserved(account)


# ---------------------------------------------------------------- 2. streams dropped early


async def test_a_client_that_stops_reading_is_dropped_and_its_stream_still_billed_in_full(harness: Harness) -> None:
    account, key = await harness.account(credits=50)
    body = json.dumps(_chat("[[emu out=4000 obfuscation=3000]]", stream=True, max_tokens=4000)).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window, never read
    stalled.setblocking(False)
    try:
        server = harness.client.server
        await loop.sock_connect(stalled, (server.host, server.port))
        await loop.sock_sendall(stalled, request)
        # the gateway gives up on the client after client_stall_seconds, reads the upstream to its end
        # and bills the provider's own usage, all while the client still holds the connection open
        await _until(lambda: any(e["type"] == "usage" for e in harness.ledger(account)), 30)
    finally:
        stalled.close()
    await harness.assert_conserved(account)
    [event] = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert event["outcome"] == "client_disconnected" and event["estimated"] == "0" and event["out"] == "4000"


async def test_a_responses_stream_dropped_while_the_model_reasons_is_charged_its_reasoning(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    body = {"model": "demo-mini", "stream": True, "input": "think [[emu out=5 reasoning=40 delay_ms=20]]"}
    resp = await harness.client.post("/v1/responses", json=body, headers={AUTH: f"Bearer {key}"})
    assert resp.status == 200
    assert (await resp.content.readline()).startswith(b"event: response.created")
    resp.close()  # the client leaves during the (invisible) reasoning
    state = await harness.assert_conserved(account)
    event = [e for e in harness.ledger(account) if e["type"] == "usage"][-1]
    assert event["outcome"] == "client_disconnected" and event["estimated"] == "0"
    assert (int(event["out"]), int(event["reasoning"])) == (45, 40) and state["charged"] > 0


# ---------------------------------------------------------------- 3. rollover with a hold in flight


async def _pro_with_purchased_credits(harness: Harness) -> tuple[str, str, Meter]:
    account, _key = await harness.account(credits=5, plan="pro")  # 20 allowance + 5 purchased
    key_id = (await harness.gw.store.list_keys(account))[0]["id"]  # type: ignore[union-attr]
    assert harness.gw.meter is not None
    return account, key_id, harness.gw.meter


@pytest.mark.parametrize("actual", [22 * MICRO, 10 * MICRO])
async def test_a_rollover_expires_only_the_unheld_allowance_and_never_drives_a_bucket_negative(
        harness: Harness, actual: int) -> None:
    account, key_id, meter = await _pro_with_purchased_credits(harness)
    keys = KeySchema().for_account(account)
    await meter.reserve(keys, key_id, "req_long", "pro", _flat(22 * MICRO), _spec(_flat(22 * MICRO), 20 * MICRO))
    await harness.gw.store.change_plan(harness.gw.config, account, "free", "next_cycle")  # type: ignore[union-attr]
    meter.clock_offset_ms += 32 * 86_400_000  # past the cycle's end
    small = _flat(MICRO // 2)
    for plan in ("pro", "free"):  # the first try rolls the cycle onto the queued plan, the second reserves
        with contextlib.suppress(PlanChanged):
            await meter.reserve(keys, key_id, "req_next", plan, small, _spec(small, MICRO))
    state = harness.state(account)
    assert state["expired"] == 0  # all 20 of the old allowance were held by req_long: none expired yet
    settled = await meter.settle(keys, "req_long", key_id, actual, {"outcome": "ok"})
    assert settled.charged == actual
    await meter.settle(keys, "req_next", key_id, MICRO // 2, {"outcome": "ok"})
    state = await harness.assert_conserved(account)
    assert state["extra"] >= 0 and state["allow"] >= 0
    # what req_long did not use of the old allowance expired when it ended; the new cycle's 1 credit stays
    old_allowance_used = min(actual, 20 * MICRO)
    assert state["expired"] == 20 * MICRO - old_allowance_used
    assert state["allow"] + state["extra"] == 25 * MICRO + MICRO - actual - MICRO // 2 - state["expired"]


# ---------------------------------------------------------------- 10. retries are idempotent


async def test_a_reserve_run_twice_by_a_connection_retry_holds_once_and_serves(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    runner = harness.gw.meter.runner  # type: ignore[union-attr]
    original = runner.run

    async def twice(name: str, keys: list[str], args: list[Any]) -> list[Any]:
        if name == "reserve":  # the reply of the first run was lost: the client library sent it again
            await original(name, keys, args)
        return await original(name, keys, args)

    runner.run = twice  # type: ignore[method-assign]
    async with harness.client.post("/v1/chat/completions", json=_chat("hi"), headers={AUTH: f"Bearer {key}"}) as r:
        assert r.status == 200
    runner.run = original  # type: ignore[method-assign]
    await harness.assert_conserved(account)  # held once, ended once, nothing left for the reaper


# ---------------------------------------------------------------- 11. Redis stalls


async def test_reserves_that_timed_out_in_a_redis_stall_are_cancelled_when_it_returns(
        isolated: Harness, own_redis: EmbeddedRedis) -> None:
    account, key = await isolated.account(credits=1)
    async with isolated.client.post("/v1/chat/completions", json=_chat("hi"), headers={AUTH: f"Bearer {key}"}):
        pass  # the key is in the auth cache now
    forwarded = emulator_state(isolated.emulator).total_requests
    own_redis.pause()
    try:
        answers = await asyncio.gather(*(isolated.client.post("/v1/chat/completions", json=_chat("hi"),
                                                              headers={AUTH: f"Bearer {key}"}) for _ in range(8)))
        assert [a.status for a in answers] == [503] * 8
    finally:
        own_redis.resume()
    await _until(lambda: not isolated.gw.retries.queued)
    state = isolated.state(account)
    assert state["held"] == 0 and isolated.holds(account) == {}  # no phantom hold waits for the reaper
    assert emulator_state(isolated.emulator).total_requests == forwarded
    await isolated.assert_conserved(account)


async def test_a_settlement_redis_cannot_take_is_served_then_retried_until_it_lands(
        isolated: Harness, own_redis: EmbeddedRedis) -> None:
    account, key = await isolated.account(credits=1)
    emulator_state(isolated.emulator).latency_ms = 400  # the provider thinks; Redis freezes meanwhile
    pending = [asyncio.ensure_future(isolated.client.post("/v1/chat/completions", json=_chat(f"hi {i}", stream=s),
                                                          headers={AUTH: f"Bearer {key}"}))
               for i in range(3) for s in (False, True)]
    await _until(lambda: len(isolated.holds(account)) == 6)
    own_redis.pause()
    try:
        answers = await asyncio.gather(*pending)
        assert [a.status for a in answers] == [200] * 6  # served answers are never turned into 503s
        bodies = [await a.read() for a in answers]
        assert all(bodies)
        # the settlements wait in the process (answers go out first: they are queued once the
        # settle calls they started have timed out)
        await _until(lambda: len(isolated.gw.retries.queued) == 6)
    finally:
        own_redis.resume()
    await _until(lambda: not isolated.gw.retries.queued)
    state = await isolated.assert_conserved(account)
    usage = [e for e in isolated.ledger(account) if e["type"] == "usage"]
    assert len(usage) == 6 and state["requests"] == 6 and all(e["estimated"] == "0" for e in usage)


# ---------------------------------------------------------------- 14. limits


async def test_window_buckets_are_deleted_once_they_leave_their_window(harness: Harness) -> None:
    account, _key = await harness.account(credits=100)
    key_id = (await harness.gw.store.list_keys(account))[0]["id"]  # type: ignore[union-attr]
    meter, keys = harness.gw.meter, KeySchema().for_account(account)
    assert meter is not None
    rows = encode([Limit("requests_per_minute", "n", 1000, "a", 60_000, 1000)])
    q = _flat(10)
    for i in range(200):  # one request every 7 s: each lands in a bucket of its own
        await meter.reserve(keys, key_id, f"req_{i}", "free", q, _spec(q, MICRO, rows))
        await meter.settle(keys, f"req_{i}", key_id, 10, {"outcome": "ok"}, rows)
        meter.clock_offset_ms += 7_000
    fields = [f for f in harness.redis.hkeys(keys.limits) if f.startswith(b"w:")]
    assert len(fields) <= 60_000 // 1000 // 7 + 1


async def test_calls_in_flight_to_one_provider_do_not_count_against_another_providers_cap(harness: Harness) -> None:
    account, _key = await harness.account(credits=100)
    key_id = (await harness.gw.store.list_keys(account))[0]["id"]  # type: ignore[union-attr]
    meter, keys = harness.gw.meter, KeySchema().for_account(account)
    assert meter is not None
    q = _flat(10)
    cap_a = encode([Limit("a.calls_per_cycle", "n", 1, "a", 0, 0, "a")])
    cap_b = encode([Limit("b.calls_per_cycle", "n", 1, "a", 0, 0, "b")])
    await meter.reserve(keys, key_id, "req_a", "free", q, _spec(q, MICRO, cap_a))  # in flight to a
    held_b = await meter.reserve(keys, key_id, "req_b", "free", q, _spec(q, MICRO, cap_b))
    assert held_b.hold == 10


async def test_requests_the_upstream_refused_count_in_request_windows_but_cost_nothing(harness: Harness) -> None:
    account, key = await harness.account(plan="rpm")  # 2 requests a minute
    headers = {AUTH: f"Bearer {key}"}
    async with harness.client.post("/v1/chat/completions", json=_chat("[[emu fail=500]]"), headers=headers) as r:
        assert r.status == 500
    before = harness.state(account)
    assert before["charged"] == 0
    async with harness.client.post("/v1/chat/completions", json=_chat("hi"), headers=headers) as r:
        assert r.status == 200
    async with harness.client.post("/v1/chat/completions", json=_chat("hi"), headers=headers) as r:
        assert r.status == 429  # the provider counted the refused request too
    state = await harness.assert_conserved(account)
    assert state["requests"] == 1  # ... but it was never billed, nor counted as a served request


async def test_settlements_still_queued_at_shutdown_are_logged_and_counted_as_abandoned(
        own_redis: EmbeddedRedis, config_dir: Path, emulator: Any, aiohttp_client: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    client = await aiohttp_client(create_app(make_settings(config_dir, own_redis.url, settle_drain_seconds=0.3)))
    h = Harness(client, sync_redis.Redis.from_url(own_redis.url), emulator)
    _account, key = await h.account(credits=1)
    emulator_state(emulator).latency_ms = 300
    pending = asyncio.ensure_future(client.post("/v1/chat/completions", json=_chat("hi"),
                                                headers={AUTH: f"Bearer {key}"}))
    await asyncio.sleep(0.1)
    own_redis.stop()
    assert (await pending).status == 200
    gw = h.gw
    await _until(lambda: gw.retries.queued)  # the answer went out first; its settlement then failed
    h.redis.close()
    with caplog.at_level(logging.ERROR, logger="gateway.settlement"):
        await client.close()  # the app shuts down with Redis still gone
    assert not gw.retries.queued
    assert "settle for req_" in caplog.text and "abandoned" in caplog.text
    assert b'gateway_settlements_abandoned_total{op="settle"} 1.0' in gw.metrics.render()


# ---------------------------------------------------------------- what an adversarial review found


async def test_a_settlement_redis_answers_with_an_error_is_queued_and_lands_later(
        isolated: Harness, own_redis: EmbeddedRedis) -> None:
    account, key = await isolated.account(credits=1)
    body = _chat("[[emu out=10 delay_ms=50]]", stream=True)
    async with isolated.client.post("/v1/chat/completions", json=body, headers={AUTH: f"Bearer {key}"}) as resp:
        assert resp.status == 200
        await resp.content.readline()
        isolated.redis.config_set("maxmemory", "1")  # every write now fails with OOM
        try:
            assert await resp.read()
            await isolated.gw.quiesce()
            assert isolated.gw.retries.queued  # the settle failed with an error reply: queued, not lost
        finally:
            isolated.redis.config_set("maxmemory", "0")
    await _until(lambda: not isolated.gw.retries.queued)
    await isolated.assert_conserved(account)
    [event] = [e for e in isolated.ledger(account) if e["type"] in ("usage", "reaped", "released")]
    assert event["type"] == "usage" and event["out"] == "10" and event["reaped"] == "0"


async def test_a_zero_amount_held_in_a_limit_never_breaks_settle_release_or_reap(harness: Harness) -> None:
    account, _key = await harness.account(credits=1)
    key_id = (await harness.gw.store.list_keys(account))[0]["id"]  # type: ignore[union-attr]
    meter, keys = harness.gw.meter, KeySchema().for_account(account)
    assert meter is not None
    # a zero-priced route under a USD cap: the request holds 0 micro-USD (Redis < 7.2 refuses "-0")
    rows = encode([Limit("max_cost_usd_per_cycle", "u", 5 * MICRO, "a", 0, 0),
                   Limit("requests_per_minute", "n", 3, "a", 60_000, 1000)])
    free = Quote(10, 10, 0, 0, 0)
    for i in range(3):
        await meter.reserve(keys, key_id, f"req_{i}", "free", free, _spec(free, MICRO, rows))
    assert (await meter.settle(keys, "req_0", key_id, 0, {"outcome": "ok"}, rows, 20, 0)).settled
    assert await meter.release(keys, "req_1", "upstream_500", rows, key_id, provider_answered=True)
    later = Meter(meter.runner, meter.lease_ms, clock_offset_ms=meter.lease_ms + 1000)
    assert await later.reap(keys) == (1, 0)
    held = {k: int(v) for k, v in harness.redis.hgetall(keys.limits).items() if k.startswith(b"h:")}
    assert set(held.values()) == {0}
    await harness.assert_conserved(account)


async def test_a_hold_taken_before_holds_had_parts_still_settles_and_reaps(harness: Harness) -> None:
    account, _key = await harness.account(credits=1)
    keys = KeySchema().for_account(account)
    meter = harness.gw.meter
    assert meter is not None
    for rid in ("req_old_settled", "req_old_reaped"):  # the previous release stored the amount alone
        harness.redis.hset(keys.holds, rid, "5000")
        harness.redis.zadd(keys.hold_expiry, {rid: 0 if rid.endswith("reaped") else 2**52})
        harness.redis.hincrby(keys.account, "held", 5000)
    assert (await meter.settle(keys, "req_old_settled", "k", 4000, {"outcome": "ok"})).charged == 4000
    assert await meter.reap(keys) == (1, 5000)
    state = await harness.assert_conserved(account)
    assert state["charged"] == 4000 and state["extra"] + state["allow"] == 2 * MICRO - 4000


async def test_a_settlement_queued_longer_than_an_ended_hold_is_remembered_is_given_up_loudly(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    retries = harness.gw.retries
    attempts: list[str] = []

    async def attempt() -> None:
        attempts.append("tried")

    retries.add("req_stale", "settle", attempt)
    op, call, _since = retries.queued["req_stale"]
    retries.queued["req_stale"] = (op, call, time.monotonic() - retries.max_age - 1)
    with caplog.at_level(logging.ERROR, logger="gateway.settlement"):
        assert await retries.run_once() == 0
    assert attempts == []  # a late retry could charge twice once the tombstone is gone: not run
    assert "req_stale" in caplog.text and "abandoned" in caplog.text
    assert b'gateway_settlements_abandoned_total{op="settle"} 1.0' in harness.gw.metrics.render()
