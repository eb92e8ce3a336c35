"""Prices that are not USD per token: per-call APIs through /tools/, and plans priced in credits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import PROVIDER_KEY, TEST_PLANS, Harness, emulator_state, providers_yaml
from test_proxy_openai import expected_micro

from gateway.config import ConfigError, load_config
from gateway.emulator import prompt_tokens

PLANS = TEST_PLANS.replace('"demo-*", "gpt-4o-mini"', '"demo-*", "gpt-4o-mini", "serper"') + """
  calls:                       # fixed credits per call, whatever the tokens
    monthly_credits: 0
    models: ["demo-*"]
    pricing:
      demo-mini: {credits_per_call: 2}
      demo-search: {credits_per_call: 0.5}
  tokens:                      # N tokens per credit instead of USD prices
    monthly_credits: 0
    models: ["demo-*"]
    pricing:
      "demo-*": {tokens_per_credit: 1000, output_tokens_per_credit: 250}
"""
SEARCH = "/tools/demo-search/search"
SEARCH_MICRO = 1000  # demo-search: USD 0.001 per call, one credit = 1 USD on the free plan


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


async def _search(harness: Harness, key: str | None, q: str = "metering", path: str = SEARCH
                  ) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with harness.client.post(path, json={"q": q}, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_per_call_api_is_forwarded_untouched_and_charged_its_price(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    direct = await harness.emulator_post_with_header("/search", {"q": "metering"}, {"X-API-KEY": PROVIDER_KEY})
    async with harness.client.post(SEARCH + "?gl=us", json={"q": "metering"},
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
        assert await resp.read() == direct
        assert resp.headers["x-request-id"].startswith("req_")
    received = emulator_state(harness.emulator).received[-1]
    assert received["path"] == "/search" and received["query"] == {"gl": "us"}
    headers = {name.lower(): value for name, value in received["headers"].items()}
    assert headers["x-api-key"] == PROVIDER_KEY  # the operator's key, in the API's own header
    assert "authorization" not in headers and key not in str(headers)
    state = await harness.assert_conserved(account)
    assert state["charged"] == SEARCH_MICRO
    [event] = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert (event["route"], event["endpoint"], event["cost"]) == ("demo-search", "call", str(SEARCH_MICRO))


async def test_failed_call_is_free_and_its_error_is_passed_back(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    status, body = await _search(harness, key, q="fail")
    assert status == 500 and body["message"] == "Emulated search failure."
    assert (await harness.assert_conserved(account))["charged"] == 0


async def test_per_call_refusals(harness: Harness) -> None:
    account, key = await harness.account(credits="0.0005")  # less than one call
    status, body = await _search(harness, key)
    assert status == 402 and body["error"]["type"] == "insufficient_credits"
    assert (await _search(harness, None))[0] == 401
    assert (await _search(harness, key, path="/tools/no-such-tool/search"))[0] == 404
    _, pro_key = await harness.account(credits=1, plan="starter")  # its plan lists demo-mini only
    assert (await _search(harness, pro_key))[0] == 403
    assert (await _search(harness, key, path="/tools/demo-mini/search"))[0] == 404  # a token model, not a tool
    assert (await harness.assert_conserved(account))["charged"] == 0
    assert emulator_state(harness.emulator).total_requests == 0


async def test_concurrent_calls_never_exceed_the_balance(harness: Harness) -> None:
    account, key = await harness.account(credits="0.0035")  # three calls and a half
    statuses = await asyncio.gather(*(_search(harness, key) for _ in range(30)))
    assert sorted(s for s, _ in statuses).count(200) == 3
    state = await harness.assert_conserved(account)
    assert state["charged"] == 3 * SEARCH_MICRO


async def test_plan_with_fixed_credits_per_call(harness: Harness) -> None:
    account, key = await harness.account(credits=10, plan="calls")
    client = harness.sdk(key)
    for text in ("short", "a much longer question [[emu out=40]]"):
        await client.chat.completions.create(model="demo-mini", messages=[{"role": "user", "content": text}])
    assert (await _search(harness, key))[0] == 200
    state = await harness.assert_conserved(account)
    assert state["charged"] == 2 * 2_000_000 + 500_000  # two chats at 2 credits, one search at 0.5


async def test_plan_with_tokens_per_credit(harness: Harness) -> None:
    account, key = await harness.account(credits=100, plan="tokens")
    client = harness.sdk(key)
    messages = [{"role": "user", "content": "count me [[emu out=9 cached=2]]"}]
    completion = await client.chat.completions.create(model="demo-mini", messages=messages)
    assert completion.usage is not None and completion.usage.completion_tokens == 9
    prompt = prompt_tokens(messages)
    state = await harness.assert_conserved(account)
    # 1,000 tokens per credit (cached ones too) = 1,000 micro-credits a token; output 250 per credit = 4,000
    assert state["charged"] == prompt * 1000 + 9 * 4000


async def test_usd_priced_plan_is_unchanged_by_other_plans_pricing(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    messages = [{"role": "user", "content": "hi [[emu out=3]]"}]
    await client.chat.completions.create(model="demo-mini", messages=messages)
    assert (await harness.assert_conserved(account))["charged"] == expected_micro(prompt_tokens(messages), 0, 3)


@pytest.mark.parametrize(("pricing", "problem"), [
    ('{"demo-mini": {credits_per_call: -1}}', "plans.p.pricing.demo-mini.credits_per_call: must be zero or more"),
    ('{"demo-mini": {output_tokens_per_credit: 5}}', "tokens_per_credit: is required"),
    ('{"demo-mini": {tokens_per_credit: 0}}', "tokens_per_credit: must be a positive number"),
    ('{"nothing-*": {credits_per_call: 1}}', "plans.p.pricing.nothing-*: 'nothing-*' matches no model"),
    ('{"demo-mini": {per_token: 1}}', "plans.p.pricing.demo-mini.per_token: unknown key"),
    ('{"demo-mini": {credits_per_call: 0.0000001}}', "at most 6 decimal places"),
])
def test_invalid_plan_pricing_is_rejected_with_its_path(tmp_path: Path, pricing: str, problem: str) -> None:
    (tmp_path / "providers.yaml").write_text(providers_yaml())
    (tmp_path / "plans.yaml").write_text(f"default_plan: p\nplans:\n  p:\n    monthly_credits: 1\n"
                                         f"    models: ['demo-*']\n    pricing: {pricing}\n")
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path)
    assert problem in str(error.value)


def test_pass_through_entries_take_a_per_request_price_only(tmp_path: Path) -> None:
    text = providers_yaml().replace(
        "  demo-search:\n    upstream: demo-search\n", "  demo-search:\n    upstream: demo-search\n    output: 1\n")
    (tmp_path / "providers.yaml").write_text(text)
    (tmp_path / "plans.yaml").write_text("default_plan: p\nplans:\n  p:\n    monthly_credits: 1\n"
                                         "    models: ['demo-*']\n")
    with pytest.raises(ConfigError, match=r"models\.demo-search\.output: an http pass-through entry is priced per"):
        load_config(tmp_path)


async def test_get_calls_pass_through_with_their_query(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    async with harness.client.get(SEARCH + "?q=by-get", headers={"x-api-key": key}) as resp:
        assert resp.status == 200
        assert (await resp.json())["searchParameters"]["q"] == "by-get"
    assert emulator_state(harness.emulator).received[-1]["query"] == {"q": "by-get"}
    assert (await harness.assert_conserved(account))["charged"] == SEARCH_MICRO
