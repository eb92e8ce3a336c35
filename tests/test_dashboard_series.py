"""The daily usage series (`/gateway/usage/daily`, `/admin/accounts/{id}/usage/daily`) and the recent
events list: days in the plan's timezone, figures that add up to the cycle's charge, bounded reads."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import ADMIN, Harness
from test_dashboard import chat, later

from gateway.usage_series import daily_series

DAY = 86_400_000
ZONE = "Pacific/Auckland"  # far from UTC: a day boundary that UTC would put elsewhere
PLANS = f"""
default_plan: free
plans:
  free:
    monthly_credits: 5
    credit_usd: 0.5
    timezone: {ZONE}
    models: ["demo-*"]
"""


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


async def _get(harness: Harness, path: str, headers: dict[str, str], status: int = 200) -> Any:
    async with harness.client.get(path, headers=headers) as resp:
        assert resp.status == status, await resp.text()
        return await resp.json()


async def test_daily_series_sums_to_the_cycle_charge_day_by_day(harness: Harness) -> None:
    account, key = await harness.account(credits=10)
    _other, other_key = await harness.account(credits=10)
    await chat(harness, other_key, "demo-mini", 50)  # another account's usage never shows
    plan_of_day = [("demo-mini", 40), ("demo-large", 30), ("demo-mini", 120)]
    for day, (model, out) in enumerate(plan_of_day):
        if day:
            await later(harness, DAY)
        for _ in range(day + 1):
            await chat(harness, key, model, out)
    await chat(harness, key, "demo-large", 10)  # two models on the last day
    await harness.gw.quiesce()

    me = {"Authorization": f"Bearer {key}"}
    series = await _get(harness, "/gateway/usage/daily?days=7", me)
    assert series == await _get(harness, f"/admin/accounts/{account}/usage/daily?days=7", ADMIN)
    rows = series["data"]
    state = harness.state(account)
    ledger = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert sum(r["credits_micro"] for r in rows) == state["cycle_used"] == sum(int(e["cost"]) for e in ledger) > 0
    assert sum(r["requests"] for r in rows) == 1 + 2 + 3 + 1 == len(ledger)
    assert sum(r["usd_micro"] for r in rows) == sum(int(e["usd_micro"]) for e in ledger) > 0
    assert sum(r["output_tokens"] for r in rows) == sum(int(e["out"]) for e in ledger)
    for r in rows:  # decimal strings, exact, beside their micro twins
        assert isinstance(r["credits"], str) and "e" not in r["credits"]
        assert Decimal(r["credits"]) * 1_000_000 == r["credits_micro"]
        assert Decimal(r["usd"]) * 1_000_000 == r["usd_micro"]
    # each event on its own local day, in the plan's timezone
    zone = ZoneInfo(ZONE)
    expected: dict[tuple[str, str], int] = {}
    for e in ledger:
        day = datetime.fromtimestamp(int(e["ts"]) / 1000, UTC).astimezone(zone).date().isoformat()
        expected[(day, e["model"])] = expected.get((day, e["model"]), 0) + int(e["cost"])
    assert {(r["date"], r["model"]): r["credits_micro"] for r in rows} == expected
    days = sorted({r["date"] for r in rows})
    assert len(days) == 3 and series["to"] == days[-1] and series["timezone"] == ZONE
    assert [r["model"] for r in rows if r["date"] == days[-1]] == ["demo-large", "demo-mini"]
    assert series["truncated"] is False and series["from"] <= days[0]
    # by key: the one key carries everything
    assert [(k["key_id"], k["credits_micro"]) for k in series["by_key"]] == [
        (ledger[0]["key_id"], state["cycle_used"])]
    # a shorter window keeps only the last day
    today = await _get(harness, "/gateway/usage/daily?days=1", me)
    assert {r["date"] for r in today["data"]} == {days[-1]} and today["from"] == today["to"] == days[-1]


async def test_a_series_past_its_read_budget_drops_the_partial_day_and_says_so(harness: Harness) -> None:
    account, key = await harness.account(credits=10)
    for day in range(3):
        if day:
            await later(harness, DAY)
        for _ in range(3):
            await chat(harness, key, "demo-mini", 20)
    await harness.gw.quiesce()
    full = await daily_series(harness.gw, account, ZONE, 7)
    cut = await daily_series(harness.gw, account, ZONE, 7, scan_max=4)  # the last day's 3 + one of the day before
    assert full["truncated"] is False and cut["truncated"] is True
    last = full["data"][-1]["date"]
    assert cut["complete_from"] == last and [r["date"] for r in cut["data"]] == [last]
    assert cut["data"] == [r for r in full["data"] if r["date"] == last]


async def test_daily_series_refuses_bad_windows_and_strangers(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    me = {"Authorization": f"Bearer {key}"}
    for days in ("0", "91", "abc", "-1", "1e2", "\u00b2", "%C2%B2", "9" * 40):
        body = await _get(harness, f"/gateway/usage/daily?days={days}", me, status=400)
        assert "days" in body["error"]["message"]
        await _get(harness, f"/admin/accounts/{account}/usage/daily?days={days}", ADMIN, status=400)
    assert len((await _get(harness, "/gateway/usage/daily?days=90", me))["data"]) == 0
    await _get(harness, "/gateway/usage/daily", {"Authorization": "Bearer gwk_nope"}, status=401)
    await _get(harness, f"/admin/accounts/{account}/usage/daily", me, status=401)  # a client key is no admin key
    await _get(harness, "/admin/accounts/acct_nope/usage/daily", ADMIN, status=404)


async def test_recent_events_lists_every_kind_newest_first(harness: Harness) -> None:
    account, key = await harness.account(credits="2.5")
    await chat(harness, key, "demo-mini", 30)
    await harness.gw.quiesce()
    events = (await _get(harness, f"/admin/accounts/{account}/events?limit=10", ADMIN))["data"]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "usage" and "grant" in kinds and "key_created" in kinds
    grant = next(e for e in events if e["type"] == "grant")
    assert grant["credits"] == "2.5" and grant["credits_micro"] == 2_500_000
    usage = events[0]
    assert usage["model"] == "demo-mini" and usage["credits_micro"] == harness.state(account)["charged"] > 0
    assert [e["time"] for e in events] == sorted((e["time"] for e in events), reverse=True)
    assert key not in str(events)
    assert len((await _get(harness, f"/admin/accounts/{account}/events?limit=1", ADMIN))["data"]) == 1
    for limit in ("500", "0", "\u00b2", "x"):
        await _get(harness, f"/admin/accounts/{account}/events?limit={limit}", ADMIN, status=400)
