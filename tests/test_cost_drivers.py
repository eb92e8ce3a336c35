"""End to end (real Redis, emulated provider): every request feature that changes the provider's
price is priced or refused, model names cannot smuggle another model, and what is reported is what
is billed (Anthropic 1-hour cache writes, Gemini JSON-array streams, embeddings)."""

from __future__ import annotations

import json
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TEST_PLANS, Harness, emulator_state
from yarl import URL

from gateway.emulator import gemini_prompt

EXTRA_ROUTES = """
  cheap-*:
    upstream: demo-gemini
    input: 0.01
    output: 0.01
    max_output_tokens: 1000
  pricey-pro:
    upstream: demo-gemini
    input: 100
    output: 100
    max_output_tokens: 1000
  tiered-gemini:                  # a long-context tier at a threshold a test can reach
    upstream: demo-gemini
    input: 0.30
    cached_input: 0.03
    output: 2.50
    max_output_tokens: 65536
    tiers:
      - {above_input_tokens: 50, input: 0.60, cached_input: 0.06, output: 5.00}
"""
SEARCH_FEES = """    tool_fees: {web_search: 0.01}
  demo-gemini:"""


@pytest.fixture
def plans_yaml() -> str:
    return TEST_PLANS.replace('models: ["demo-*", "gpt-4o-mini", "claude-*"]',
                              'models: ["demo-*", "gpt-4o-mini", "claude-*", "cheap-*", "pricey-pro", "tiered-*"]')


@pytest.fixture
def config_dir(config_dir: Path) -> Path:
    path = config_dir / "providers.yaml"
    providers = yaml.safe_load(path.read_text())
    # demo-anthropic prices web search (0.01 USD per call); demo-gemini gets the extra routes
    providers["upstreams"]["demo-anthropic"]["tool_fees"] = {"web_search": 0.01}
    text = yaml.safe_dump(providers, sort_keys=False)
    assert text.rstrip().endswith("max_output_tokens: 4096")  # the models come last: the extra routes follow
    path.write_text(text + EXTRA_ROUTES)
    return config_dir


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"max_choices": 4}


def micro(usd: Decimal) -> int:
    return int((usd * 1_000_000).to_integral_value(ROUND_CEILING))


def msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def assert_refused(harness: Harness, account: str, resp: Any, status: int = 400) -> dict[str, Any]:
    """A refusal: the status, nothing sent upstream for it, nothing held or charged."""
    assert resp.status == status, await resp.text()
    state = await harness.assert_conserved(account)
    assert state["charged"] == 0 and state["held"] == 0
    return dict(await resp.json())


# ---------------------------------------------------------------- item 4: model names in a path


