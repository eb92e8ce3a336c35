"""Issue 4's plans engine against a real redis-server: cycles, buckets, plan changes, quotas, windows and
rate limits, each enforced in the one reserve call and exact under concurrency."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import ADMIN, LOOP_LAG_TOLERANT, ROOT, Harness

from gateway.keys import KeySchema
from gateway.limits import cycle_bounds
from gateway.store import add_month

DAY = 86_400_000
PLANS = """
default_plan: free
packs:
  small: {credits: 5, price_usd: 4.99}
plans:
  free: {monthly_credits: 1, models: ["demo-*"]}
  basic: {monthly_credits: 10, models: ["demo-*"], timezone: America/New_York}
  premium: {monthly_credits: 30, models: ["demo-*"]}
  rpm: {monthly_credits: 100, models: ["demo-*"], limits: {requests_per_minute: 20}}
  concurrent: {monthly_credits: 100, models: ["demo-*"], limits: {concurrent_requests: 3}}
  tpm: {monthly_credits: 100, models: ["demo-*"], limits: {tokens_per_minute: 3000}}
  usdcap: {monthly_credits: 100, models: ["demo-*"], limits: {max_cost_usd_per_cycle: 0.0002}}
  windows: {monthly_credits: 100, models: ["demo-*"], limits: {spend_windows: {5h: 0.0003, 1d: 0.0005}}}
  provider: {monthly_credits: 100, models: ["demo-*"], limits: {providers: {demo: {calls_per_cycle: 5}}}}
  twokeys: {monthly_credits: 1, models: ["demo-*"], limits: {max_keys: 2}}
  quota: {monthly_credits: 100, models: ["demo-*"], limits: {requests_per_cycle: 3, tokens_per_cycle: 100000}}
