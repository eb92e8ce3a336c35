"""Alerts: a low-credit warning and 80/90/100 % thresholds of the allowance and of each per-cycle cap.

Each alert fires once per billing cycle (HSETNX on `gw:{acct}:alerts`, so concurrent settlements
cannot fire it twice), is listed at `GET /gateway/alerts`, can be marked read, and is POSTed to the
account's or the plan's webhook by a background deliverer: signed with HMAC-SHA256, retried with
exponential backoff, at least once, with an `id` receivers deduplicate on. Nothing here runs on a
request's path: detection runs in the settlement task, delivery in its own task.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from gateway.config import Plan
from gateway.errors import InsufficientCredits
from gateway.jobs import ask_buckets, due_buckets, run_leased
from gateway.keys import bucket_of
from gateway.metering import LimitReached, Settlement
from gateway.migrate import copy_legacy_webhooks
from gateway.money import format_credits
from gateway.state import GATEWAY, Gateway, in_background, stopping

log = logging.getLogger("gateway.alerts")
MAX_ATTEMPTS = 10


def due(plan: Plan, s: Settlement) -> list[tuple[str, str]]:
    """(alert field, message) for every threshold this settlement crossed (allowance used, and the
    balance falling under the low-credit share: the settlement that took the counter over it, so
    settlements racing to record it agree on which one fired it) or has reached (per-cycle caps)."""
    policy = plan.alerts
    found: list[tuple[str, str]] = []
    allowance = plan.monthly_credits
    used_before, balance_before = s.cycle_used - s.charged, s.balance + s.charged
    if allowance > 0:
        for threshold in policy.thresholds:
            if used_before * 100 < threshold * allowance <= s.cycle_used * 100:
                found.append((f"{s.cycle_start_ms}:allowance:{threshold}",
                              f"{threshold}% of this cycle's {format_credits(allowance)}-credit allowance is used."))
        low = allowance * policy.low_credit_share
        if s.balance < low <= balance_before:
            found.append((f"{s.cycle_start_ms}:low_credit", f"Low credits: {format_credits(max(s.balance, 0))} "
                          f"remaining, under {policy.low_credit_share:.0%} of the allowance."))
    for limit_id, value, cap in s.cycle_limits:
        for threshold in policy.thresholds:
            if cap > 0 and value * 100 >= threshold * cap:
                found.append((f"{s.cycle_start_ms}:{limit_id}:{threshold}",
                              f"{threshold}% of the plan's {limit_id} limit is used this cycle."))
    return found


def due_on_refusal(plan: Plan, cycle_start_ms: int, *, refused: InsufficientCredits | None = None,
                   min_cost: int = 0, reached: LimitReached | None = None) -> list[tuple[str, str]]:
    """The 100 % alert of a refusal. Charges are lowered to fit, so an allowance or a cap is seldom used
    to the last unit: what is left can be too little for any request. A request the balance could not
    pay even with nothing in flight, or that a per-cycle cap refused, counts as 100 % used when what is
    left is under the low-credit share (not one oversized prompt on a full balance)."""
    policy = plan.alerts
    if 100 not in policy.thresholds:
        return []
    if refused is not None:
        allowance = plan.monthly_credits
        if refused.available_micro is None or allowance <= 0:
            return []
        balance = refused.available_micro + refused.held_micro  # without what requests in flight hold
        if balance >= min_cost or balance >= allowance * policy.low_credit_share:
            return []  # refused for what is in flight, or for one oversized prompt
        return [(f"{cycle_start_ms}:allowance:100",
                 f"This cycle's {format_credits(allowance)}-credit allowance is used up: "
                 f"{format_credits(max(balance, 0))} remaining could not pay for a request.")]
    if reached is None or reached.cap <= 0:
        return []
    cycle_cap = any(lim.id == reached.limit_id and lim.window_ms == 0 for lim in plan.limits)
    if not cycle_cap or reached.cap - reached.used >= reached.cap * policy.low_credit_share:
        return []
    return [(f"{cycle_start_ms}:{reached.limit_id}:100",
             f"100% of the plan's {reached.limit_id} limit is used this cycle.")]


def notify(gw: Gateway, account_id: str, plan: Plan, found: list[tuple[str, str]], request_id: str) -> None:
    """Record the alerts in `found` (from `due`) that this process has not seen fired, in a background
    task: once a threshold is passed every later settlement finds it again, and the cache check here
    keeps those requests from spawning work."""
    fresh = [(f, m) for f, m in found if (account_id, f) not in gw.fired_alerts]
    if fresh:
        gw.track(asyncio.ensure_future(fire(gw, account_id, plan, fresh, request_id)))


async def fire(gw: Gateway, account_id: str, plan: Plan, found: list[tuple[str, str]],
               request_id: str) -> list[dict[str, Any]]:
    """Record the alerts in `found` not yet fired this cycle; queue their webhooks. Never raises: a
    failure here (Redis away) must not touch the request (the alert is then lost, and logged)."""
    try:
        return await _fire(gw, account_id, plan, found, request_id)
    except Exception:
        log.warning("alerts for %s not recorded (Redis unavailable?)", account_id)
        return []


async def _fire(gw: Gateway, account_id: str, plan: Plan, found: list[tuple[str, str]],
                request_id: str) -> list[dict[str, Any]]:
    # `notify` skipped what this process saw fired; HSETNX decides across processes
    keys = gw.schema.for_account(account_id)
    now = int(time.time() * 1000)
    alerts = [{"id": f"{account_id}:{field}", "account_id": account_id, "kind": field.split(":")[1],
               "threshold": field.rsplit(":", 1)[-1] if field.count(":") >= 2 else None, "message": message,
               "request_id": request_id, "created_ms": now, "read": False} for field, message in found]
    pipe = gw.redis.pipeline(transaction=False)
    for (field, _), alert in zip(found, alerts, strict=True):
        pipe.hsetnx(keys.alerts, field, json.dumps(alert))
    created = await pipe.execute()
    new = [a for a, ok in zip(alerts, created, strict=True) if ok]
    if len(gw.fired_alerts) > 1_000_000:
        gw.fired_alerts.clear()  # only a cache: HSETNX is what makes an alert fire once
    for field, _ in found:
        gw.fired_alerts.add((account_id, field))
    if new and (await _webhook_of(gw, account_id, plan))[0]:
        await enqueue(gw, account_id, new)
    return new


def webhook_label(url: str) -> str:
    """How the ledger, logs and admin answers name a webhook: its host and a fingerprint of the whole
    URL, never its path or query (a Slack-style URL is itself a secret)."""
    try:
        host = urlsplit(url).hostname or "unknown-host"
    except ValueError:
        host = "unknown-host"
    return f"{host} sha256:{hashlib.sha256(url.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


async def _webhook_of(gw: Gateway, account_id: str, plan: Plan | None = None) -> tuple[str, str]:
    """The account's webhook URL and secret as configured now: its own, else its plan's."""
    url, secret, plan_name = await gw.redis.hmget(gw.schema.for_account(account_id).account,
                                                  ["webhook_url", "webhook_secret", "plan"])
    if url:
        return url, secret or ""
    plan = gw.config.plans.get(plan_name or "") or plan
    if plan is None or not plan.alerts.webhook_url:
        return "", ""
    return plan.alerts.webhook_url, plan.alerts.webhook_secret.reveal()


def _record_key(gw: Gateway, delivery: str) -> str:
    return gw.schema.delivery(delivery)


def _queue(gw: Gateway, delivery: str) -> str:
    """The queue bucket of a delivery (by its id: every step finds it from the id alone)."""
    return gw.schema.webhooks(bucket_of(delivery))


async def enqueue(gw: Gateway, account_id: str, alerts: list[dict[str, Any]]) -> None:
    """Queue one delivery per alert. A record holds the account and the body, never the URL or the
    secret: they are looked up when it is sent, so a changed webhook applies to pending deliveries."""
    pipe = gw.redis.pipeline(transaction=False)
    for alert in alerts:
        delivery = "dlv_" + secrets.token_hex(8)
        body = json.dumps({"type": "gateway.alert", **alert}, separators=(",", ":"))
        pipe.set(_record_key(gw, delivery), json.dumps({"account_id": account_id, "body": body, "attempts": 0}))
        pipe.zadd(_queue(gw, delivery), {delivery: int(time.time() * 1000)})
    await pipe.execute()


def signature(secret: str, timestamp: int, body: str) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, as receivers verify it."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def _parse_record(raw: str) -> tuple[str, str, int] | None:
    """(account id, body, attempts so far) of a stored delivery, or None when it is not one."""
    try:
        rec = json.loads(raw)
        account_id, body, attempts = rec["account_id"], rec["body"], rec.get("attempts", 0)
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(account_id, str) or not isinstance(body, str) or not isinstance(attempts, int):
        return None
    return account_id, body, attempts


async def _legacy_record(gw: Gateway, delivery: str) -> str | None:
    """A delivery queued by an older version (a hash holding the URL and the secret): rewritten as a
    record of the new kind, and the hash deleted, so no secret stays in the queue."""
    old_key = f"{gw.schema.prefix}webhook:{delivery}"
    rec = await gw.redis.hgetall(old_key)
    if not rec:
        return None
    try:
        account_id = json.loads(rec.get("body", ""))["account_id"]
    except (ValueError, TypeError, KeyError):
        account_id = None
    raw = json.dumps({"account_id": account_id, "body": rec.get("body"), "attempts": int(rec.get("attempts") or 0)}
                     ) if isinstance(account_id, str) else "{}"
    pipe = gw.redis.pipeline(transaction=False)
    pipe.set(_record_key(gw, delivery), raw, nx=True)
    pipe.delete(old_key)
    await pipe.execute()
    return raw


async def _deliver(gw: Gateway, delivery: str) -> None:
    """Send one queued delivery. Every update is conditional on the record still existing (SET XX,
    ZADD XX): a delivery another process has finished, or that was removed meanwhile, is never
    brought back; a record that cannot be read is dropped with one log line."""
    record_key = _record_key(gw, delivery)
    queue = _queue(gw, delivery)
    raw = await gw.redis.get(record_key) or await _legacy_record(gw, delivery)
    if raw is None:
        await _forget(gw, delivery)
        return
    parsed = _parse_record(raw)
    if parsed is None:
        log.warning("webhook delivery %s dropped: its record is malformed", delivery)
        await _forget(gw, delivery)
        return
    account_id, body, attempts = parsed
    url, secret = await _webhook_of(gw, account_id)
    if not url:
        log.warning("webhook delivery %s for %s dropped: the account has no webhook any more", delivery, account_id)
        await _forget(gw, delivery)
        return
    timestamp = int(time.time())
    headers = {"Content-Type": "application/json", "X-Gateway-Delivery": delivery,
               "X-Gateway-Signature": signature(secret, timestamp, body)}
    ok = False
    assert gw.session is not None
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with gw.session.post(url, data=body, headers=headers, allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=10)) as resp:
            ok = 200 <= resp.status < 300
    if ok:
        gw.metrics.webhook_deliveries.labels("delivered").inc()
        await _forget(gw, delivery)
        return
    attempts += 1
    if attempts >= MAX_ATTEMPTS:
        gw.metrics.webhook_deliveries.labels("gave_up").inc()
        log.error("webhook delivery %s to %s dropped after %d attempts", delivery, webhook_label(url), attempts)
        await _forget(gw, delivery)
        return
    gw.metrics.webhook_deliveries.labels("failed").inc()
    backoff = min(gw.settings.webhook_backoff_seconds * 2 ** (attempts - 1), 3600)
    if await gw.redis.set(record_key, json.dumps({"account_id": account_id, "body": body, "attempts": attempts}),
                          xx=True):
        await gw.redis.zadd(queue, {delivery: int((time.time() + backoff) * 1000)}, xx=True)


async def _forget(gw: Gateway, delivery: str) -> None:
    pipe = gw.redis.pipeline(transaction=False)
    pipe.zrem(_queue(gw, delivery), delivery)
    pipe.zrem(gw.schema.legacy_webhooks, delivery)  # queued by an older version (see copy_legacy_webhooks)
    pipe.delete(_record_key(gw, delivery))
    await pipe.execute()


async def _deliver_quietly(gw: Gateway, delivery: str) -> None:
    try:
        await _deliver(gw, delivery)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # Redis away or a bug: the lease brings it back in 60 s, and it is logged
        log.warning("webhook delivery %s failed: %s; will retry", delivery, type(exc).__name__)


async def _claim(gw: Gateway, bucket: int, now: int, running: set[asyncio.Task[None]]) -> int:
    """Start the due deliveries of one bucket (at most 20), each claimed for 60 s: another process
    takes a delivery over only if this one dies mid-delivery."""
    queue = gw.schema.webhooks(bucket)
    started = 0
    for delivery in await gw.redis.zrangebyscore(queue, "-inf", now, start=0, num=20):
        await gw.redis.zadd(queue, {delivery: now + 60_000}, xx=True)
        task = asyncio.create_task(_deliver_quietly(gw, delivery))
        running.add(task)
        task.add_done_callback(running.discard)
        started += 1
    return started


async def poll_once(gw: Gateway, running: set[asyncio.Task[None]]) -> int:
    """One look at the queue: the buckets with due deliveries (every bucket asked at once), each claimed
    under its lease; deliveries an older version queued are copied into the buckets first."""
    await copy_legacy_webhooks(gw.redis, gw.schema)
    now = int(time.time() * 1000)
    buckets = await due_buckets(gw.redis, gw.schema.webhooks, now)
    return await run_leased(gw.redis, gw.schema, "webhooks", buckets,
                            lambda bucket: _claim(gw, bucket, now, running))


QUEUE_DEPTH_SECONDS = 10.0  # how often the deliverer counts the queue (a ZCARD per bucket)


async def report_queue_depth(gw: Gateway) -> int:
    """Set gateway_webhook_queue_depth to the deliveries queued in every bucket (due or waiting for a
    retry); a bucket that does not answer leaves the gauge as it was."""
    depths = await ask_buckets(gw.redis, lambda bucket: ("ZCARD", gw.schema.webhooks(bucket)))
    total = 0
    for depth in depths:
        if isinstance(depth, BaseException):
            return -1
        total += int(depth)
    gw.metrics.webhook_queue.set(total)
    return total


async def _deliver_forever(gw: Gateway) -> None:
    running: set[asyncio.Task[None]] = set()
    counted = 0.0
    try:
        while not stopping():
            await asyncio.sleep(gw.settings.webhook_poll_seconds)
            try:
                if time.monotonic() - counted >= QUEUE_DEPTH_SECONDS:
                    counted = time.monotonic()
                    await report_queue_depth(gw)
                await poll_once(gw, running)
            except Exception:  # Redis away: try again on the next tick
                if stopping():
                    raise
                log.warning("webhook deliverer: Redis unavailable, will retry")
    finally:
        for task in running:  # claimed: another process (or the next start) delivers them
            task.cancel()


async def webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    async with in_background(_deliver_forever(app[GATEWAY])):
        yield


async def list_alerts(gw: Gateway, account_id: str) -> list[dict[str, Any]]:
    raw = await gw.redis.hgetall(gw.schema.for_account(account_id).alerts)
    alerts = [json.loads(v) for v in raw.values()]
    return sorted(alerts, key=lambda a: (a["created_ms"], a["id"]))


async def mark_read(gw: Gateway, account_id: str, alert_id: str) -> bool:
    keys = gw.schema.for_account(account_id)
    field = alert_id.removeprefix(f"{account_id}:")
    raw = await gw.redis.hget(keys.alerts, field)
    if raw is None:
        return False
    alert = json.loads(raw)
    alert["read"] = True
    await gw.redis.hset(keys.alerts, field, json.dumps(alert))
    return True