async def test_an_encoded_path_in_a_gemini_model_cannot_be_priced_as_one_model_and_served_as_another(
        harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    before = emulator_state(harness.emulator).total_requests
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    for raw_path in ("/v1beta/models/cheap-x%2F..%2Fpricey-pro:generateContent",
                     "/v1beta/models/cheap-x%2Fy:generateContent", "/v1beta/models/cheap%20x:generateContent",
                     "/v1/models/cheap-x%3AstreamGenerateContent:generateContent"):
        resp = await harness.client.post(URL(raw_path, encoded=True), json=body, headers={"x-goog-api-key": key})
        error = (await assert_refused(harness, account, resp))["error"]
        assert error["status"] == "INVALID_ARGUMENT" and "model name" in error["message"]
    assert emulator_state(harness.emulator).total_requests == before
    ok = await harness.client.post("/v1beta/models/cheap-x:generateContent", json=body, headers={"x-goog-api-key": key})
    assert ok.status == 200
    assert emulator_state(harness.emulator).received[-1]["path"] == "/v1beta/models/cheap-x:generateContent"


async def test_a_model_name_with_a_slash_is_refused_in_a_body(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    resp = await harness.client.post("/v1/chat/completions", json={"model": "demo-mini/../demo-large",
                                                                   "messages": msgs("hi")},
                                     headers={"Authorization": f"Bearer {key}"})
    assert (await assert_refused(harness, account, resp))["error"]["param"] == "model"


async def test_an_org_slash_model_name_in_a_body_is_a_name_not_a_path(harness: Harness) -> None:
    # OpenAI-compatible upstreams (OpenRouter, vLLM) name models `org/model`: routed as a name (here to
    # nothing: a 404), never refused as a path, and a glob like `demo-*` does not match it
    account, key = await harness.account(credits=1)
    for model in ("meta-llama/llama-3-70b", "demo-x/mini"):
        resp = await harness.client.post("/v1/chat/completions", json={"model": model, "messages": msgs("hi")},
                                         headers={"Authorization": f"Bearer {key}"})
        assert (await assert_refused(harness, account, resp, 404))["error"]["param"] == "model"


# ---------------------------------------------------------------- item 5: completions prompt arrays


async def test_a_completions_prompt_array_is_held_for_one_completion_per_prompt(harness: Harness) -> None:
    # 100 micro-credits: the prompt plus 100 output tokens (60) for one prompt, not for three (180)
    account, key = await harness.account(credits="0.0001")
    resp = await harness.client.post("/v1/completions", json={
        "model": "demo-mini", "prompt": ["one [[emu out=100]]", "two", "three"], "max_tokens": 100},
        headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200, await resp.text()
    reply = await resp.json()
    sent = emulator_state(harness.emulator).received[-1]["body"]
    assert len(reply["choices"]) == 3 and sent["max_tokens"] < 100  # lowered to what three completions afford
    state = await harness.assert_conserved(account)
    assert 0 < state["charged"] <= 100


# ---------------------------------------------------------------- item 6: cost drivers


async def test_service_tiers_are_held_and_billed_at_their_multiplier_and_unlisted_ones_refused(
        harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    plain = await client.chat.completions.create(model="demo-large", messages=msgs("hi [[emu out=40]]"))
    base = harness.state(account)["charged"]
    priority = await client.chat.completions.create(model="demo-large", messages=msgs("hi [[emu out=40]]"),
                                                    service_tier="priority")
    assert priority.service_tier == "priority" and plain.usage == priority.usage
    assert harness.state(account)["charged"] == 3 * base  # twice the price the second time
    # `auto` is held as allowed; the tier the answer reports is the one billed (flex: half)
    flex = await client.chat.completions.create(model="demo-large", messages=msgs("hi [[emu out=40 tier=flex]]"),
                                                service_tier="auto")
    assert flex.service_tier == "flex" and flex.usage is not None
    half = micro((flex.usage.prompt_tokens * Decimal("1.25") + flex.usage.completion_tokens * 5) / 1_000_000)
    assert harness.state(account)["charged"] == 3 * base + half
    resp = await harness.client.post("/v1/chat/completions", json={
        "model": "demo-large", "messages": msgs("hi"), "service_tier": "scale"},
        headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "service_tier"
    await harness.assert_conserved(account)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/responses", {"model": "demo-mini", "input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
    ("/v1/responses", {"model": "demo-mini", "input": "hi", "tools": [{"type": "code_interpreter",
                                                                        "container": {"type": "auto"}}]}, "tools"),
    ("/v1/chat/completions", {"model": "demo-mini", "messages": msgs("hi"), "web_search_options": {}},
     "web_search_options"),
    ("/v1/responses", {"model": "demo-mini", "input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ("/v1/responses", {"model": "demo-mini", "input": "hi", "conversation": "conv_1"}, "conversation"),
])
async def test_openai_cost_drivers_without_a_configured_price_are_refused_naming_the_parameter(
        harness: Harness, path: str, body: dict[str, Any], param: str) -> None:
    account, key = await harness.account(credits=1)
    before = emulator_state(harness.emulator).total_requests
    resp = await harness.client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
    assert (await assert_refused(harness, account, resp))["error"]["param"] == param
    assert emulator_state(harness.emulator).total_requests == before


async def test_ordinary_function_tools_are_not_cost_drivers(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    resp = await harness.client.post("/v1/chat/completions", json={
        "model": "demo-mini", "messages": msgs("hi"), "tools": [tool]}, headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    assert (await harness.assert_conserved(account))["charged"] > 0


async def test_gemini_grounding_and_cached_contents_are_refused(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    contents = [{"role": "user", "parts": [{"text": "hi"}]}]
    for extra, param in (({"tools": [{"googleSearch": {}}]}, "tools"), ({"tools": [{"code_execution": {}}]}, "tools"),
                         ({"cachedContent": "cachedContents/abc"}, "cachedContent")):
        resp = await harness.client.post("/v1beta/models/demo-gemini:generateContent",
                                         json={"contents": contents, **extra}, headers={"x-goog-api-key": key})
        error = (await assert_refused(harness, account, resp))["error"]
        assert param in error["message"]


async def test_anthropic_web_search_is_held_at_max_uses_and_billed_per_reported_call(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.anthropic_sdk(key)
    search = {"type": "web_search_20250305", "name": "web_search"}
    with pytest.raises(Exception) as info:  # no bound on its calls: refused
        await client.messages.create(model="demo-claude", max_tokens=10, messages=msgs("hi"), tools=[search])
    assert getattr(info.value, "status_code", None) == 400 and "max_uses" in str(info.value)
    reply = await client.messages.create(model="demo-claude", max_tokens=10, tools=[{**search, "max_uses": 3}],
                                         messages=msgs("hi [[emu out=4 searches=2]]"))
    usage = reply.usage
    assert usage.server_tool_use is not None and usage.server_tool_use.web_search_requests == 2
    tokens = micro((usage.input_tokens * Decimal(3) + usage.output_tokens * Decimal(15)) / 1_000_000)
    assert (await harness.assert_conserved(account))["charged"] == tokens + 2 * 10_000


async def test_a_price_changing_anthropic_beta_is_refused_and_harmless_ones_pass(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    before = emulator_state(harness.emulator).total_requests
    resp = await harness.client.post("/v1/messages", json={"model": "demo-claude", "max_tokens": 5,
                                                          "messages": msgs("hi")},
                                     headers={"x-api-key": key, "anthropic-beta": "context-1m-2025-08-07"})
    error = (await assert_refused(harness, account, resp))["error"]
    assert error["type"] == "invalid_request_error" and "context-1m-2025-08-07" in error["message"]
    assert emulator_state(harness.emulator).total_requests == before
    assert not [e for e in harness.ledger(account) if e["type"] in ("released", "usage")]  # refused before any hold
    ok = await harness.client.post("/v1/messages", json={"model": "demo-claude", "max_tokens": 5,
                                                        "messages": msgs("hi")},
                                   headers={"x-api-key": key, "anthropic-beta": "token-efficient-tools-2025-02-19"})
    assert ok.status == 200


@pytest.mark.parametrize("words", [10, 60])
async def test_a_long_prompt_is_billed_at_the_routes_long_context_tier(harness: Harness, words: int) -> None:
    account, key = await harness.account(credits=1)
    body = {"contents": [{"role": "user", "parts": [{"text": " ".join(["w"] * words) + " [[emu out=5]]"}]}]}
    resp = await harness.client.post("/v1beta/models/tiered-gemini:generateContent", json=body,
                                     headers={"x-goog-api-key": key})
    assert resp.status == 200
    prompt = gemini_prompt(body)
    rate_in, rate_out = (Decimal("0.60"), Decimal("5.00")) if prompt > 50 else (Decimal("0.30"), Decimal("2.50"))
    assert (await harness.assert_conserved(account))["charged"] == micro((prompt * rate_in + 5 * rate_out) / 1_000_000)


# ---------------------------------------------------------------- items 7, 8, 9: usage as reported


async def test_anthropic_streams_bill_one_hour_cache_writes_once(harness: Harness) -> None:
    charged = []
    for stream in (False, True):
        account, key = await harness.account(credits=1)
        client = harness.anthropic_sdk(key)
        text = "a b c d e f g h i j k l m n o p [[emu cache_write=5 cache_write_1h=7 out=6]]"
        if stream:
            async with client.messages.stream(model="demo-claude", max_tokens=20, messages=msgs(text)) as s:
                await s.get_final_message()
        else:
            await client.messages.create(model="demo-claude", max_tokens=20, messages=msgs(text))
        charged.append((await harness.assert_conserved(account))["charged"])
        event = [e for e in harness.ledger(account) if e["type"] == "usage"][-1]
        assert (event["cache_write"], event["cache_write_1h"], event["estimated"]) == ("5", "7", "0")
    assert charged[0] == charged[1]


async def test_gemini_stream_without_alt_sse_is_billed_from_its_json_array(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    body = {"contents": [{"role": "user", "parts": [{"text": "a b c [[emu reasoning=40 cached=6 out=5]]"}]}]}
    resp = await harness.client.post("/v1beta/models/demo-gemini:streamGenerateContent", json=body,
                                     headers={"x-goog-api-key": key})
    assert resp.status == 200 and resp.content_type == "application/json"
    chunks = json.loads(await resp.read())
    assert isinstance(chunks, list) and chunks[-1]["usageMetadata"]["thoughtsTokenCount"] == 40
    prompt = gemini_prompt(body)
    expected = micro(((prompt - 6) * Decimal("0.30") + 6 * Decimal("0.03") + 45 * Decimal("2.50")) / 1_000_000)
    assert (await harness.assert_conserved(account))["charged"] == expected
    assert [e for e in harness.ledger(account) if e["type"] == "usage"][-1]["estimated"] == "0"


async def test_embeddings_with_reported_usage_are_not_flagged_estimated(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    await harness.sdk(key).embeddings.create(model="demo-embedding", input=["alpha beta", "gamma"])
    resp = await harness.client.post("/v1beta/models/demo-gemini-embedding:embedContent",
                                     json={"content": {"parts": [{"text": "alpha"}]}}, headers={"x-goog-api-key": key})
    assert resp.status == 200
    events = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert [(e["outcome"], e["estimated"], e["out"]) for e in events] == [("ok", "0", "0"), ("ok", "0", "0")]
    await harness.assert_conserved(account)


# ---------------------------------------------------------------- item 12: one reading of a body


async def test_a_body_with_a_duplicate_key_is_refused_before_anything_is_held(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    before = emulator_state(harness.emulator).total_requests
    raw = b'{"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000, ' \
          b'"max_tokens": 20}'
    resp = await harness.client.post("/v1/chat/completions", data=raw, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    error = (await assert_refused(harness, account, resp))["error"]
    assert error["param"] == "max_tokens" and "max_tokens" in error["message"]
    deep = await harness.client.post("/v1/messages", data=b'{"model": "demo-claude", "x": ' + b"[" * 2000
                                     + b"]" * 2000 + b"}", headers={"x-api-key": key,
                                                                   "Content-Type": "application/json"})
    assert (await assert_refused(harness, account, deep))["error"]["type"] == "invalid_request_error"
    assert emulator_state(harness.emulator).total_requests == before
