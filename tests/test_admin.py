"""Admin API, key lifecycle, the key holder's credits endpoint, and the operator CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import ADMIN, ADMIN_KEY, ROOT, Harness, make_settings

from gateway.app import create_app
from gateway.keys import KeySchema
from gateway.state import GATEWAY

BODY = {"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]}


async def _chat(h: Harness, key: str) -> int:
    resp = await h.client.post("/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
    await resp.read()
    return resp.status


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-Admin-Key": "wrong"}])
async def test_admin_api_requires_the_admin_key(harness: Harness, headers: dict[str, str]) -> None:
    resp = await harness.client.post("/admin/accounts", json={"name": "x", "plan": "free"}, headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_admin_accepts_x_admin_key(harness: Harness) -> None:
    resp = await harness.client.post("/admin/accounts", json={"name": "x"}, headers={"X-Admin-Key": ADMIN_KEY})
    assert resp.status == 201
    assert (await resp.json())["plan"] == "free"  # the default plan


async def test_account_lifecycle_through_the_admin_api(harness: Harness) -> None:
    resp = await harness.client.post("/admin/accounts", json={"name": "Acme", "plan": "starter"}, headers=ADMIN)
    assert resp.status == 201
    account = await resp.json()
    assert account["id"].startswith("acct_") and account["credits_remaining"] == "5"
    assert account["credits_remaining_micro"] == 5_000_000  # the starter allowance, exact
    account_id = account["id"]
    resp = await harness.client.post(f"/admin/accounts/{account_id}/credits", json={"credits": "2.5"}, headers=ADMIN)
    assert resp.status == 200 and (await resp.json())["credits_remaining"] == "7.5"
    resp = await harness.client.put(f"/admin/accounts/{account_id}/plan", json={"plan": "pro", "effective": "now"},
                                    headers=ADMIN)
    changed = await resp.json()
    # pro's allowance is 0: a downgrade at once leaves no more allowance than it (the purchased credits stay)
    assert resp.status == 200 and changed["plan"] == "pro" and changed["change"]["allowance_removed"] == "5"
    resp = await harness.client.get(f"/admin/accounts/{account_id}", headers=ADMIN)
    view = await resp.json()
    assert (view["plan"], view["credits_remaining"], view["purchased_remaining"]) == ("pro", "2.5", "2.5")
    ledger = harness.ledger(account_id)
    assert [e["type"] for e in ledger] == ["account_created", "grant", "plan_change"]
    assert ledger[1]["amount"] == "2500000"
    assert (ledger[2]["from"], ledger[2]["to"], ledger[2]["when"], ledger[2]["expired"]) == ("starter", "pro", "now",
                                                                                           "5000000")
    await harness.assert_conserved(account_id)


@pytest.mark.parametrize(("body", "param"), [
    ({"credits": -1}, "credits"), ({"credits": 0}, "credits"), ({"credits": "abc"}, "credits"),
    ({"credits": "0.0000001"}, "credits"), ({}, "credits"), ({"credits": True}, "credits"),
])
async def test_bad_grants_are_400_and_change_nothing(harness: Harness, body: dict[str, Any], param: str) -> None:
    account, _key = await harness.account(credits=1)
    resp = await harness.client.post(f"/admin/accounts/{account}/credits", json=body, headers=ADMIN)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param
    assert harness.state(account)["extra"] == 1_000_000


async def test_unknown_plan_and_account_are_refused(harness: Harness) -> None:
    resp = await harness.client.post("/admin/accounts", json={"name": "x", "plan": "gold"}, headers=ADMIN)
    assert resp.status == 400
    resp = await harness.client.get("/admin/accounts/acct_nope", headers=ADMIN)
    assert resp.status == 404
    resp = await harness.client.post("/admin/accounts/acct_nope/credits", json={"credits": 1}, headers=ADMIN)
    assert resp.status == 404
    resp = await harness.client.delete("/admin/keys/key_nope", headers=ADMIN)
    assert resp.status == 404


async def test_keys_are_stored_only_as_hashes_and_shown_once(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    assert key.startswith("gwk_") and len(key) > 40
    dump = b"".join(harness.redis.dump(k) or b"" for k in harness.redis.keys("*"))
    assert key.encode() not in dump
    assert hashlib.sha256(key.encode()).hexdigest().encode() in b"".join(harness.redis.keys("*"))
    resp = await harness.client.get(f"/admin/accounts/{account}/keys", headers=ADMIN)
    listing = await resp.json()
    assert len(listing["data"]) == 1
    assert key not in json.dumps(listing) and "sha256" not in json.dumps(listing)
    assert listing["data"][0]["prefix"] == key[:12]


async def test_several_keys_share_one_balance(harness: Harness) -> None:
    account, key1 = await harness.account(credits=1)
    resp = await harness.client.post(f"/admin/accounts/{account}/keys", json={"label": "second"}, headers=ADMIN)
    key2 = (await resp.json())["key"]
    assert await _chat(harness, key1) == 200 and await _chat(harness, key2) == 200
    state = await harness.assert_conserved(account)
    assert state["requests"] == 2
    events = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert len({e["key_id"] for e in events}) == 2


async def test_a_revoked_key_is_refused_at_once_on_every_process(harness: Harness, config_dir: Path,
                                                                 redis_url: str, aiohttp_client: Any) -> None:
    other_client = await aiohttp_client(create_app(make_settings(config_dir, redis_url)))
    other = Harness(other_client, harness.redis, harness.emulator)
    account, key = await harness.account(credits=1)
    assert await _chat(harness, key) == 200 and await _chat(other, key) == 200  # both processes cached it
    listing = await (await harness.client.get(f"/admin/accounts/{account}/keys", headers=ADMIN)).json()
    key_id = listing["data"][0]["id"]
    resp = await harness.client.delete(f"/admin/keys/{key_id}", headers=ADMIN)
    assert resp.status == 200 and (await resp.json())["status"] == "revoked"
    for h in (harness, other):
        assert await _chat(h, key) == 401
        resp = await h.client.get("/gateway/credits", headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 401
        resp = await h.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 401
    await harness.assert_conserved(account, other_client.app[GATEWAY])


async def test_an_expired_key_is_refused(harness: Harness) -> None:
    account, _ = await harness.account(credits=1)
    soon = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
    resp = await harness.client.post(f"/admin/accounts/{account}/keys", json={"expires_at": soon}, headers=ADMIN)
    assert resp.status == 201
    key = (await resp.json())["key"]
    assert await _chat(harness, key) == 200
    harness.gw.meter.clock_offset_ms = 60_000  # type: ignore[union-attr]  # the scripts' clock: 1 min later
    sdk = harness.sdk(key)
    with pytest.raises(openai.AuthenticationError, match="expired"):
        await sdk.chat.completions.create(**BODY)
    harness.gw.meter.clock_offset_ms = 0  # type: ignore[union-attr]
    await harness.assert_conserved(account)


async def test_bad_expiry_is_400(harness: Harness) -> None:
    account, _ = await harness.account(credits=1)
    resp = await harness.client.post(f"/admin/accounts/{account}/keys", json={"expires_at": "tomorrow"},
                                     headers=ADMIN)
    assert resp.status == 400


async def test_a_plan_change_applies_to_the_next_request_even_when_cached(harness: Harness) -> None:
    account, key = await harness.account(credits=100)
    sdk = harness.sdk(key)
    await sdk.chat.completions.create(**BODY)  # cached as plan "free"
    resp = await harness.client.put(f"/admin/accounts/{account}/plan", json={"plan": "starter", "effective": "now"},
                                    headers=ADMIN)
    assert resp.status == 200
    with pytest.raises(openai.PermissionDeniedError):  # starter allows demo-mini only
        await sdk.chat.completions.create(model="demo-large", messages=BODY["messages"])
    await sdk.chat.completions.create(**BODY)
    await harness.assert_conserved(account)


async def test_credits_endpoint_for_the_key_holder(harness: Harness) -> None:
    account, key = await harness.account(credits=0, plan="starter")  # 5 credits allowance
    assert await _chat(harness, key) == 200
    await harness.gw.quiesce()
    resp = await harness.client.get("/gateway/credits", headers={"Authorization": f"Bearer {key}"})
    view = await resp.json()
    state = harness.state(account)
    assert view["plan"] == "starter" and view["credits_limit"] == "5"
    assert view["credits_remaining_micro"] == 5_000_000 - state["charged"]
    assert view["credits_used_this_cycle_micro"] == state["charged"]
    assert 99 < view["percent_remaining"] <= 100
    assert view["days_until_reset"] in range(27, 32)
    assert view["reset_date"] and view["warnings"] == []


async def test_credits_endpoint_warns_when_low(harness: Harness) -> None:
    account, key = await harness.account(credits=0, plan="starter")
    harness.redis.hset(KeySchema().for_account(account).account, "allow", 1_000_000)  # 1 of 5 left
    resp = await harness.client.get("/gateway/credits", headers={"x-api-key": key})
    view = await resp.json()
    assert view["percent_remaining"] == 20.0 and view["warnings"]


def _cli(*args: str, env: dict[str, str]) -> dict[str, Any] | list[Any]:
    out = subprocess.run([sys.executable, "-m", "gateway", *args, "--json"], env=env, cwd=ROOT,  # noqa: S603
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_cli_commands_print_json(redis_url: str, config_dir: Path) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, "GATEWAY_CONFIG_DIR": str(config_dir)}
    account = _cli("accounts", "create", "--name", "cli", "--plan", "starter", env=env)
    assert isinstance(account, dict) and account["id"].startswith("acct_")
    key = _cli("keys", "create", "--account", account["id"], "--label", "laptop", env=env)
    assert isinstance(key, dict) and key["key"].startswith("gwk_") and key["id"].startswith("key_")
    listed = _cli("keys", "list", "--account", account["id"], env=env)
    assert [k["id"] for k in listed] == [key["id"]]  # type: ignore[index]
    granted = _cli("credits", "grant", "--account", account["id"], "--credits", "3", env=env)
    assert granted["credits_remaining"] == "8"  # type: ignore[call-overload]
    revoked = _cli("keys", "revoke", key["id"], env=env)
    assert revoked["status"] == "revoked"  # type: ignore[call-overload]
    config = _cli("check-config", env=env)
    assert "demo-mini" in config["models"]  # type: ignore[call-overload]


def test_cli_reports_errors_without_a_traceback(redis_url: str, config_dir: Path) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, "GATEWAY_CONFIG_DIR": str(config_dir)}
    out = subprocess.run([sys.executable, "-m", "gateway", "credits", "grant", "--account", "acct_nope",
                          "--credits", "1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "No account" in out.stderr and "Traceback" not in out.stderr
