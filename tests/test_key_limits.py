"""The plan's `max_keys` counts the keys that can still authenticate (issue 10, item 13): expired and
revoked keys free their slot, a rotated key counts until its grace period ends, and neither rotation
nor a new expiry can hold more usable keys than the plan allows once grace periods end."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import Harness

from gateway.keys import KeySchema
from gateway.views import now_ms

HOUR = 3_600_000
PLANS = """
default_plan: free
plans:
  free: {monthly_credits: 1, models: ["demo-*"]}
  twokeys: {monthly_credits: 1, models: ["demo-*"], limits: {max_keys: 2}}
"""


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


async def _create(harness: Harness, account: str, **body: Any) -> tuple[int, dict[str, Any]]:
    return await harness.admin("POST", f"/admin/accounts/{account}/keys", body)


async def _rotate(harness: Harness, key_id: str, grace_seconds: int = 600) -> tuple[int, dict[str, Any]]:
    return await harness.admin("POST", f"/admin/keys/{key_id}/rotate", {"grace_seconds": grace_seconds})


async def _chat(harness: Harness, key: str) -> int:
    body = {"model": "demo-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi [[emu out=2]]"}]}
    async with harness.client.post("/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status


async def _only_key(harness: Harness, account: str) -> str:
    status, listing = await harness.admin("GET", f"/admin/accounts/{account}/keys")
    assert status == 200 and len(listing["data"]) == 1
    return str(listing["data"][0]["id"])


def _usable(harness: Harness, account: str) -> set[str]:
    """The keys the reserve script would accept now (status active and not expired)."""
    keys = KeySchema().for_account(account)
    now = now_ms() + (harness.gw.store.clock_offset_ms if harness.gw.store else 0)
    found = set()
    for key_id in harness.redis.smembers(keys.key_ids):
        rec = harness.redis.hgetall(keys.api_key(key_id.decode()))
        expires = int(rec.get(b"expires_ms") or 0)
        if rec[b"status"] == b"active" and (expires == 0 or expires > now):
            found.add(key_id.decode())
    return found


async def test_an_expired_key_frees_its_slot(harness: Harness) -> None:
    account, _ = await harness.account(plan="twokeys")
    expires = (now_ms() + HOUR) / 1000
    status, short = await _create(harness, account, label="an hour", expires_at=expires)
    assert status == 201
    status, error = await _create(harness, account)
    assert status == 403 and "2 active keys" in error["error"]["message"]
    harness.shift_clock(HOUR + 1000)
    assert await _chat(harness, short["key"]) == 401  # expired: it can no longer authenticate ...
    assert (await _create(harness, account))[0] == 201  # ... so it no longer counts
    assert (await _create(harness, account))[0] == 403
    assert len(_usable(harness, account)) == 2


async def test_a_rotation_at_the_limit_is_allowed_and_the_old_key_counts_until_its_grace_ends(harness: Harness
                                                                                              ) -> None:
    account, first_key = await harness.account(plan="twokeys")
    first = await _only_key(harness, account)
    status, second = await _create(harness, account)
    assert status == 201
    status, rotated = await _rotate(harness, first)  # a replacement: allowed at the limit
    assert status == 201 and rotated["previous"]["rotated_to"] == rotated["id"]
    assert len(_usable(harness, account)) == 3 and await _chat(harness, first_key) == 200  # in its grace period
    assert (await _create(harness, account))[0] == 403
    status, error = await _rotate(harness, second["id"])  # would leave three keys after the grace periods
    assert status == 403 and "grace period" in error["error"]["message"]
    status, error = await _rotate(harness, first)
    assert status == 400 and rotated["id"] in error["error"]["message"]  # rotate the replacement instead
    harness.shift_clock(601_000)
    assert await _chat(harness, first_key) == 401
    status, _ = await _rotate(harness, second["id"])
    assert status == 201
    assert (await _create(harness, account))[0] == 403  # the second key's grace period runs
    harness.shift_clock(601_000)
    assert (await _create(harness, account))[0] == 403  # two usable keys: the limit
    assert len(_usable(harness, account)) == 2
    status, listing = await harness.admin("GET", f"/admin/accounts/{account}/keys")
    assert sorted(k["status"] for k in listing["data"]) == ["active", "active", "expired", "expired"]


async def test_an_expired_or_rotated_key_cannot_be_revived_past_the_limit(harness: Harness) -> None:
    account, _ = await harness.account(plan="twokeys")
    first = await _only_key(harness, account)
    status, second = await _create(harness, account)
    status, rotated = await _rotate(harness, first)
    assert status == 201
    status, error = await harness.admin("PATCH", f"/admin/keys/{first}", {"expires_at": None})
    assert status == 403 and error["error"]["param"] == "expires_at"
    assert len(_usable(harness, account)) == 3  # unchanged
    status, view = await harness.admin("PATCH", f"/admin/keys/{second['id']}", {"label": "renamed"})
    assert status == 200 and view["label"] == "renamed"  # a label never counts
    status, view = await harness.admin("PATCH", f"/admin/keys/{second['id']}", {"expires_at": "2020-01-01T00:00Z"})
    assert status == 200 and view["status"] == "expired"  # shortening is always allowed
    status, error = await harness.admin("PATCH", f"/admin/keys/{second['id']}", {"expires_at": None})
    assert status == 403  # the first key (in grace) and its replacement fill the limit
    assert (await harness.admin("DELETE", f"/admin/keys/{first}"))[0] == 200
    status, view = await harness.admin("PATCH", f"/admin/keys/{second['id']}", {"expires_at": None})
    assert status == 200 and view["status"] == "active"
    assert _usable(harness, account) == {second["id"], rotated["id"]}
    assert [e["type"] for e in harness.ledger(account)].count("key_updated") == 3  # refusals leave no event


async def test_concurrent_creations_and_rotations_never_exceed_max_keys(harness: Harness) -> None:
    account, _ = await harness.account(plan="twokeys")
    first = await _only_key(harness, account)
    created = await asyncio.gather(*(_create(harness, account) for _ in range(20)))
    assert [s for s, _ in created].count(201) == 1
    rotations = await asyncio.gather(*(_rotate(harness, first, 0) for _ in range(20)))
    assert [s for s, _ in rotations].count(201) == 1  # one replacement; the others see it already rotated
    assert {s for s, _ in rotations} == {201, 400}
    mixed = await asyncio.gather(*(_create(harness, account) for _ in range(10)),
                                 *(_rotate(harness, key_id, 600) for key_id in _usable(harness, account)))
    assert all(s in (201, 400, 403) for s, _ in mixed)
    assert [s for s, _ in mixed[:10]].count(201) == 0  # at the limit: no new key, only replacements
    harness.shift_clock(601_000)
    assert len(_usable(harness, account)) == 2


async def test_accounts_made_before_the_usable_key_index_count_only_usable_keys(harness: Harness) -> None:
    account, _ = await harness.account(plan="twokeys")
    status, short = await _create(harness, account, expires_at=(now_ms() + HOUR) / 1000)
    assert status == 201
    keys = KeySchema().for_account(account)
    # the account as the counter-based version left it: the expired key still counted
    harness.redis.hdel(keys.account, "key_index")
    harness.redis.delete(keys.usable_keys)
    harness.redis.hset(keys.account, "active_keys", 2)
    harness.shift_clock(HOUR + 1000)
    assert (await _create(harness, account))[0] == 201
    assert (await _create(harness, account))[0] == 403
    assert harness.redis.hget(keys.account, "active_keys") is None
    assert len(_usable(harness, account)) == 2 and short["id"] not in _usable(harness, account)
