"""Findings of the money-path review (per-key budgets, adjustments, lifecycle, statements, signals):
each test reproduces one confirmed defect against a real Redis and states the correct behaviour."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ADMIN, Harness

from gateway.money import MAX_SAFE

PLANS = """
default_plan: free
plans:
  free: {monthly_credits: 0, credit_usd: 0.001, models: ["demo-*"]}
  monthly: {monthly_credits: 50, credit_usd: 0.001, models: ["demo-*"]}
"""


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


async def _chat(harness: Harness, key: str, max_tokens: int = 20, out: int = 20) -> tuple[int, Any]:
    body = {"model": "demo-mini", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"hi [[emu out={out}]]"}]}
    async with harness.client.post("/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json()


async def test_a_budget_lowered_on_a_rotated_key_also_binds_the_old_key_in_its_grace_period(
        harness: Harness) -> None:
    """Both keys of a rotation spend from one budget (the same counters, `budget_id`), so the cap an
    operator sets on the replacement must bind the old key too while it still authenticates. Today
    each key keeps its own copy of the cap: lowering it on the new key leaves the old one spending."""
    account, _ = await harness.account(credits=100)
    status, key = await harness.admin("POST", f"/admin/accounts/{account}/keys",
                                      {"label": "budgeted", "budget_credits_per_cycle": "10"})
    assert status == 201, key
    status, rotated = await harness.admin("POST", f"/admin/keys/{key['id']}/rotate", {"grace_seconds": 3600})
    assert status == 201, rotated
    status, view = await harness.admin("PATCH", f"/admin/keys/{rotated['id']}",
                                       {"budget_credits_per_cycle": "0.000001"})
    assert status == 200 and view["budget_credits_per_cycle_micro"] == 1, view
    assert (await _chat(harness, rotated["key"]))[0] == 402  # the new key is held to the new cap
    status, body = await _chat(harness, key["key"])  # the old key, in its grace period
    await harness.gw.quiesce()
    assert status == 402, ("the old key of a rotation spent past the budget its replacement now has", body)


async def test_a_refund_that_would_take_the_balance_past_2_53_micro_is_refused_not_rounded(
        harness: Harness) -> None:
    """Money values in Lua are doubles (DESIGN: keep every value below 2^53). Each amount is checked
    against 2^53 on its own, but not the balance it leads to: adjust-3.lua adds the refund in Lua and
    writes back a rounded `extra`, so granted != balance + charged + expired afterwards. A refund (or
    grant) that would take a balance or counter past 2^53 - 1 must be refused (4xx), leaving it exact."""
    account, _ = await harness.account(credits=0)
    status, body = await harness.admin("POST", f"/admin/accounts/{account}/credits",
                                       {"credits": "9007199254.740991"})  # 2^53 - 1 micro: allowed alone
    assert status == 200, body
    async with harness.client.post(f"/admin/accounts/{account}/adjustments",
                                   json={"credits": "0.000002", "reason": "refund"},
                                   headers={**ADMIN, "Idempotency-Key": "overflow-1"}) as resp:
        status, body = resp.status, await resp.json()
    s = harness.state(account)
    exact = s["allow"] + s["extra"] + s["charged"] + s.get("expired", 0) == s["granted"]
    assert status >= 400 or exact, (status, body, s)  # refused, or (at least) not rounded
    assert exact and s["extra"] <= MAX_SAFE, s


async def test_a_grant_that_would_take_the_balance_past_2_53_micro_is_refused_and_a_reserve_stays_exact(
        harness: Harness) -> None:
    """grant-3.lua adds with HINCRBY (exact in Redis), but every later script reads the balance as a
    double: past 2^53 a settle writes back a rounded `extra`. The grant must be refused (409) instead."""
    account, key = await harness.account(credits="9007199254.740991")  # 2^53 - 1 micro
    status, body = await harness.admin("POST", f"/admin/accounts/{account}/credits", {"credits": "0.000001"})
    assert status == 409 and body["error"]["param"] == "credits", body
    assert (await _chat(harness, key))[0] == 200
    s = await harness.assert_conserved(account)  # exact to the micro-credit after a charge
    assert s["extra"] + s["charged"] == MAX_SAFE, s


def _bare_micro(view: dict[str, Any], micro: int) -> list[str]:
    """Fields of `view` that show `micro` micro-credits as a bare number (not in a `_micro` field)."""
    return [name for name, value in view.items()
            if not name.endswith("_micro") and str(value) == str(micro) and micro >= 1_000_000]


async def test_admin_events_show_every_micro_credit_amount_in_credits(harness: Harness) -> None:
    """DESIGN: credits appear in every external interface as decimal credits, never micro-units. The
    events API converts `amount` and `cost`, but a released or reaped event's `hold`, a plan change's
    `expired` and a key update's budgets are shown as raw micro-credits (usage_series._MICRO_FIELDS)."""
    account, key = await harness.account(credits=100)
    status, k = await harness.admin("POST", f"/admin/accounts/{account}/keys", {"label": "b"})
    assert status == 201
    status, _ = await harness.admin("PATCH", f"/admin/keys/{k['id']}", {"budget_credits_per_cycle": "7"})
    assert status == 200
    body = {"model": "demo-mini", "max_tokens": 2000, "messages": [{"role": "user", "content": "hi [[emu fail=500]]"}]}
    async with harness.client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 500
    await harness.gw.quiesce()
    (released,) = [e for e in harness.ledger(account) if e["type"] == "released"]
    hold = int(released["hold"])
    assert hold >= 1_000_000  # large enough to tell micro-credits from credits
    status, listing = await harness.admin("GET", f"/admin/accounts/{account}/events?limit=50")
    assert status == 200
    views = {e["type"]: e for e in listing["data"]}
    assert _bare_micro(views["released"], hold) == [], views["released"]
    assert _bare_micro(views["key_updated"], 7_000_000) == [], views["key_updated"]


