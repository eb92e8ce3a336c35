"""Subscriptions (issue 10, item 13): renewal moves only the end date, and plan changes that apply at
once never credit more allowance in a cycle than the largest plan held in it."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Harness, no_limits

from gateway.keys import KeySchema
from gateway.metering import quote
from gateway.store import add_month

DAY = 86_400_000
PLANS = """
default_plan: free
plans:
  free: {monthly_credits: 1, models: ["demo-*"]}
  pro: {monthly_credits: 20, models: ["demo-*"]}
  team: {monthly_credits: 50, models: ["demo-*"]}
"""
BODY = {"model": "demo-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi [[emu out=10]]"}]}


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


async def _change(harness: Harness, account: str, plan: str, **extra: Any) -> dict[str, Any]:
    status, view = await harness.admin("PUT", f"/admin/accounts/{account}/plan", {"plan": plan, **extra})
    assert status == 200, view
    return view


async def _chat(harness: Harness, key: str) -> int:
    async with harness.client.post("/v1/chat/completions", json=BODY,
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status


def _record(harness: Harness, account: str) -> dict[str, str]:
    raw = harness.redis.hgetall(KeySchema().for_account(account).account)
    return {k.decode(): v.decode() for k, v in raw.items()}


def _months_ahead(months: int) -> datetime:
    """Midnight UTC on the first of a month `months` from now: in the future whenever the suite runs."""
    now = datetime.now(UTC)
    year, month = divmod(now.year * 12 + now.month - 1 + months, 12)
    return datetime(year, month + 1, 1, tzinfo=UTC)


def _shift(harness: Harness, ms: int) -> None:
    assert harness.gw.meter is not None and harness.gw.store is not None
    harness.gw.meter.clock_offset_ms += ms
    harness.gw.store.clock_offset_ms += ms


# ---------------------------------------------------------------- renewal


async def test_renewal_moves_only_the_end_and_keeps_a_pending_downgrade(harness: Harness) -> None:
    account, key = await harness.account(plan="free")
    ends = _months_ahead(2)
    await _change(harness, account, "pro", expires_at=ends.isoformat())
    assert await _chat(harness, key) == 200
    view = await _change(harness, account, "free")  # a downgrade: waits for the next cycle
    assert view["next_plan"] == "free"
    before = harness.state(account)
    status, renewed = await harness.admin("POST", f"/admin/accounts/{account}/renew", {"months": 2})
    assert status == 200, renewed
    assert (renewed["plan"], renewed["next_plan"]) == ("pro", "free")  # the downgrade is still pending
    assert renewed["plan_expires_at"] == add_month(add_month(ends)).isoformat().replace("+00:00", "Z")
    assert harness.state(account) == before  # no credit, no balance moved
    event = harness.ledger(account)[-1]
    assert event["type"] == "subscription_renewed" and event["months"] == "2"
    assert int(event["from_ms"]) == int(ends.timestamp() * 1000)
    _shift(harness, 40 * DAY)  # the next cycle: the downgrade applies, the subscription runs on
    assert await _chat(harness, key) == 200
    rec = _record(harness, account)
    assert rec["plan"] == "free" and "next_plan" not in rec
    await harness.assert_conserved(account)


async def test_renewing_a_subscription_without_an_end_or_past_it_is_a_clear_400(harness: Harness) -> None:
    account, key = await harness.account(plan="free")
    await _change(harness, account, "pro")
    before = _record(harness, account)
    status, error = await harness.admin("POST", f"/admin/accounts/{account}/renew", {"months": 1})
    assert status == 400 and "no end date to extend" in error["error"]["message"]
    assert _record(harness, account) == before  # no end was invented
    ends = _months_ahead(1)
    await _change(harness, account, "pro", expires_at=ends.isoformat())
    _shift(harness, int((ends - datetime.now(UTC)).total_seconds() * 1000) + DAY)
    before = _record(harness, account)
    status, error = await harness.admin("POST", f"/admin/accounts/{account}/renew", {"months": 1})
    assert status == 400 and "ended at" in error["error"]["message"]  # a new subscription, not a renewal
    assert _record(harness, account) == before
    for bad in ({"months": 0}, {"months": "1"}, {"months": 1.5}):
        status, error = await harness.admin("POST", f"/admin/accounts/{account}/renew", bad)
        assert status == 400 and error["error"]["param"] == "months"
    status, _ = await harness.admin("POST", "/admin/accounts/acct_nope/renew", {"months": 1})
    assert status == 404
    assert await _chat(harness, key) == 200  # the lapse applies at the next request
    assert _record(harness, account)["plan"] == "free"
    await harness.assert_conserved(account)


async def test_the_cli_renews_and_refuses_a_subscription_without_an_end(harness: Harness, config_dir: Path,
                                                                         redis_url: str) -> None:
    account, _ = await harness.account(plan="free")
    ends = _months_ahead(2)
    await _change(harness, account, "pro", expires_at=ends.isoformat())
    other, _ = await harness.account(plan="pro")

    async def cli(account_id: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "plans", "renew", "--account", account_id, "--months", "1",
            "--config-dir", str(config_dir), "--redis-url", redis_url, "--json",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = await cli(account)
    assert code == 0, err
    assert json.loads(out)["plan_expires_ms"] == int(add_month(ends).timestamp() * 1000)
    code, out, err = await cli(other)
    assert code == 1 and "no end date to extend" in err and out == ""


# ---------------------------------------------------------------- plan changes at once


async def test_toggling_plans_at_once_never_farms_allowance(harness: Harness) -> None:
    account, _ = await harness.account(plan="free")  # 1 credit a cycle
    for _ in range(3):
        await _change(harness, account, "pro", effective="now")
        await harness.assert_conserved(account)
        await _change(harness, account, "free", effective="now")
        await harness.assert_conserved(account)
    state = harness.state(account)
    assert state["allow"] <= 1_000_000  # was 58 credits on a 1-credit plan
    # never more allowance credited in the cycle than the largest plan held in it
    assert state["granted"] - state["expired"] <= 20_000_000
    assert _record(harness, account)["cycle_allowance"] == "20000000"


async def test_an_upgrade_credits_only_what_exceeds_the_largest_allowance_of_the_cycle(harness: Harness) -> None:
    account, key = await harness.account(plan="free")
    view = await _change(harness, account, "pro")  # an upgrade applies at once by default
    assert view["change"]["credited"] == "19"
    assert await _chat(harness, key) == 200
    used = harness.state(account)["cycle_used"]
    assert used > 0
    view = await _change(harness, account, "team")
    assert view["change"]["credited"] == "30" and harness.state(account)["allow"] == 50_000_000 - used
    view = await _change(harness, account, "pro", effective="now")  # what pro leaves after this cycle's use
    assert view["change"]["allowance_removed"] == "30"
    assert harness.state(account)["allow"] == 20_000_000 - used
    view = await _change(harness, account, "team")  # team was credited this cycle already
    assert view["change"]["credited"] == "0" and harness.state(account)["allow"] == 20_000_000 - used
    await harness.assert_conserved(account)
    _shift(harness, 32 * DAY)  # a new cycle: the plan's whole allowance again
    assert await _chat(harness, key) == 200
    state = await harness.assert_conserved(account)
    assert state["allow"] == 50_000_000 - state["cycle_used"]


async def test_a_downgrade_at_once_never_takes_allowance_a_request_in_flight_holds(harness: Harness) -> None:
    account, _ = await harness.account(plan="pro")
    gw = harness.gw
    assert gw.meter is not None
    keys = gw.schema.for_account(account)
    key_id = next(k.decode() for k in harness.redis.smembers(keys.key_ids))
    q = quote(gw.config.rates("pro", gw.config.route("demo-large")), 100_000, 100_000)  # type: ignore[arg-type]
    held = (await gw.meter.reserve(keys, key_id, "req_inflight", "pro", q, no_limits(q))).hold
    assert 1_000_000 < held < 20_000_000  # more than free's allowance
    await _change(harness, account, "free", effective="now")
    state = harness.state(account)
    assert state["allow"] >= held and state["allow"] + state["extra"] - state["held"] >= 0
    assert state["granted"] == state["allow"] + state["extra"] + state["charged"] + state["expired"]
    await gw.meter.release(keys, "req_inflight", "test")
    await harness.assert_conserved(account)


async def test_the_largest_allowance_is_counted_per_cycle(harness: Harness) -> None:
    account, key = await harness.account(plan="team")
    await _change(harness, account, "free")  # a downgrade: at the next cycle
    _shift(harness, 32 * DAY)
    assert await _chat(harness, key) == 200  # the new cycle starts on free
    assert _record(harness, account)["plan"] == "free"
    view = await _change(harness, account, "pro")  # team's allowance was last cycle's: pro's difference is due
    assert view["change"]["credited"] == "19"
    await _change(harness, account, "free", effective="now")
    view = await _change(harness, account, "pro")
    assert view["change"]["credited"] == "0"
    await harness.assert_conserved(account)
