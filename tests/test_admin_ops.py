"""The operator's side of the admin API: account listing with filters and pages, platform stats, key
rotation with a grace period, key scopes and expiry, last-used times; each through HTTP and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import anthropic
import openai
from conftest import ADMIN, ROOT, Harness, no_limits, run_sync

from gateway.app import reap_once
from gateway.keys import KeySchema, bucket_of
from gateway.metering import quote
from gateway.migrate import migrate_once

CHAT = {"model": "demo-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


async def _chat(harness: Harness, key: str, body: dict[str, Any] = CHAT) -> int:
    async with harness.client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status


async def _new_account(harness: Harness, name: str, plan: str) -> str:
    status, body = await harness.admin("POST", "/admin/accounts", json={"name": name, "plan": plan})
    assert status == 201
    return str(body["id"])


async def test_accounts_are_listed_with_filters_and_pages(harness: Harness) -> None:
    made = {await _new_account(harness, f"acme-{i}" if i % 2 else f"globex-{i}", "pro" if i < 3 else "free")
            for i in range(7)}
    seen: list[str] = []
    after = ""
    while True:
        status, page = await harness.admin("GET", f"/admin/accounts?limit=2&after={after}")
        assert status == 200 and len(page["data"]) <= 2
        seen += [a["id"] for a in page["data"]]
        if not page["has_more"]:
            break
        after = page["next_after"]
    assert seen == sorted(made)  # every account once, in id order
    status, pro = await harness.admin("GET", "/admin/accounts?plan=pro")
    assert {a["plan"] for a in pro["data"]} == {"pro"} and len(pro["data"]) == 3
    status, acme = await harness.admin("GET", "/admin/accounts?name=ACME&plan=free")
    assert {a["name"] for a in acme["data"]} == {"acme-3", "acme-5"}  # case-insensitive substring, and plan
    for bad in ("0", "501", "x"):
        status, err = await harness.admin("GET", f"/admin/accounts?limit={bad}")
        assert status == 400 and err["error"]["param"] == "limit"
    async with harness.client.get("/admin/accounts") as resp:
        assert resp.status == 401


async def test_platform_stats_add_up_to_the_accounts_and_the_ledger(harness: Harness) -> None:
    accounts = [await harness.account(credits=2, plan=plan) for plan in ("free", "free", "pro")]
    await asyncio.gather(*(_chat(harness, key) for _ in range(5) for _, key in accounts))
    await harness.gw.quiesce()
    status, stats = await harness.admin("GET", "/admin/stats")
    assert status == 200
    assert stats["accounts"] == 3 and stats["accounts_by_plan"] == {"free": 2, "pro": 1}
    usage = [e for account, _ in accounts for e in harness.ledger(account) if e["type"] == "usage"]
    assert stats["requests_lifetime"] == stats["requests_this_cycle"] == len(usage) == 15
    tokens = sum(int(e["in"]) + int(e["out"]) for e in usage)
    assert stats["tokens_lifetime"] == stats["tokens_this_cycle"] == tokens > 0
    spent = sum(int(e["cost"]) for e in usage)
    assert stats["credits_used_this_cycle_micro"] == spent > 0
    states = [harness.state(account) for account, _ in accounts]
    remaining = sum(s["allow"] + s["extra"] - s["held"] for s in states)
    assert stats["credits_remaining_micro"] == remaining


async def test_rotation_keeps_the_old_key_for_the_grace_period_only(harness: Harness) -> None:
    account, old_key = await harness.account(credits=5)
    [old] = (await harness.admin("GET", f"/admin/accounts/{account}/keys"))[1]["data"]
    assert old["last_used_at"] is None
    assert await _chat(harness, old_key) == 200
    [old] = (await harness.admin("GET", f"/admin/accounts/{account}/keys"))[1]["data"]
    assert old["last_used_at"] is not None
    status, rotated = await harness.admin("POST", f"/admin/keys/{old['id']}/rotate", json={"grace_seconds": 600})
    assert status == 201 and rotated["key"].startswith(old_key[:3]) and rotated["id"] != old["id"]
    assert rotated["label"] == old["label"] and rotated["previous"]["rotated_to"] == rotated["id"]
    assert rotated["previous"]["expires_at"] is not None
    assert await _chat(harness, old_key) == 200 and await _chat(harness, rotated["key"]) == 200  # both, in grace
    assert harness.gw.meter is not None and harness.gw.store is not None
    harness.gw.meter.clock_offset_ms += 601_000  # past the grace period
    assert await _chat(harness, rotated["key"]) == 200
    assert await _chat(harness, old_key) == 401
    status, err = await harness.admin("POST", "/admin/keys/key_nope/rotate", json={})
    assert status == 404 and "key_nope" in err["error"]["message"]
    for bad in ('{"grace_seconds": -1}', '{"grace_seconds": 1e400}', '{"grace_seconds": "1h"}', '{"grace_seconds"'):
        async with harness.client.post(f"/admin/keys/{rotated['id']}/rotate", data=bad, headers=ADMIN) as resp:
            assert resp.status == 400, bad
    assert len((await harness.admin("GET", f"/admin/accounts/{account}/keys"))[1]["data"]) == 2  # none made
    await harness.assert_conserved(account)


async def test_key_scopes_narrow_apis_and_models(harness: Harness) -> None:
    account, _ = await harness.account(credits=5, plan="pro")
    status, key = await harness.admin("POST", f"/admin/accounts/{account}/keys",
                               json={"label": "mini only", "scopes": ["api:openai", "model:demo-mini*"]})
    assert status == 201 and key["scopes"] == ["api:openai", "model:demo-mini*"]
    assert await _chat(harness, key["key"]) == 200
    before = harness.state(account)
    client = openai.OpenAI(base_url=str(harness.client.make_url("/v1")), api_key=key["key"], max_retries=0)
    try:
        await run_sync(client.chat.completions.create, **{**CHAT, "model": "demo-large"})
        raise AssertionError("a model outside the key's scopes was served")
    except openai.PermissionDeniedError as exc:
        assert "scopes do not include the model 'demo-large'" in str(exc)
    claude = anthropic.Anthropic(base_url=str(harness.client.make_url("")), api_key=key["key"], max_retries=0)
    try:
        await run_sync(claude.messages.create, model="demo-claude", max_tokens=8,
                       messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("an API outside the key's scopes was served")
    except anthropic.PermissionDeniedError as exc:
        assert "scopes do not include the anthropic API" in str(exc)
    assert harness.state(account) == before and harness.holds(account) == {}  # refusals leave nothing
    for bad in (["admin"], ["api:nope"], "api:openai", [1], ["model:"]):
        status, err = await harness.admin("POST", f"/admin/accounts/{account}/keys", json={"scopes": bad})
        assert status == 400 and err["error"]["param"] == "scopes"


async def test_key_expiry_can_be_changed_and_applies_at_once(harness: Harness) -> None:
    account, raw = await harness.account(credits=5)
    [key] = (await harness.admin("GET", f"/admin/accounts/{account}/keys"))[1]["data"]
    status, view = await harness.admin("PATCH", f"/admin/keys/{key['id']}",
                                json={"expires_at": "2020-01-01T00:00:00Z", "label": "old"})
    assert status == 200 and view["status"] == "expired" and view["label"] == "old"
    assert await _chat(harness, raw) == 401
    status, view = await harness.admin("PATCH", f"/admin/keys/{key['id']}", json={"expires_at": None})
    assert status == 200 and view["status"] == "active" and view["expires_at"] is None
    assert await _chat(harness, raw) == 200
    for bad in ({}, {"expires_at": "soon"}, {"label": 3}):
        status, err = await harness.admin("PATCH", f"/admin/keys/{key['id']}", json=bad)
        assert status == 400 and err["error"]["message"]


def _cli(redis_url: str, *args: str) -> Any:
    env = {**os.environ, "REDIS_URL": redis_url}
    done = subprocess.run([sys.executable, "-m", "gateway", *args, "--json"], cwd=ROOT, env=env,  # noqa: S603
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def test_cli_lists_accounts_shows_stats_and_rotates_keys(harness: Harness, redis_url: str) -> None:
    account, _ = await harness.account(credits=1)
    listed = await asyncio.to_thread(_cli, redis_url, "accounts", "list", "--plan", "free")
    assert [a["id"] for a in listed["data"]] == [account]
    stats = await asyncio.to_thread(_cli, redis_url, "stats")
    assert stats["accounts"] == 1
    key_id = next(k.decode() for k in harness.redis.smembers(KeySchema().for_account(account).key_ids))
    rotated = await asyncio.to_thread(_cli, redis_url, "keys", "rotate", key_id, "--grace-seconds", "0")
    assert rotated["previous"]["id"] == key_id and rotated["key"]
    assert await _chat(harness, rotated["key"]) == 200
    scoped = await asyncio.to_thread(_cli, redis_url, "keys", "create", "--account", account,
                                     "--scope", "model:demo-mini")
    assert scoped["scopes"] == ["model:demo-mini"]


async def test_an_older_deployments_global_indexes_are_copied_into_the_buckets_once(harness: Harness) -> None:
    """What a version before the sharded indexes left: every account in one set, export cursors in one
    hash per export, a hold taken with no index entry. Migrated once (a marker), then listed, exported
    from where the export stopped, and the old hold reaped."""
    gw = harness.gw
    schema = gw.schema
    account, key = await harness.account(credits=1)
    assert await _chat(harness, key) == 200
    await gw.quiesce()
    stream_id = harness.redis.xrange(schema.for_account(account).ledger)[-1][0].decode()
    principal = await gw.auth.authenticate(key)  # type: ignore[union-attr]
    q = quote(gw.config.rates("free", gw.config.route("demo-mini")), 10, 10)  # type: ignore[arg-type]
    await gw.meter.reserve(schema.for_account(account), principal.key_id, "req_old", "free", q,  # type: ignore[union-attr]
                           no_limits(q))
    # back to the old layout
    for index in (schema.accounts(bucket_of(account)), schema.holders(bucket_of(account))):
        harness.redis.zrem(index, account)
    harness.redis.delete(schema.for_account(account).exports, schema.migrated)
    harness.redis.sadd(schema.legacy_accounts, account)
    harness.redis.hset(f"{schema.prefix}export:billing", account, stream_id)
    assert (await harness.admin("GET", "/admin/accounts"))[1]["data"] == []
    assert await migrate_once(gw.redis, schema)
    assert harness.redis.exists(schema.migrated)
    assert [a["id"] for a in (await harness.admin("GET", "/admin/accounts"))[1]["data"]] == [account]
    assert harness.redis.hget(schema.for_account(account).exports, "billing").decode() == stream_id
    assert gw.meter is not None
    gw.meter.clock_offset_ms = int(gw.settings.hold_lease_seconds * 1000) + 1000
    assert await reap_once(gw) == 1  # the old hold: its account is in the reaper's index now
    gw.meter.clock_offset_ms = 0
    await harness.assert_conserved(account)
    harness.redis.srem(schema.legacy_accounts, account)
    harness.redis.sadd(schema.legacy_accounts, "acct_added_later")
    assert await migrate_once(gw.redis, schema)  # done once: the marker stands
    assert harness.redis.zscore(schema.accounts(bucket_of("acct_added_later")), "acct_added_later") is None
