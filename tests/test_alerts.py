"""Alerts: thresholds of the allowance and of caps fire once per cycle at the right request, even under
concurrency; the webhook is signed, retried after failures and delivered at least once."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ADMIN, Harness

from gateway.keys import KeySchema

SECRET = "whsec-test"
PLANS = """
default_plan: free
plans:
  free:
    monthly_credits: 0.001
    models: ["demo-*"]
    alerts: {webhook_url: "${ALERT_URL}", webhook_secret: "whsec-test"}
  capped:
    monthly_credits: 100
    models: ["demo-*"]
    limits: {requests_per_cycle: 10}
    alerts: {thresholds: [50, 100]}
"""
BIG = {"model": "demo-mini", "max_tokens": 200, "messages": [{"role": "user", "content": "go [[emu out=200]]"}]}


class Receiver:
    """A webhook endpoint that fails its first two deliveries and checks every signature."""

    def __init__(self) -> None:
        self.attempts: list[dict[str, Any]] = []
        self.bad_signatures = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        parts = dict(p.split("=", 1) for p in request.headers["X-Gateway-Signature"].split(","))
        expected = hmac.new(SECRET.encode(), f"{parts['t']}.{body}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, parts["v1"]):
            self.bad_signatures += 1
        self.attempts.append(json.loads(body))
        return web.Response(status=500 if len(self.attempts) <= 2 else 200)

    def delivered(self) -> set[str]:
        return {a["id"] for a in self.attempts[2:]}


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Receiver]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    server = TestServer(app)
    await server.start_server()
    monkeypatch.setenv("ALERT_URL", str(server.make_url("/hook")))
    yield hook
    await server.close()


@pytest.fixture
def plans_yaml(receiver: Receiver) -> str:
    return PLANS  # its webhook URL names the receiver (ALERT_URL)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"webhook_poll_seconds": 0.02, "webhook_backoff_seconds": 0.02}


async def _call(harness: Harness, key: str, body: dict[str, Any] = BIG) -> str:
    return (await _send(harness, key, body))[0]


async def _send(harness: Harness, key: str, body: dict[str, Any] = BIG) -> tuple[str, int]:
    """One request, and its settlement (which lands just after a non-streamed answer) with its alerts:
    requests sent one after another then see each other's charges, not each other's holds."""
    async with harness.client.post("/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
    await harness.gw.quiesce()
    return resp.headers.get("x-request-id", ""), resp.status


def _alerts(harness: Harness, account: str) -> dict[str, dict[str, Any]]:
    raw = harness.redis.hgetall(KeySchema().for_account(account).alerts)
    return {k.decode().split(":", 1)[1]: json.loads(v) for k, v in raw.items()}


async def _until(predicate: Any) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)  # the deliverer polls every 20 ms
    raise AssertionError("timed out")


async def test_thresholds_fire_once_at_the_request_that_crosses_them(harness: Harness, receiver: Receiver) -> None:
    account, key = await harness.account()  # the free plan's 0.001-credit allowance only
    sent = [await _send(harness, key) for _ in range(12)]
    await harness.gw.quiesce()
    running, crossing = 0, {}
    for event in (e for e in harness.ledger(account) if e["type"] == "usage"):
        before, running = running, running + int(event["cost"])
        for threshold in (80, 90, 100):
            if before * 100 < threshold * 1000 <= running * 100:
                crossing[threshold] = event["rid"]
            if before * 100 < (100 - 25) * 1000 <= running * 100:
                crossing["low_credit"] = event["rid"]
    refused = [rid for rid, status in sent if status == 402]
    assert refused and 100 not in crossing  # the last charges were lowered to fit: a remainder is left
    crossing[100] = refused[0]  # ... too small for any request: the first refusal is the 100 % alert
    alerts = _alerts(harness, account)
    assert set(alerts) == {"allowance:80", "allowance:90", "allowance:100", "low_credit"}
    for threshold, rid in crossing.items():
        field = "low_credit" if threshold == "low_credit" else f"allowance:{threshold}"
        assert alerts[field]["request_id"] == rid  # fired by exactly that request
    await _until(lambda: receiver.delivered() >= {a["id"] for a in alerts.values()})
    assert receiver.bad_signatures == 0
    assert len(receiver.attempts) >= len(alerts) + 2  # the two failed attempts were retried
    # delivered at least once: receivers deduplicate on the alert id
    assert {a["id"] for a in receiver.attempts} == {a["id"] for a in alerts.values()}


async def test_concurrent_settlements_fire_each_alert_once(harness: Harness, receiver: Receiver) -> None:
    account, key = await harness.account()
    await asyncio.gather(*(_call(harness, key) for _ in range(30)))
    await harness.gw.quiesce()
    # refusals while others were in flight say nothing about the allowance; with the burst settled,
    # requests one at a time use up what is left
    statuses = [(await _send(harness, key))[1] for _ in range(10)]
    assert 402 in statuses
    await harness.gw.quiesce()
    alerts = _alerts(harness, account)
    assert set(alerts) == {"allowance:80", "allowance:90", "allowance:100", "low_credit"}
    await _until(lambda: receiver.delivered() >= {a["id"] for a in alerts.values()})
    ledger_types = [e["type"] for e in harness.ledger(account)]
    assert ledger_types.count("usage") >= 1


async def test_alerts_are_listed_marked_read_shown_in_credits_and_fire_again_next_cycle(harness: Harness) -> None:
    account, key = await harness.account()
    for _ in range(12):
        await _call(harness, key)
    await harness.gw.quiesce()
    me = {"Authorization": f"Bearer {key}"}
    async with harness.client.get("/gateway/alerts", headers=me) as resp:
        listed = (await resp.json())["data"]
    assert {a["kind"] for a in listed} == {"allowance", "low_credit"} and not any(a["read"] for a in listed)
    async with harness.client.get("/gateway/credits", headers=me) as resp:
        credits = await resp.json()
    assert any("80% of this cycle" in w for w in credits["warnings"]) and len(credits["alerts"]) == len(listed)
    first = listed[0]["id"]
    async with harness.client.post(f"/gateway/alerts/{first}/read", headers=me) as resp:
        assert resp.status == 200
    async with harness.client.post("/gateway/alerts/nope/read", headers=me) as resp:
        assert resp.status == 404
    async with harness.client.get(f"/admin/accounts/{account}/alerts", headers=ADMIN) as resp:
        assert [a["read"] for a in (await resp.json())["data"] if a["id"] == first] == [True]
    assert harness.gw.meter is not None
    harness.gw.meter.clock_offset_ms += 32 * 86_400_000
    for _ in range(12):
        await _call(harness, key)
    await harness.gw.quiesce()
    fired = harness.redis.hlen(KeySchema().for_account(account).alerts)
    assert fired == 2 * len(listed)  # the same thresholds, once more, in the new cycle


async def test_cap_thresholds(harness: Harness) -> None:
    account, key = await harness.account(plan="capped")
    small = {**BIG, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    rids = [await _call(harness, key, small) for _ in range(10)]
    await harness.gw.quiesce()
    alerts = _alerts(harness, account)
    assert alerts["requests_per_cycle:50"]["request_id"] == rids[4]
    assert alerts["requests_per_cycle:100"]["request_id"] == rids[9]
    assert not any(k.startswith("allowance") for k in alerts)


async def test_one_oversized_prompt_on_a_full_balance_is_not_the_allowance_used_up(harness: Harness) -> None:
    account, key = await harness.account()
    huge = {**BIG, "messages": [{"role": "user", "content": "x" * 200_000}]}
    _rid, status = await _send(harness, key, huge)
    assert status == 402
    await harness.gw.quiesce()
    assert _alerts(harness, account) == {}
    _rid, status = await _send(harness, key)  # an ordinary request still runs, and fires nothing yet
    assert status == 200
    await harness.gw.quiesce()
    assert not any(a["threshold"] == "100" for a in _alerts(harness, account).values())
