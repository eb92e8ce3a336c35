"""The operations metrics move when their event happens: a stream's time to first token, requests in
flight, upstream errors by cause, USD charged, webhook deliveries by result and the queue's depth."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import LOOP_LAG_TOLERANT, TEST_PLANS, Harness
from prometheus_client import CollectorRegistry, Counter

from gateway import alerts
from gateway.keys import bucket_of
from gateway.metrics import Labelled

CHAT = {"model": "demo-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hello"}]}
PLANS = TEST_PLANS + """  hooked:
    monthly_credits: 1
    credit_usd: 1
    models: ["demo-*"]
    alerts: {webhook_url: "${HOOK_URL}", webhook_secret: "whsec-metrics"}
"""


class Hook:
    """A webhook endpoint answering with the statuses queued in `answers` (then 200)."""

    def __init__(self) -> None:
        self.answers: list[int] = []
        self.calls = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.calls += 1
        return web.Response(status=self.answers.pop(0) if self.answers else 200)


@pytest.fixture
async def hook(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Hook]:
    receiver = Hook()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = TestServer(app)
    await server.start_server()
    monkeypatch.setenv("HOOK_URL", str(server.make_url("/hook")))
    yield receiver
    await server.close()


@pytest.fixture
def plans_yaml(hook: Hook) -> str:
    return PLANS


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # the deliverer polls every bucket every 20 ms: on a loaded machine the loop lags behind Redis' timeout
    return {"webhook_poll_seconds": 0.02, "webhook_backoff_seconds": 0.02, **LOOP_LAG_TOLERANT}


async def _metric(harness: Harness, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when absent)."""
    text = await (await harness.client.get("/metrics")).text()
    for line in text.splitlines():
        found = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if found and dict(re.findall(r'(\w+)="([^"]*)"', found.group(1) or "")) == labels:
            return float(found.group(2))
    return 0.0


async def _until(check: Any) -> None:
    for _ in range(1000):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


async def _post(harness: Harness, key: str, body: dict[str, Any] = CHAT) -> int:
    async with harness.client.post("/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status


async def test_a_stream_observes_its_time_to_first_token(harness: Harness) -> None:
    _, key = await harness.account(credits=1)
    labels = {"dialect": "openai", "model": "demo-mini"}
    assert await _metric(harness, "gateway_time_to_first_token_seconds_count", **labels) == 0
    assert await _post(harness, key, {**CHAT, "stream": True}) == 200
    assert await _post(harness, key) == 200  # not a stream: no TTFT
    assert await _metric(harness, "gateway_time_to_first_token_seconds_count", **labels) == 1
    assert await _metric(harness, "gateway_time_to_first_token_seconds_sum", **labels) > 0


async def test_requests_in_flight_rise_during_a_slow_stream_and_fall_back(harness: Harness) -> None:
    _, key = await harness.account(credits=1)
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "slow [[emu delay_ms=100 out=5]]"}]}
    request = asyncio.ensure_future(_post(harness, key, body))

    async def in_flight_is(value: float) -> bool:
        return await _metric(harness, "gateway_requests_in_flight", dialect="openai") == value

    await _until(lambda: in_flight_is(1))
    assert await request == 200
    await harness.gw.quiesce()
    assert await in_flight_is(0)


async def test_upstream_errors_are_counted_by_cause_and_usd_by_model(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    for fail in ("500", "429", "500"):
        await _post(harness, key, {**CHAT, "messages": [{"role": "user", "content": f"x [[emu fail={fail}]]"}]})
    assert await _metric(harness, "gateway_upstream_errors_total", upstream="demo", cause="status_5xx") == 2
    assert await _metric(harness, "gateway_upstream_errors_total", upstream="demo", cause="status_4xx") == 1
    assert await _metric(harness, "gateway_usd_charged_total", model="demo-mini") == 0
    assert await _post(harness, key) == 200
    await harness.gw.quiesce()
    usd_micro = sum(int(e.get("usd_micro", 0)) for e in harness.ledger(account)
                    if e["type"] == "usage")
    assert usd_micro > 0
    assert await _metric(harness, "gateway_usd_charged_total", model="demo-mini") == pytest.approx(usd_micro / 1e6)


async def test_webhook_deliveries_are_counted_by_result_and_the_queue_depth_reported(harness: Harness,
                                                                                     hook: Hook) -> None:
    account, _ = await harness.account(plan="hooked")
    gw = harness.gw
    hook.answers = [500, 500]  # the first two attempts fail, the third is delivered
    await alerts.enqueue(gw, account, [{"id": "a1", "kind": "test"}])
    assert await alerts.report_queue_depth(gw) == 1
    assert await _metric(harness, "gateway_webhook_queue_depth") == 1

    async def delivered() -> bool:
        return await _metric(harness, "gateway_webhook_deliveries_total", result="delivered") == 1

    await _until(delivered)
    assert await _metric(harness, "gateway_webhook_deliveries_total", result="failed") == 2
    assert await alerts.report_queue_depth(gw) == 0
    assert await _metric(harness, "gateway_webhook_queue_depth") == 0

    # a delivery on its last attempt that fails again is given up
    hook.answers = [500]
    delivery = "dlv_00000000000000aa"
    harness.redis.set(gw.schema.delivery(delivery), json.dumps(
        {"account_id": account, "body": '{"id":"a2"}', "attempts": alerts.MAX_ATTEMPTS - 1}))
    harness.redis.zadd(gw.schema.webhooks(bucket_of(delivery)), {delivery: 0})

    async def gave_up() -> bool:
        return await _metric(harness, "gateway_webhook_deliveries_total", result="gave_up") == 1

    await _until(gave_up)
    assert await alerts.report_queue_depth(gw) == 0


def test_label_children_are_bound_once() -> None:
    counter = Labelled(Counter("x_total", "x", ["a", "b"], registry=CollectorRegistry()))
    child = counter.labels("1", "2")
    assert counter.labels("1", "2") is child and counter.labels("1", "3") is not child
    child.inc(2)
    assert counter.metric.labels("1", "2")._value.get() == 2  # the same child prometheus-client keeps
