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