async def test_shipped_cloudevents_of_admin_events_carry_credits_not_bare_micro_credits(harness: Harness) -> None:
    """The ledger shipper's CloudEvents (gateway.shipper.to_cloudevent -> ledger.admin_view) copy every
    field of a grant or adjustment as stored: `data.amount` is "2000000" for 2 credits, with nothing to
    say it is micro-credits. It must carry the exact decimal credits and the `_micro` twin, as the
    events API does (`credits`, `credits_micro`)."""
    from gateway.keys import KeySchema
    from gateway.shipper import to_cloudevent

    account, _ = await harness.account(credits=2)
    entries = harness.redis.xrange(KeySchema().for_account(account).ledger)
    (grant,) = [(i.decode(), {k.decode(): v.decode() for k, v in f.items()}) for i, f in entries
                if f[b"type"] == b"grant"]
    data = to_cloudevent(account, *grant)["data"]
    assert _bare_micro(data, 2_000_000) == [], data
    assert data.get("credits") == "2" and data.get("credits_micro") == 2_000_000, data


async def test_a_closed_account_takes_no_more_credits_and_no_new_keys(harness: Harness) -> None:
    """Closed is final (lua/lifecycle-2.lua): nothing can spend from a closed account ever again, yet
    grant-3 credits it (a pack sold to it would be money taken for credits that can never be used)
    and addkey-5 issues it a new key, shown once, that every request then refuses. Both must be
    refused (409, as a lifecycle change of a closed account is) and leave nothing behind."""
    account, _ = await harness.account(credits=5)
    assert (await harness.admin("POST", f"/admin/accounts/{account}/close", {"reason": "churned"}))[0] == 200
    before = harness.state(account)
    status, body = await harness.admin("POST", f"/admin/accounts/{account}/credits", {"credits": 3})
    assert status == 409, body
    status, body = await harness.admin("POST", f"/admin/accounts/{account}/keys", {"label": "after close"})
    assert status == 409, body
    (key,) = (await harness.admin("GET", f"/admin/accounts/{account}/keys"))[1]["data"]
    status, body = await harness.admin("POST", f"/admin/keys/{key['id']}/rotate", {"grace_seconds": 60})
    assert status == 409, body
    assert harness.state(account) == before
