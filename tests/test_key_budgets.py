"""Per-key budgets (issue 15, item 4): a key's credits per billing cycle and for its lifetime are held,
lowered and charged in the same atomic reserve and settle as its account's balance, follow the
account's cycle, change at once with PATCH, and get back exactly what released and reaped holds held."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import ADMIN_KEY, ROOT, Harness, no_limits

from gateway.keys import KeySchema
from gateway.metering import quote

PLANS = """
default_plan: free
plans:
  free: {monthly_credits: 0, credit_usd: 0.001, models: ["demo-*"]}
  monthly: {monthly_credits: 50, credit_usd: 0.001, models: ["demo-*"]}
"""
DAY = 86_400_000


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


async def _key(harness: Harness, account: str, **body: Any) -> dict[str, Any]:
    status, key = await harness.admin("POST", f"/admin/accounts/{account}/keys", {"label": "budgeted", **body})
    assert status == 201, key
    return key


async def _chat(harness: Harness, key: str, max_tokens: int = 20, out: int = 20,
                extra: str = "") -> tuple[int, dict[str, Any], Any]:
    body = {"model": "demo-mini", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"hi [[emu out={out}{extra}]]"}]}
    async with harness.client.post("/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def _view(harness: Harness, raw_key: str) -> dict[str, Any]:
    """The calling key's own view at /gateway/keys."""
    async with harness.client.get("/gateway/keys", headers={"Authorization": f"Bearer {raw_key}"}) as resp:
        assert resp.status == 200
        listing = await resp.json()
    (mine,) = [k for k in listing["data"] if raw_key.startswith(k["prefix"])]
    return dict(mine)


def _limit_fields(harness: Harness, account: str) -> dict[str, int]:
    raw = harness.redis.hgetall(KeySchema().for_account(account).limits)
    return {k.decode(): int(v) for k, v in raw.items() if b"key_" in k}


