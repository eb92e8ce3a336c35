"""Issue 11, item 10: an unpaid or unauthenticated caller cannot make the gateway work for it.

Large bodies from accounts that cannot pay are refused before they are parsed; a usage page and a
cycle summary read a bounded number of ledger entries; token counting is admitted like a metered
call (credits left, request-rate limits) though never charged; unknown keys are remembered for a few
seconds and an address that keeps failing is throttled.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import ADMIN, Harness, emulator_state

from gateway import ledger
from gateway.auth import FailedAuthThrottle, client_address
from gateway.errors import InsufficientCredits
from gateway.keys import KeySchema
from gateway.money import MICRO


def _flood(size: int) -> bytes:
    """A chat body of about `size` bytes whose messages are `[{},{},…]`: cheap to send, dear to parse."""
    count = size // 3
    return b'{"model":"demo-mini","messages":[' + b",".join([b"{}"] * count) + b"]}"


class _ParseSpy:
    def __init__(self, harness: Harness, dialect: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        target = harness.gw.dialects[dialect]
        original = target.parse_request

        def spy(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(target, "parse_request", spy)


# ---------------------------------------------------------------- large bodies before parsing


async def test_a_large_body_from_an_account_that_cannot_pay_its_prompt_is_refused_unparsed(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    account, key = await harness.account(credits="0.001")
    spy = _ParseSpy(harness, "openai", monkeypatch)
    before = harness.state(account)
    resp = await harness.client.post("/v1/chat/completions", data=_flood(900 * 1024),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert resp.status == 402, await resp.text()
    assert (await resp.json())["error"]["type"] == "insufficient_quota"
    assert spy.calls == 0
    assert harness.state(account) == before


async def test_an_account_that_can_pay_the_prompt_floor_still_gets_its_body_parsed(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    _account, key = await harness.account(credits=1)
    spy = _ParseSpy(harness, "openai", monkeypatch)
    resp = await harness.client.post("/v1/chat/completions", data=_flood(256 * 1024),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()  # parsed, held, forwarded and charged as usual
    assert spy.calls == 1


async def test_precheck_refuses_only_below_the_cheapest_prompt_rate(harness: Harness) -> None:
    gw = harness.gw
    assert gw.auth is not None
    account, key = await harness.account(credits="0.01")
    principal = await gw.auth.authenticate(key)
    floor = gw.auth.prompt_rate_floor(gw.config, "free", "openai")
    # demo-embedding's input price (0.02 USD per 1M tokens) at the demo upstream's flex tier (x 0.5)
    assert floor == gw.config.rates("free", gw.config.route("demo-embedding")).input // 2 == 10_000  # type: ignore
    affordable = 10_000 * MICRO // floor  # bytes whose prompt floor is exactly the balance
    await gw.auth.precheck(principal, "openai", affordable, gw.config)
    with pytest.raises(InsufficientCredits):
        await gw.auth.precheck(principal, "openai", affordable + 100, gw.config)
    await gw.auth.precheck(principal, "http", 5 * 1024 * 1024, gw.config)  # per-call prices: no floor
    await gw.auth.precheck(principal, "openai", 1000, gw.config)  # small bodies: no round trip, no refusal
    assert harness.state(account)["held"] == 0


async def test_precheck_refuses_an_account_with_nothing_left_and_stands_aside_at_a_cycle_end(
        harness: Harness) -> None:
    gw = harness.gw
    assert gw.auth is not None
    account, key = await harness.account(credits=0, plan="starter")
    principal = await gw.auth.authenticate(key)
    keys = KeySchema().for_account(account)
    harness.redis.hset(keys.account, mapping={"allow": 0, "extra": 0})
    with pytest.raises(InsufficientCredits):
        await gw.auth.precheck(principal, "openai", 64 * 1024, gw.config)
    # the cycle has ended: the next reserve credits the new allowance, so the precheck must not refuse
    harness.redis.hset(keys.account, "cycle_end_ms", 1)
    await gw.auth.precheck(principal, "openai", 64 * 1024, gw.config)


# ---------------------------------------------------------------- bounded usage reads


def _fill_ledger(harness: Harness, account: str, n: int, model_every: int = 0) -> None:
    keys = KeySchema().for_account(account)
    pipe = harness.redis.pipeline(transaction=False)
    for i in range(n):
        model = "rare-model" if model_every and i % model_every == model_every - 1 else "demo-mini"
        pipe.xadd(keys.ledger, {"type": "usage", "ts": 1, "rid": f"req_{i}", "key_id": "k", "cost": 1, "hold": 1,
                                "uncollected": 0, "data": json.dumps({"model": model, "upstream": "demo"})})
    pipe.execute()


async def test_a_usage_filter_that_matches_nothing_answers_an_empty_page_with_a_cursor(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    _fill_ledger(harness, account, 5000)
    auth = {"Authorization": f"Bearer {key}"}
    resp = await harness.client.get("/gateway/usage?model=nonexistent&limit=10", headers=auth)
    page = await resp.json()
    assert resp.status == 200 and page["data"] == []
    assert page["has_more"] and page["next_cursor"]  # the scan stopped at its budget
    pages = 1
    while page["has_more"]:
        resp = await harness.client.get(f"/gateway/usage?model=nonexistent&limit=10&cursor={page['next_cursor']}",
                                        headers=auth)
        page = await resp.json()
        assert page["data"] == []
        pages += 1
    assert pages <= 5000 // ledger.SCAN_MAX + 2


async def test_paging_with_a_bounded_scan_still_finds_every_matching_event(harness: Harness,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger, "SCAN_MAX", 50)
    account, key = await harness.account(credits=1)
    _fill_ledger(harness, account, 700, model_every=7)
    found, cursor = [], ""
    while True:
        resp = await harness.client.get(f"/gateway/usage?model=rare-model&limit=3{cursor}",
                                        headers={"Authorization": f"Bearer {key}"})
        page = await resp.json()
        found += [e["id"] for e in page["data"]]
        if not page["has_more"]:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert found == [f"req_{i}" for i in range(700) if i % 7 == 6]


async def test_the_cycle_summary_reads_a_bounded_number_of_entries_and_says_so(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    account, key = await harness.account(credits=1)
    _fill_ledger(harness, account, 300)
    auth = {"Authorization": f"Bearer {key}"}
    whole = await (await harness.client.get("/gateway/usage/summary", headers=auth)).json()
    assert whole["truncated"] is False and whole["totals"]["requests"] == 300
    monkeypatch.setattr(ledger, "SUMMARY_SCAN_MAX", 100)
    cut = await (await harness.client.get("/gateway/usage/summary", headers=auth)).json()
    assert cut["truncated"] is True and cut["summed_through"]
    assert cut["totals"]["requests"] < 100  # the account's own set-up events are read too
    admin = await (await harness.client.get(f"/admin/accounts/{account}/usage/summary", headers=ADMIN)).json()
    assert admin["truncated"] is True


# ---------------------------------------------------------------- token counting


def _count_anthropic(harness: Harness, key: str) -> Any:
    return harness.client.post("/v1/messages/count_tokens",
                               headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                               json={"model": "demo-claude", "messages": [{"role": "user", "content": "hi"}]})


def _count_gemini(harness: Harness, key: str) -> Any:
    return harness.client.post("/v1beta/models/demo-gemini:countTokens", headers={"x-goog-api-key": key},
                               json={"contents": [{"parts": [{"text": "hi"}]}]})


@pytest.mark.parametrize("count", [_count_anthropic, _count_gemini], ids=["anthropic", "gemini"])
async def test_token_counting_is_refused_when_the_account_has_no_credits(harness: Harness, count: Any) -> None:
    account, key = await harness.account(credits=0)
    before = emulator_state(harness.emulator).total_requests
    resp = await count(harness, key)
    assert resp.status == 402, await resp.text()
    assert emulator_state(harness.emulator).total_requests == before  # the provider's quota is untouched
    await harness.gw.quiesce()
    assert harness.holds(account) == {}


@pytest.mark.parametrize("count", [_count_anthropic, _count_gemini], ids=["anthropic", "gemini"])
async def test_token_counting_counts_in_the_keys_request_rate_and_stays_free(harness: Harness, count: Any) -> None:
    account, _ = await harness.account(credits=1)
    resp = await harness.client.post(f"/admin/accounts/{account}/keys", headers=ADMIN,
                                     json={"label": "counted", "limits": {"requests_per_minute": 2}})
    key = (await resp.json())["key"]
    for _ in range(2):
        resp = await count(harness, key)
        assert resp.status == 200, await resp.text()
        assert resp.headers["x-credits-remaining"] == "1"
    await harness.gw.quiesce()
    resp = await count(harness, key)
    assert resp.status == 429, await resp.text()
    assert int(resp.headers["Retry-After"]) >= 1
    state = await harness.assert_conserved(account)
    assert state["charged"] == 0 and state["requests"] == 0
    released = [e for e in harness.ledger(account) if e["type"] == "released"]
    assert len(released) == 2 and {e["reason"] for e in released} == {"count_tokens"}


async def test_token_counting_still_checks_the_key_live(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    resp = await harness.client.get(f"/admin/accounts/{account}/keys", headers=ADMIN)
    key_id = (await resp.json())["data"][0]["id"]
    assert (await _count_anthropic(harness, key)).status == 200
    await harness.client.delete(f"/admin/keys/{key_id}", headers=ADMIN)
    assert (await _count_anthropic(harness, key)).status == 401  # the auth cache cannot keep it alive
    await harness.gw.quiesce()
    assert harness.holds(account) == {}


# ---------------------------------------------------------------- failed authentications


async def test_an_unknown_key_is_remembered_as_invalid_for_a_few_seconds(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = 0
    original = harness.gw.redis.get

    async def counting_get(name: str) -> Any:
        nonlocal lookups
        if ":keyhash:" in name:
            lookups += 1
        return await original(name)

    monkeypatch.setattr(harness.gw.redis, "get", counting_get)
    for _ in range(5):
        resp = await harness.client.get("/gateway/credits", headers={"Authorization": "Bearer gwk_not_a_real_key"})
        assert resp.status == 401
    assert lookups == 1


async def test_an_address_with_too_many_failed_authentications_is_throttled(harness: Harness) -> None:
    _account, good = await harness.account(credits=1)
    assert (await harness.client.get("/gateway/credits", headers={"Authorization": f"Bearer {good}"})).status == 200
    statuses = []
    for i in range(25):
        resp = await harness.client.get("/gateway/credits", headers={"Authorization": f"Bearer gwk_guess_{i}"})
        statuses.append(resp.status)
    assert statuses[:20] == [401] * 20
    assert set(statuses[20:]) == {429}
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert "error" in await resp.json()
    # a key this process already knows keeps working from the same (perhaps shared) address
    assert (await harness.client.get("/gateway/credits", headers={"Authorization": f"Bearer {good}"})).status == 200
    # token counting goes through the same throttle
    resp = await harness.client.post("/v1/messages/count_tokens", headers={"x-api-key": "gwk_guess_x"},
                                     json={"model": "demo-claude", "messages": []})
    assert resp.status == 429


def test_the_throttle_window_block_and_memory_are_bounded() -> None:
    throttle = FailedAuthThrottle(limit=3, window=10.0, block=5.0, size=2)
    for t in (0.0, 1.0):
        throttle.failed("a", t)
    assert throttle.blocked_for("a", 2.0) == 0
    throttle.failed("a", 11.0)  # a new window: the count starts again
    assert throttle.blocked_for("a", 11.0) == 0
    throttle.failed("a", 12.0)
    throttle.failed("a", 13.0)
    assert throttle.blocked_for("a", 13.0) == 5.0
    assert throttle.blocked_for("a", 18.5) == 0
    throttle.failed("b", 20.0)
    throttle.failed("c", 20.0)
    assert throttle.blocked_for("a", 20.0) == 0 and len(throttle._strikes) == 2


def test_client_addresses_are_counted_per_ipv4_host_and_per_ipv6_64() -> None:
    assert client_address("203.0.113.7") == "203.0.113.7"
    assert client_address("2001:db8:1:2:aaaa::1") == client_address("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_address("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_address(None) is None and client_address("") is None
