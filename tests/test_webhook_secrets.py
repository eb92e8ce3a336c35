"""Webhook URLs and secrets stay in the account record: the ledger, the delivery queue, the logs and the
admin answers name a webhook by host and fingerprint only; and a delivery record that another process
finished, or that cannot be read, is never retried forever."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis as sync_redis
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ADMIN, Harness

from gateway.keys import INDEX_BUCKETS, KeySchema, bucket_of

SECRET = "whsec-account-0123456789"
HOOK_PATH = "/services/T0SECRET/B0SECRET/XXXXsecretpathXXXX"
PLANS = """
default_plan: free
plans:
  free:
    monthly_credits: 0.001
    models: ["demo-*"]
"""
BIG = {"model": "demo-mini", "max_tokens": 200, "messages": [{"role": "user", "content": "go [[emu out=200]]"}]}


def _queued(harness: Harness) -> int:
    """Deliveries waiting in every bucket of the sharded webhook queue."""
    return sum(harness.redis.zcard(KeySchema().webhooks(bucket)) for bucket in range(INDEX_BUCKETS))


class Receiver:
    """A webhook endpoint that answers 500 until told to accept, and checks every signature."""

    def __init__(self) -> None:
        self.accept = False
        self.attempts: list[tuple[str, bool]] = []  # (delivery id, signature valid)
        self.on_attempt: Any = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        parts = dict(p.split("=", 1) for p in request.headers["X-Gateway-Signature"].split(","))
        expected = hmac.new(SECRET.encode(), f"{parts['t']}.{body}".encode(), hashlib.sha256).hexdigest()
        delivery = request.headers["X-Gateway-Delivery"]
        self.attempts.append((delivery, hmac.compare_digest(expected, parts["v1"])))
        if self.on_attempt is not None:
            self.on_attempt(delivery)
        return web.Response(status=200 if self.accept else 500)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post(HOOK_PATH, hook.handle)
    server = TestServer(app)
    await server.start_server(access_log=None)  # the receiver's own log is not the gateway's
    yield hook, str(server.make_url(HOOK_PATH))
    await server.close()


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"webhook_poll_seconds": 0.02, "webhook_backoff_seconds": 0.02}


async def _until(predicate: Any, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)  # the deliverer polls every 20 ms
    raise AssertionError(f"timed out waiting for {what}")


def _everything_in_redis(client: sync_redis.Redis, but: str) -> str:
    """Every key and value in Redis as text (hashes, strings, sorted sets, streams), but the key `but`."""
    dump = []
    for key in client.scan_iter(count=1000):
        if key == but.encode():
            continue
        kind = client.type(key)
        if kind == b"hash":
            value: Any = client.hgetall(key)
        elif kind == b"string":
            value = client.get(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1)
        elif kind == b"stream":
            value = client.xrange(key)
        elif kind == b"set":
            value = client.smembers(key)
        else:
            value = client.lrange(key, 0, -1)
        dump.append(f"{key!r}={value!r}")
    return "\n".join(dump)


async def _set_webhook(harness: Harness, account: str, url: str) -> dict[str, Any]:
    async with harness.client.put(f"/admin/accounts/{account}/webhook", headers=ADMIN,
                                  json={"url": url, "secret": SECRET}) as resp:
        assert resp.status == 200
        return dict(await resp.json())


async def _spend(harness: Harness, key: str) -> None:
    """Spend the plan's 0.001-credit allowance: its thresholds fire, and their alerts are queued."""
    for _ in range(12):
        async with harness.client.post("/v1/chat/completions", json=BIG,
                                       headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status in (200, 402), await resp.text()


async def test_webhook_url_path_and_secret_appear_only_where_the_operator_reads_the_webhook(
        harness: Harness, receiver: tuple[Receiver, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hook, url = receiver
    account, key = await harness.account()
    answer = await _set_webhook(harness, account, url)
    await _spend(harness, key)  # crosses the allowance's thresholds: alerts, queued for the webhook
    await _until(lambda: len(hook.attempts) >= 2, "two failed deliveries")
    # while deliveries wait for their retry, their records are in Redis: no URL, no secret there
    record = KeySchema().for_account(account).account
    assert harness.redis.hget(record, "webhook_url") == url.encode()  # where it is kept: the account record
    stored = _everything_in_redis(harness.redis, but=record)
    assert "secretpath" not in stored and SECRET not in stored and "T0SECRET" not in stored
    assert all(valid for _, valid in hook.attempts)  # signed with the secret looked up at delivery time
    hook.accept = True
    await _until(lambda: not _queued(harness), "the deliveries to succeed")
    # the ledger names the webhook by host and fingerprint
    [event] = [e for e in harness.ledger(account) if e["type"] == "webhook_set"]
    assert event["webhook"].startswith("127.0.0.1 sha256:") and "secretpath" not in json.dumps(event)
    assert answer == {"account_id": account, "webhook": event["webhook"]}
    # admin answers other than reading the webhook itself carry neither
    seen = []
    for path in (f"/admin/accounts/{account}", f"/admin/accounts/{account}/alerts", f"/admin/accounts/{account}/usage",
                 "/admin/accounts", "/admin/stats"):
        async with harness.client.get(path, headers=ADMIN) as resp:
            assert resp.status == 200
            seen.append(await resp.text())
    async with harness.client.get("/gateway/alerts", headers={"Authorization": f"Bearer {key}"}) as resp:
        seen.append(await resp.text())
    assert all("secretpath" not in text and SECRET not in text for text in seen)
    async with harness.client.get(f"/admin/accounts/{account}/webhook", headers=ADMIN) as resp:
        config = await resp.json()
    assert config["url"] == url and config["secret_set"] is True and SECRET not in json.dumps(config)
    assert "secretpath" not in caplog.text and SECRET not in caplog.text


async def test_a_delivery_finished_elsewhere_meanwhile_is_not_brought_back(
        harness: Harness, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    account, key = await harness.account()
    await _set_webhook(harness, account, url)

    def finished_by_another_process(delivery: str) -> None:
        # what a process that took the delivery over (its lease ran out here) does when it succeeds
        harness.redis.zrem(KeySchema().webhooks(bucket_of(delivery)), delivery)
        for record in harness.redis.scan_iter(match=f"gw:*{delivery}*"):
            harness.redis.delete(record)

    hook.on_attempt = finished_by_another_process
    await _spend(harness, key)
    await harness.gw.quiesce()
    alerts = harness.redis.hlen(KeySchema().for_account(account).alerts)
    assert alerts >= 3
    await _until(lambda: len({delivery for delivery, _ in hook.attempts}) == alerts, "one attempt per alert")
    attempted = {delivery for delivery, _ in hook.attempts}
    # this process's attempt failed (500) after the record was gone: nothing comes back
    await _until(lambda: not _queued(harness) and not any(
        list(harness.redis.scan_iter(match=f"gw:*{d}*")) for d in attempted), "the queue to empty")
    await asyncio.sleep(0.1)  # several deliverer ticks: still nothing re-queued, no new attempts
    assert not _queued(harness)
    assert {delivery for delivery, _ in hook.attempts} == attempted


async def test_unreadable_delivery_records_are_dropped_with_one_log_line(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    # what the old race left behind (a hash with only its attempt count), and a record that is no JSON
    harness.redis.hset("gw:webhook:dlv_leftover00000", mapping={"attempts": 1})
    harness.redis.set("gw:delivery:dlv_garbage000000", "not json")
    harness.redis.zadd("gw:webhooks", {"dlv_leftover00000": 0, "dlv_garbage000000": 0})
    await _until(lambda: not harness.redis.zcard("gw:webhooks"), "the records to be dropped")
    assert not harness.redis.exists("gw:webhook:dlv_leftover00000", "gw:delivery:dlv_garbage000000")
    for delivery in ("dlv_leftover00000", "dlv_garbage000000"):
        lines = [r for r in caplog.records if delivery in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING and lines[0].exc_info is None, lines
    assert "Traceback" not in caplog.text and "KeyError" not in caplog.text