"""
BODY = {"model": "demo-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi [[emu out=10]]"}]}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return LOOP_LAG_TOLERANT  # 200-request bursts


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


async def _post(harness: Harness, key: str, body: dict[str, Any] | None = None, path: str = "/v1/chat/completions",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], Any]:
    async with harness.client.post(path, json=body or BODY,
                                   headers=headers or {"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json(), resp.headers


def _limits_hash(harness: Harness, account: str) -> dict[str, int]:
    raw = harness.redis.hgetall(KeySchema().for_account(account).limits)
    return {k.decode(): int(v) for k, v in raw.items() if not k.startswith((b"r:", b"b:"))}


async def _key(harness: Harness, account: str, **body: Any) -> tuple[int, dict[str, Any]]:
    async with harness.client.post(f"/admin/accounts/{account}/keys", json=body, headers=ADMIN) as resp:
        return resp.status, await resp.json()


# ---------------------------------------------------------------- rate limits


async def test_200_concurrent_requests_on_a_20_rpm_plan_pass_exactly_20(harness: Harness) -> None:
    account, key = await harness.account(plan="rpm")
    results = await asyncio.gather(*(_post(harness, key) for _ in range(200)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 20 and statuses.count(429) == 180
    _, body, headers = next(r for r in results if r[0] == 429)
    assert "requests_per_minute (20 of 20 requests)" in body["error"]["message"]
    assert "plan 'rpm'" in body["error"]["message"] and "frees up in" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "20" and headers["x-ratelimit-remaining-requests"] == "0"
    await harness.assert_conserved(account)
    usage = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert len(usage) == 20  # refused requests left nothing: no event, no hold, no count
    counted = {k: v for k, v in _limits_hash(harness, account).items() if k.startswith("w:")}
    assert sum(counted.values()) == 20
    assert all(v == 0 for k, v in _limits_hash(harness, account).items() if k.startswith("h:"))


async def test_the_window_frees_up_when_its_requests_age_out(harness: Harness) -> None:
    account, key = await harness.account(plan="rpm")
    for _ in range(20):
        assert (await _post(harness, key))[0] == 200
    assert (await _post(harness, key))[0] == 429
    harness.shift_clock(61_000)
    assert (await _post(harness, key))[0] == 200
    await harness.assert_conserved(account)


async def test_a_key_may_have_tighter_limits_than_its_account(harness: Harness) -> None:
    account, key = await harness.account(plan="premium")
    status, tight = await _key(harness, account, label="tight", limits={"requests_per_minute": 3})
    assert status == 201
    for _ in range(3):
        assert (await _post(harness, tight["key"]))[0] == 200
    status, body, _ = await _post(harness, tight["key"])
    assert status == 429 and "this API key" in body["error"]["message"]
    assert (await _post(harness, key))[0] == 200  # the account's other key is not limited
    bad, problem = await _key(harness, account, limits={"requests_per_hour": 3})
    assert bad == 400 and "unknown key" in problem["error"]["message"]


async def test_concurrent_requests_limit_counts_requests_in_flight(harness: Harness) -> None:
    account, key = await harness.account(plan="concurrent")
    slow = {**BODY, "stream": True, "messages": [{"role": "user", "content": "x [[emu out=5 delay_ms=60]]"}]}
    results = await asyncio.gather(*(_post_stream(harness, key, slow) for _ in range(10)))
    assert sorted(results).count(200) == 3 and results.count(429) == 7
    assert (await _post(harness, key))[0] == 200  # all finished: the slots are free again
    await harness.assert_conserved(account)


async def _post_stream(harness: Harness, key: str, body: dict[str, Any]) -> int:
    async with harness.client.post("/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status


async def test_tokens_per_minute_holds_the_worst_case_and_counts_the_actual(harness: Harness) -> None:
    account, key = await harness.account(plan="tpm")
    passed = 0
    while True:
        status, body, _ = await _post(harness, key)
        if status != 200:
            break
        passed += 1
    assert status == 429 and "tokens_per_minute" in body["error"]["message"]
    counted = sum(v for k, v in _limits_hash(harness, account).items() if k.startswith("w:a:tokens_per_minute"))
    usage = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert counted == sum(int(e["in"]) + int(e["out"]) for e in usage) <= 3000  # actual tokens, not holds
    assert passed == len(usage) and passed > 0


async def test_anthropic_routes_get_anthropic_rate_limit_headers(harness: Harness) -> None:
    _account, key = await harness.account(plan="rpm")
    body = {"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    statuses = [(await _post(harness, key, body, "/v1/messages", headers)) for _ in range(21)]
    status, error, response_headers = statuses[-1]
    assert status == 429 and error["error"]["type"] == "rate_limit_error"
    assert response_headers["anthropic-ratelimit-requests-limit"] == "20"
    assert response_headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert "retry-after" in response_headers


# ---------------------------------------------------------------- quotas and spend windows


async def test_usd_cost_cap_per_cycle(harness: Harness) -> None:
    account, key = await harness.account(plan="usdcap")
    while (result := await _post(harness, key))[0] == 200:
        pass
    status, body, _ = result
    assert status == 429 and "max_cost_usd_per_cycle" in body["error"]["message"]
    counted = _limits_hash(harness, account)["c:a:max_cost_usd_per_cycle"]
    assert counted <= 200  # micro-USD: 0.0002 USD
    await harness.assert_conserved(account)


async def test_spend_windows_refuse_the_crossing_request_and_free_up_as_they_roll(harness: Harness) -> None:
    account, key = await harness.account(plan="windows")
    while (result := await _post(harness, key))[0] == 200:
        pass
    assert "spend_5h" in result[1]["error"]["message"]
    state = await harness.assert_conserved(account)
    assert state["charged"] <= 300
    harness.shift_clock(5 * 3_600_000 + 600_000)  # the 5-hour window has rolled; the day still holds
    while (result := await _post(harness, key))[0] == 200:
        pass
    assert "spend_1d" in result[1]["error"]["message"]
    assert (await harness.assert_conserved(account))["charged"] <= 500


async def test_provider_call_quota_applies_to_that_provider_only(harness: Harness) -> None:
    account, key = await harness.account(plan="provider")
    for _ in range(5):
        assert (await _post(harness, key))[0] == 200
    status, body, _ = await _post(harness, key)
    assert status == 429 and "demo.calls_per_cycle (5 of 5 requests)" in body["error"]["message"]
    claude = {"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    assert (await _post(harness, key, claude, "/v1/messages", {"x-api-key": key}))[0] == 200
    assert _limits_hash(harness, account)["c:a:demo.calls_per_cycle"] == 5  # the refusal counted nothing


async def test_count_quotas_reset_with_the_cycle(harness: Harness) -> None:
    account, key = await harness.account(plan="quota")
    for _ in range(3):
        assert (await _post(harness, key))[0] == 200
    status, body, headers = await _post(harness, key)
    assert status == 429 and "requests_per_cycle (3 of 3 requests)" in body["error"]["message"]
    assert int(headers["Retry-After"]) > 86_400 and headers["x-should-retry"] == "false"  # frees at the reset
    harness.shift_clock(32 * DAY)
    assert (await _post(harness, key))[0] == 200
    assert _limits_hash(harness, account)["c:a:requests_per_cycle"] == 1
    await harness.assert_conserved(account)


async def test_upstream_failure_counts_in_no_limit(harness: Harness) -> None:
    account, key = await harness.account(plan="provider")
    failing = {**BODY, "messages": [{"role": "user", "content": "x [[emu fail=500]]"}]}
    for _ in range(7):
        assert (await _post(harness, key, failing))[0] == 500
    assert (await _post(harness, key))[0] == 200
    assert _limits_hash(harness, account).get("c:a:demo.calls_per_cycle") == 1


async def test_max_keys_per_account(harness: Harness) -> None:
    account, _key1 = await harness.account(plan="twokeys")
    assert (await _key(harness, account))[0] == 201
    status, body = await _key(harness, account)
    assert status == 403 and "2 active keys" in body["error"]["message"]
    keys = harness.redis.smembers(KeySchema().for_account(account).key_ids)
    revoked = sorted(k.decode() for k in keys)[0]
    async with harness.client.delete(f"/admin/keys/{revoked}", headers=ADMIN) as resp:
        assert resp.status == 200
    async with harness.client.delete(f"/admin/keys/{revoked}", headers=ADMIN) as resp:
        assert resp.status == 200  # revoking twice frees one slot, not two
    assert (await _key(harness, account))[0] == 201
    assert (await _key(harness, account))[0] == 403


async def test_concurrent_key_creation_never_exceeds_max_keys(harness: Harness) -> None:
    account, _ = await harness.account(plan="twokeys")
    results = await asyncio.gather(*(_key(harness, account) for _ in range(20)))
    assert [s for s, _ in results].count(201) == 1  # one key existed already


# ---------------------------------------------------------------- cycles and the subscription's life


def _ms(*parts: int, tz: str = "UTC") -> int:
    return int(datetime(*parts, tzinfo=ZoneInfo(tz)).timestamp() * 1000)  # type: ignore[misc]


def test_cycles_roll_month_end_anchors_to_the_last_day_and_keep_local_time_over_dst() -> None:
    ny = "America/New_York"
    anchor = _ms(2026, 1, 31, 10, 0, tz=ny)
    assert cycle_bounds(anchor, ny, _ms(2026, 2, 15, tz=ny)) == (_ms(2026, 1, 31, 10, tz=ny),
                                                                 _ms(2026, 2, 28, 10, tz=ny))
    # March 8 2026 is the DST change: the boundary stays at 10:00 local, 23 hours nearer in UTC terms
    assert cycle_bounds(anchor, ny, _ms(2026, 3, 20, tz=ny)) == (_ms(2026, 2, 28, 10, tz=ny),
                                                                 _ms(2026, 3, 31, 10, tz=ny))
    assert cycle_bounds(anchor, ny, _ms(2026, 3, 31, 9, 59, tz=ny))[1] == _ms(2026, 3, 31, 10, tz=ny)
    assert cycle_bounds(anchor, ny, _ms(2026, 3, 31, 10, tz=ny))[0] == _ms(2026, 3, 31, 10, tz=ny)
    leap = _ms(2028, 1, 30)
    assert cycle_bounds(leap, "UTC", _ms(2028, 2, 29, 12))[0] == _ms(2028, 2, 29)
    paris = "Europe/Paris"  # a start on the 31st in October, a DST change in between
    start = _ms(2026, 10, 31, 0, 30, tz=paris)
    assert cycle_bounds(start, paris, _ms(2026, 11, 29, 12, tz=paris)) == (_ms(2026, 10, 31, 0, 30, tz=paris),
                                                                          _ms(2026, 11, 30, 0, 30, tz=paris))


async def test_the_first_request_after_the_boundary_resets_the_allowance_and_cycle_counters(harness: Harness) -> None:
    account, key = await harness.account(plan="basic")
    await _post(harness, key)
    before = harness.state(account)
    assert before["allow"] < 10_000_000 and before["cycle_used"] > 0
    harness.shift_clock(32 * DAY)
    assert (await _post(harness, key))[0] == 200
    after = await harness.assert_conserved(account)
    assert after["expired"] == before["allow"]  # last cycle's unspent allowance, recorded as expired
    assert after["allow"] == 10_000_000 - after["cycle_used"]
    rec = harness.redis.hgetall(KeySchema().for_account(account).account)
    zone = ZoneInfo("America/New_York")
    start = datetime.fromtimestamp(int(rec[b"cycle_start_ms"]) / 1000, zone)
    anchor = datetime.fromtimestamp(int(rec[b"anchor_ms"]) / 1000, zone)
    assert (start.day, start.hour, start.minute) == (min(anchor.day, 28), anchor.hour, anchor.minute) or \
        start.day == anchor.day


async def test_an_account_may_have_its_own_cycle_timezone(harness: Harness) -> None:
    async with harness.client.post("/admin/accounts", json={"name": "t", "plan": "basic", "timezone": "Asia/Tokyo"},
                                   headers=ADMIN) as resp:
        view = await resp.json()
    assert resp.status == 201 and view["timezone"] == "Asia/Tokyo"
    start = datetime.fromisoformat(view["cycle_start"].replace("Z", "+00:00")).astimezone(ZoneInfo("Asia/Tokyo"))
    end = datetime.fromisoformat(view["reset_date"].replace("Z", "+00:00")).astimezone(ZoneInfo("Asia/Tokyo"))
    assert (end.hour, end.minute) == (start.hour, start.minute)  # the same local time, a month on
    async with harness.client.post("/admin/accounts", json={"name": "t", "timezone": "Mars/Olympus"},
                                   headers=ADMIN) as resp:
        assert resp.status == 400 and "Unknown timezone" in (await resp.json())["error"]["message"]


async def test_gemini_routes_get_resource_exhausted(harness: Harness) -> None:
    _account, key = await harness.account(plan="rpm")
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 5}}
    path = "/v1beta/models/demo-gemini:generateContent"
    results = [await _post(harness, key, body, path, {"x-goog-api-key": key}) for _ in range(21)]
    assert [r[0] for r in results].count(200) == 20
    status, error, headers = results[-1]
    assert status == 429 and error["error"]["status"] == "RESOURCE_EXHAUSTED" and "Retry-After" in headers


async def test_packs_are_spent_after_the_allowance_and_survive_the_reset(harness: Harness) -> None:
    account, key = await harness.account(plan="free")  # 1 credit allowance
    async with harness.client.post(f"/admin/accounts/{account}/packs", json={"pack": "small"}, headers=ADMIN) as r:
        assert r.status == 200 and (await r.json())["credits_remaining"] == "6"
    await _post(harness, key)
    state = harness.state(account)
    assert state["extra"] == 5_000_000 and state["allow"] < 1_000_000  # the allowance went first
    harness.shift_clock(32 * DAY)
    await _post(harness, key)
    state = await harness.assert_conserved(account)
    assert state["extra"] == 5_000_000 and state["allow"] < 1_000_000
    async with harness.client.post(f"/admin/accounts/{account}/packs", json={"pack": "huge"}, headers=ADMIN) as r:
        assert r.status == 400


async def test_upgrade_credits_the_difference_at_once_and_downgrade_waits_for_the_next_cycle(harness: Harness) -> None:
    account, key = await harness.account(plan="basic")  # 10 a cycle
    await _post(harness, key)
    spent = harness.state(account)["cycle_used"]
    async with harness.client.put(f"/admin/accounts/{account}/plan", json={"plan": "premium"}, headers=ADMIN) as r:
        view = await r.json()
    assert view["plan"] == "premium" and view["change"]["credited"] == "20"
    assert harness.state(account)["allow"] == 30_000_000 - spent
    assert (await _post(harness, key))[0] == 200  # the next request runs on the new plan
    async with harness.client.put(f"/admin/accounts/{account}/plan", json={"plan": "basic"}, headers=ADMIN) as r:
        view = await r.json()
    assert view["plan"] == "premium" and view["change"]["next_plan"] == "basic"
    harness.shift_clock(32 * DAY)
    await _post(harness, key)
    rec = harness.redis.hgetall(KeySchema().for_account(account).account)
    assert rec[b"plan"] == b"basic" and b"next_plan" not in rec
    state = await harness.assert_conserved(account)
    assert state["allow"] == 10_000_000 - state["cycle_used"]


async def test_an_expired_subscription_falls_back_to_the_default_plan_and_renewal_extends_it(harness: Harness
                                                                                            ) -> None:
    account, key = await harness.account(plan="free")
    # an end in the future on any day the suite runs: midnight UTC on the first of the month after next
    now = datetime.now(UTC)
    year, month = divmod(now.year * 12 + now.month - 1 + 2, 12)
    ends = datetime(year, month + 1, 1, tzinfo=UTC)
    async with harness.client.put(f"/admin/accounts/{account}/plan", headers=ADMIN,
                                  json={"plan": "premium", "expires_at": ends.isoformat()}) as r:
        assert r.status == 200
    async with harness.client.post(f"/admin/accounts/{account}/renew", json={"months": 1}, headers=ADMIN) as r:
        renewed = await r.json()
        assert r.status == 200 and renewed["plan"] == "premium"
    rec = harness.redis.hgetall(KeySchema().for_account(account).account)
    renewed_end = add_month(ends)  # renewal extends from the subscription's end, not from now
    assert int(rec[b"plan_expires_ms"]) == int(renewed_end.timestamp() * 1000)
    harness.shift_clock(int((renewed_end - now).total_seconds() * 1000) + DAY)
    assert (await _post(harness, key))[0] == 200
    rec = harness.redis.hgetall(KeySchema().for_account(account).account)
    assert rec[b"plan"] == b"free"
    await harness.assert_conserved(account)


async def test_the_cli_changes_plans_and_sells_packs(harness: Harness, config_dir: Path, redis_url: str) -> None:
    account, _ = await harness.account(plan="basic")
    env = ["--config-dir", str(config_dir), "--redis-url", redis_url, "--json"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "packs", "buy", "--account", account, "--pack", "small", *env,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "plans", "change", "--account", account, "--plan", "premium", *env,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(out)["credited"] == "20"
    assert harness.state(account)["allow"] == 30_000_000 and harness.state(account)["extra"] == 5_000_000
