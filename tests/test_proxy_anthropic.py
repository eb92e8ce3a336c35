"""The real anthropic SDK through the gateway to the emulator: answers intact, charges exact,
errors raised as the SDK's usual exceptions, `event:` lines preserved."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

import anthropic
import pytest
from conftest import PROVIDER_KEY, Harness, emulator_state

from gateway.emulator import prompt_tokens

# demo-claude's prices in config/providers.yaml, USD per 1M tokens
IN, READ, WRITE_5M, WRITE_1H, OUT = (Decimal(p) for p in ("3", "0.30", "3.75", "6", "15"))


def expected_micro(uncached: int, read: int, write_5m: int, write_1h: int, out: int) -> int:
    usd = (uncached * IN + read * READ + write_5m * WRITE_5M + write_1h * WRITE_1H + out * OUT) / 1_000_000
    return int((usd * 1_000_000).to_integral_value(ROUND_CEILING))  # free plan: 1 credit = 1 USD


def msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_messages_non_stream_is_charged_exactly(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.anthropic_sdk(key)
    raw = await client.messages.with_raw_response.create(model="demo-claude", max_tokens=100, messages=msgs("hello"))
    message = await raw.parse()
    assert message.content[0].text.startswith("Hello from the metering gateway")
    assert message.usage.input_tokens == prompt_tokens(msgs("hello"))
    cost = expected_micro(message.usage.input_tokens, 0, 0, 0, message.usage.output_tokens)
    assert (await harness.assert_conserved(account))["charged"] == cost
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["x-credits-remaining"]


@pytest.mark.parametrize("stream", [False, True])
async def test_cache_reads_and_both_cache_writes_are_priced_at_their_own_rates(harness: Harness, stream: bool) -> None:
    account, key = await harness.account(credits=1)
    client = harness.anthropic_sdk(key)
    text = "one two three four five six seven eight nine ten eleven twelve [[emu cached=5 cache_write=4 " \
           "cache_write_1h=3 out=6]]"
    if stream:
        async with client.messages.stream(model="demo-claude", max_tokens=50, messages=msgs(text)) as s:
            final = await s.get_final_message()
        usage = final.usage
    else:
        usage = (await client.messages.create(model="demo-claude", max_tokens=50, messages=msgs(text))).usage
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (5, 7)
    total = prompt_tokens(msgs(text))
    assert usage.input_tokens == total - 12  # input_tokens excludes cache reads and writes
    cost = expected_micro(total - 12, 5, 4, 3, 6)
    assert (await harness.assert_conserved(account))["charged"] == cost
    event = [e for e in harness.ledger(account) if e["type"] == "usage"][-1]
    assert (event["cached_in"], event["cache_write"], event["cache_write_1h"], event["out"]) == ("5", "4", "3", "6")


async def test_stream_passes_event_lines_and_is_charged_exactly(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    resp = await harness.client.post("/v1/messages", json={
        "model": "demo-claude", "max_tokens": 20, "stream": True, "messages": msgs("hi [[emu out=4]]")},
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"})  # SDK 1.x style key header
    body = await resp.read()
    assert resp.status == 200
    names = [line[len(b"event: "):] for line in body.split(b"\n") if line.startswith(b"event: ")]
    assert names[0] == b"message_start" and names[-1] == b"message_stop" and b"ping" in names
    assert names.count(b"content_block_delta") == 4
    cost = expected_micro(prompt_tokens(msgs("hi [[emu out=4]]")), 0, 0, 0, 4)
    assert (await harness.assert_conserved(account))["charged"] == cost


async def test_sdk_stream_text_is_intact(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.anthropic_sdk(key)
    async with client.messages.stream(model="demo-claude", max_tokens=100, messages=msgs("hi")) as stream:
        text = "".join([t async for t in stream.text_stream])
    assert text == "Hello from the metering gateway emulator, answering with deterministic tokens for you."
    await harness.assert_conserved(account)


async def test_version_and_beta_headers_pass_through_and_keys_are_swapped(harness: Harness) -> None:
    _account, key = await harness.account(credits=1)
    client = harness.anthropic_sdk(key, default_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    await client.messages.create(model="demo-claude", max_tokens=10, messages=msgs("hi"))
    record = emulator_state(harness.emulator).received[-1]
    headers = {k.lower(): v for k, v in record["headers"].items()}
    assert headers["x-api-key"] == PROVIDER_KEY and "authorization" not in headers
    assert headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert headers["anthropic-version"] == client._client.headers.get("anthropic-version", headers["anthropic-version"])
    assert key not in repr(record)


async def test_default_version_is_added_when_missing(harness: Harness) -> None:
    _account, key = await harness.account(credits=1)
    resp = await harness.client.post("/v1/messages", json={"model": "demo-claude", "max_tokens": 5,
                                                           "messages": msgs("hi")}, headers={"x-api-key": key})
    assert resp.status == 200
    headers = {k.lower(): v for k, v in emulator_state(harness.emulator).received[-1]["headers"].items()}
    assert headers["anthropic-version"] == "2023-06-01"


async def test_errors_are_the_sdks_usual_exceptions(harness: Harness) -> None:
    account, key = await harness.account(credits=0, plan="starter")
    with pytest.raises(anthropic.AuthenticationError):
        await harness.anthropic_sdk("gwk_nope").messages.create(model="demo-claude", max_tokens=5, messages=msgs("x"))
    client = harness.anthropic_sdk(key)
    with pytest.raises(anthropic.PermissionDeniedError):  # starter allows demo-mini only
        await client.messages.create(model="demo-claude", max_tokens=5, messages=msgs("x"))
    poor, poor_key = await harness.account(credits=0)
    with pytest.raises(anthropic.APIStatusError) as info:
        await harness.anthropic_sdk(poor_key, max_retries=2).messages.create(
            model="demo-claude", max_tokens=5, messages=msgs("x"))
    assert info.value.status_code == 402 and info.value.body["error"]["type"] == "billing_error"
    with pytest.raises(anthropic.BadRequestError):
        await harness.anthropic_sdk(poor_key).messages.create(model="demo-claude", max_tokens=0, messages=msgs("x"))
    for acct in (account, poor):
        assert harness.holds(acct) == {}


async def test_upstream_error_is_passed_through_and_releases(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    with pytest.raises(anthropic.InternalServerError):
        await harness.anthropic_sdk(key).messages.create(model="demo-claude", max_tokens=5,
                                                         messages=msgs("[[emu fail=500]]"))
    assert (await harness.assert_conserved(account))["charged"] == 0


async def test_midstream_error_reaches_the_client_as_an_in_stream_error(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.anthropic_sdk(key)
    with pytest.raises(anthropic.APIStatusError, match="overload"):
        async with client.messages.stream(model="demo-claude", max_tokens=100,
                                          messages=msgs("[[emu fail=midstream out=12]]")) as stream:
            async for _ in stream:
                pass
    state = await harness.assert_conserved(account)
    event = [e for e in harness.ledger(account) if e["type"] == "usage"][-1]
    assert event["estimated"] == "1" and 0 < state["charged"] <= int(event["hold"])


async def test_cut_stream_is_reported_in_stream_and_charged_an_estimate(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    resp = await harness.client.post("/v1/messages", json={
        "model": "demo-claude", "max_tokens": 100, "stream": True, "messages": msgs("[[emu fail=cut out=20]]")},
        headers={"x-api-key": key})
    body = await resp.read()
    assert b"event: error" in body  # the gateway closed the stream with Anthropic's error event
    state = await harness.assert_conserved(account)
    event = [e for e in harness.ledger(account) if e["type"] == "usage"][-1]
    assert event["outcome"] == "upstream_cut_estimated"
    assert int(event["in"]) == prompt_tokens(msgs("[[emu fail=cut out=20]]"))  # from message_start
    assert 0 < state["charged"] <= int(event["hold"])


async def test_partial_balance_lowers_max_tokens(harness: Harness) -> None:
    account, key = await harness.account(credits="0.01")  # 10000 micro: prompt fits, 8192 * 15 does not
    message = await harness.anthropic_sdk(key).messages.create(model="demo-claude", max_tokens=8192,
                                                               messages=msgs("[[emu out=5000]]"))
    forwarded = emulator_state(harness.emulator).received[-1]["body"]["max_tokens"]
    assert 0 < forwarded < 8192 and message.usage.output_tokens == forwarded
    assert message.stop_reason == "max_tokens"
    state = await harness.assert_conserved(account)
    assert state["charged"] <= 10_000


async def test_count_tokens_is_forwarded_and_never_charged(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.anthropic_sdk(key)
    counted = await client.messages.count_tokens(model="demo-claude", messages=msgs("count these words"))
    assert counted.input_tokens == prompt_tokens(msgs("count these words"))
    state = await harness.assert_conserved(account)
    assert state["charged"] == 0 and state["requests"] == 0


async def test_models_in_anthropic_shape(harness: Harness) -> None:
    _account, key = await harness.account(credits=1)
    page = await harness.anthropic_sdk(key).models.list()
    ids = [m.id for m in page.data]
    assert "demo-claude" in ids and "demo-mini" not in ids  # only models served on this API


async def test_openai_model_on_the_anthropic_api_is_not_found(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    with pytest.raises(anthropic.NotFoundError):
        await harness.anthropic_sdk(key).messages.create(model="demo-mini", max_tokens=5, messages=msgs("x"))
    assert harness.holds(account) == {}