async def test_a_burst_on_one_key_never_spends_more_than_its_budget_while_the_account_has_plenty(
        harness: Harness) -> None:
    account, _ = await harness.account(credits=100)
    key = await _key(harness, account, budget_credits_per_cycle="0.3")
    results = await asyncio.gather(*(_chat(harness, key["key"]) for _ in range(30)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) >= 1 and statuses.count(402) >= 1 and set(statuses) <= {200, 402}, statuses
    refusal = next(body for status, _, body in results if status == 402)["error"]
    assert "This API key's budget" in refusal["message"] and refusal["limited_by"] == "key_budget_cycle"
    assert refusal["shortfall_micro"] == refusal["needed_micro"] - refusal["available_micro"] > 0
    s = await harness.assert_conserved(account)
    view = await _view(harness, key["key"])
    assert view["budget_credits_per_cycle"] == "0.3" and view["budget_credits_per_cycle_micro"] == 300_000
    assert 0 < view["spent_this_cycle_micro"] <= 300_000  # never over the key's budget ...
    assert view["spent_this_cycle_micro"] == view["spent_lifetime_micro"] == s["charged"]  # ... all of it counted
    assert view["budget_remaining_micro"] == 300_000 - view["spent_this_cycle_micro"]
    assert s["extra"] > 99_000_000  # the account could have paid for every one of them
    assert all(v == 0 for k, v in _limit_fields(harness, account).items() if k.startswith("h:"))


async def test_the_output_cap_is_lowered_to_what_the_key_budget_affords(harness: Harness) -> None:
    account, _ = await harness.account(credits=100)
    key = await _key(harness, account, budget_credits_lifetime=0.05)
    client = harness.sdk(key["key"])
    raw = await client.chat.completions.with_raw_response.create(
        model="demo-mini", max_tokens=1000, messages=[{"role": "user", "content": "hi [[emu out=1000]]"}])
    lowered = int(raw.headers["x-gateway-output-cap-lowered"])
    completion = raw.parse()
    assert 0 < lowered < 1000 and completion.usage is not None and completion.usage.completion_tokens == lowered
    await harness.gw.quiesce()
    view = await _view(harness, key["key"])
    assert 0 < view["spent_lifetime_micro"] <= 50_000 and view["budget_credits_lifetime"] == "0.05"
    unbudgeted = harness.sdk((await _key(harness, account))["key"])
    raw = await unbudgeted.chat.completions.with_raw_response.create(
        model="demo-mini", max_tokens=1000, messages=[{"role": "user", "content": "hi [[emu out=5]]"}])
    assert "x-gateway-output-cap-lowered" not in raw.headers  # absent when nothing was lowered


async def test_the_budget_per_cycle_renews_with_the_accounts_cycle_and_the_lifetime_budget_does_not(
        harness: Harness) -> None:
    account, _ = await harness.account(credits=100, plan="monthly")
    per_cycle = await _key(harness, account, budget_credits_per_cycle="0.04")
    lifetime = await _key(harness, account, budget_credits_lifetime="0.04")
    for key in (per_cycle, lifetime):
        while (await _chat(harness, key["key"], max_tokens=5, out=5))[0] == 200:
            pass
        status, _, body = await _chat(harness, key["key"], max_tokens=5, out=5)
        assert status == 402
    assert body["error"]["limited_by"] == "key_budget_lifetime" and "lifetime" in body["error"]["message"]
    await harness.gw.quiesce()
    spent_before = (await _view(harness, per_cycle["key"]))["spent_lifetime_micro"]
    harness.shift_clock(32 * DAY)  # past the account's cycle end: no request has started the next cycle yet
    assert (await _view(harness, per_cycle["key"]))["spent_this_cycle_micro"] == 0
    assert (await _chat(harness, per_cycle["key"], max_tokens=5, out=5))[0] == 200  # renewed with the cycle
    assert (await _chat(harness, lifetime["key"], max_tokens=5, out=5))[0] == 402  # for ever
    await harness.gw.quiesce()
    view = await _view(harness, per_cycle["key"])
    assert 0 < view["spent_this_cycle_micro"] == view["spent_lifetime_micro"] - spent_before
    raw = harness.redis.hgetall(KeySchema().for_account(account).account)
    assert int(raw[b"cycle_start_ms"]) > int(raw[b"created_ms"])  # the account's cycle did roll


async def test_a_budget_change_by_patch_takes_effect_at_once(harness: Harness) -> None:
    account, _ = await harness.account(credits=100)
    key = await _key(harness, account, budget_credits_per_cycle="0.000001")
    assert (await _chat(harness, key["key"]))[0] == 402
    for bad in ("-1", "abc", 0, "0.0000001", True):
        status, error = await harness.admin("PATCH", f"/admin/keys/{key['id']}", {"budget_credits_per_cycle": bad})
        assert status == 400 and error["error"]["param"] == "budget_credits_per_cycle", (bad, error)
    status, view = await harness.admin("PATCH", f"/admin/keys/{key['id']}", {"budget_credits_per_cycle": 10})
    assert status == 200 and view["budget_credits_per_cycle_micro"] == 10_000_000
    assert (await _chat(harness, key["key"]))[0] == 200  # at once, whatever a process cached
    status, view = await harness.admin("PATCH", f"/admin/keys/{key['id']}",
                                       {"budget_credits_per_cycle": None, "budget_credits_lifetime": "0.000001"})
    assert status == 200 and view["budget_credits_per_cycle"] is None and view["budget_credits_lifetime"] == "0.000001"
    assert (await _chat(harness, key["key"]))[0] == 402
    status, view = await harness.admin("PATCH", f"/admin/keys/{key['id']}", {"budget_credits_lifetime": None})
    assert status == 200 and view["budget_remaining"] is None and view["budget_remaining_micro"] is None
    assert (await _chat(harness, key["key"]))[0] == 200
    status, listing = await harness.admin("GET", f"/admin/accounts/{account}/keys")
    admin_view = next(k for k in listing["data"] if k["id"] == key["id"])
    assert admin_view["budget_credits_lifetime"] is None  # no budget: the key's spend is not counted,
    assert admin_view["spent_lifetime_micro"] is None and admin_view["spent_this_cycle_micro"] is None  # nor shown
    status, view = await harness.admin("PATCH", f"/admin/keys/{key['id']}", {"budget_credits_lifetime": "100"})
    assert status == 200 and view["spent_lifetime_micro"] > 0  # what it spent under its earlier budgets still counts


async def test_released_and_reaped_holds_give_the_budget_back_and_a_late_settle_still_counts(
        harness: Harness) -> None:
    account, _ = await harness.account(credits=100)
    key = await _key(harness, account, budget_credits_per_cycle="1", budget_credits_lifetime="2")
    assert (await _chat(harness, key["key"], extra=" fail=500"))[0] == 500  # released: no charge
    await harness.gw.quiesce()
    view = await _view(harness, key["key"])
    assert (view["spent_lifetime_micro"], view["budget_remaining_micro"]) == (0, 1_000_000)
    meter, keys = harness.gw.meter, KeySchema().for_account(account)
    assert meter is not None
    q = quote(harness.gw.config.rates("free", harness.gw.config.route("demo-mini")), 100, 100)  # type: ignore[arg-type]
    held = await meter.reserve(keys, key["id"], "req_budget_reaped", "free", q, no_limits(q))
    assert (await _view(harness, key["key"]))["budget_remaining_micro"] == 1_000_000 - held.hold
    assert _limit_fields(harness, account)[f"h:a:key_budget:{key['id']}"] == held.hold
    harness.shift_clock(meter.lease_ms + 1000)
    assert await meter.reap(keys) == (1, held.hold)
    assert await meter.reap(keys) == (0, 0)  # once
    fields = _limit_fields(harness, account)
    assert fields[f"h:a:key_budget:{key['id']}"] == fields[f"h:a:key_lifetime:{key['id']}"] == 0
    settled = await meter.settle(keys, "req_budget_reaped", key["id"], 1234, {"outcome": "late"})
    assert settled.charged == 1234  # the late settle of a reaped hold still counts in the key's budget
    view = await _view(harness, key["key"])
    assert (view["spent_this_cycle_micro"], view["spent_lifetime_micro"]) == (1234, 1234)
    assert view["budget_remaining_micro"] == 1_000_000 - 1234


async def test_a_rotated_key_keeps_its_budget_and_what_it_spent(harness: Harness) -> None:
    account, _ = await harness.account(credits=100)
    key = await _key(harness, account, budget_credits_per_cycle="0.5")
    assert (await _chat(harness, key["key"]))[0] == 200
    await harness.gw.quiesce()
    spent = (await _view(harness, key["key"]))["spent_this_cycle_micro"]
    status, rotated = await harness.admin("POST", f"/admin/keys/{key['id']}/rotate", {"grace_seconds": 60})
    assert status == 201
    view = await _view(harness, rotated["key"])
    assert (view["budget_credits_per_cycle"], view["spent_this_cycle_micro"]) == ("0.5", spent)
    assert (await _chat(harness, rotated["key"]))[0] == 200
    await harness.gw.quiesce()
    assert (await _view(harness, key["key"]))["spent_this_cycle_micro"] > spent  # one budget for both


async def test_the_cli_creates_and_updates_key_budgets(harness: Harness, config_dir: Path, redis_url: str) -> None:
    account, _ = await harness.account(credits=1)
    env = {**os.environ, "GATEWAY_ADMIN_KEY": ADMIN_KEY, "PYTHONPATH": str(ROOT)}

    async def cli(*args: str) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *args, "--json", "--config-dir", str(config_dir), "--redis-url",
            redis_url, env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        return dict(json.loads(out))

    created = await cli("keys", "create", "--account", account, "--budget", "2.5", "--lifetime-budget", "10")
    assert (created["budget_credits_per_cycle"], created["budget_credits_lifetime_micro"]) == ("2.5", 10_000_000)
    updated = await cli("keys", "update", created["id"], "--budget", "none", "--lifetime-budget", "3")
    assert (updated["budget_credits_per_cycle"], updated["budget_credits_lifetime"]) == (None, "3")
    assert updated["budget_remaining"] == "3"


async def test_a_key_budget_refusal_is_a_402_every_sdk_raises_with_the_shortfall(harness: Harness) -> None:
    account, _ = await harness.account(credits=100)
    key = await _key(harness, account, budget_credits_per_cycle="0.000001")
    with pytest.raises(openai.APIStatusError) as refused:
        await harness.sdk(key["key"]).chat.completions.create(
            model="demo-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 402 and "API key's budget" in refused.value.message
    body: Any = refused.value.body
    assert body["available"] == "0.000001" and body["needed_micro"] > 1 and body["shortfall"]
