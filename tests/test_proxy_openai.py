"""The real openai SDK through the gateway to the emulator: answers intact, charges exact."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

import openai
import pytest
from conftest import ADMIN_KEY, PROVIDER_KEY, SETUP_EVENTS, Harness, emulator_state, run_sync

from gateway.emulator import prompt_tokens

# demo-mini's list prices in config/providers.yaml, USD per 1M tokens
PRICE_IN, PRICE_CACHED, PRICE_OUT = Decimal("0.15"), Decimal("0.075"), Decimal("0.60")


def expected_micro(prompt: int, cached: int, out: int, credit_usd: str = "1", markup: str = "1") -> int:
    """Price table applied to usage, derived here independently of the gateway's code."""
    usd = ((prompt - cached) * PRICE_IN + cached * PRICE_CACHED + out * PRICE_OUT) / 1_000_000
    return int((usd * Decimal(markup) / Decimal(credit_usd) * 1_000_000).to_integral_value(ROUND_CEILING))


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


async def test_sync_sdk_non_stream_is_charged_exactly(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sync_sdk(key)
    raw = await run_sync(client.chat.completions.with_raw_response.create,
                         model="demo-mini", messages=messages("Say hello"))
    completion = raw.parse()
    assert completion.choices[0].message.content.startswith("Hello from the metering gateway")
    usage = completion.usage
    assert usage.prompt_tokens == prompt_tokens(messages("Say hello"))
    cost = expected_micro(usage.prompt_tokens, 0, usage.completion_tokens)
    state = await harness.assert_conserved(account)
    assert state["charged"] == cost
    assert raw.headers["x-request-id"].startswith("req_")
    assert Decimal(raw.headers["x-credits-remaining"]) == Decimal(1_000_000 - cost) / 1_000_000


async def test_async_sdk_stream_is_charged_exactly_and_hides_injected_usage(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    stream = await client.chat.completions.create(model="demo-mini", messages=messages("stream please"),
                                                  stream=True)
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "Hello from the metering gateway emulator, answering with deterministic tokens for you."
    # the client did not ask for usage: every chunk it sees has choices (client code may index [0])
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    sent = emulator_state(harness.emulator).received[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}
    cost = expected_micro(prompt_tokens(messages("stream please")), 0, 12)
    assert (await harness.assert_conserved(account))["charged"] == cost


async def test_stream_with_client_requested_usage_passes_the_usage_chunk(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    stream = await client.chat.completions.create(model="demo-mini", messages=messages("hi [[emu out=5]]"),
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    cost = expected_micro(chunks[-1].usage.prompt_tokens, 0, 5)
    assert (await harness.assert_conserved(account))["charged"] == cost


async def test_sync_sdk_stream(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sync_sdk(key)

    def consume() -> str:
        stream = client.chat.completions.create(model="demo-mini", messages=messages("x [[emu out=7]]"), stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    text = await run_sync(consume)
    assert len(text.split()) == 7
    assert (await harness.assert_conserved(account))["charged"] == expected_micro(
        prompt_tokens(messages("x [[emu out=7]]")), 0, 7)


@pytest.mark.parametrize("stream", [False, True])
async def test_cached_and_reasoning_tokens_are_priced_at_their_rates(harness: Harness, stream: bool) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    msgs = messages("a b c d e f g h i j [[emu cached=8 reasoning=30 out=4]]")
    if stream:
        async for _ in await client.chat.completions.create(model="demo-mini", messages=msgs, stream=True):
            pass
    else:
        done = await client.chat.completions.create(model="demo-mini", messages=msgs)
        assert done.usage.completion_tokens_details.reasoning_tokens == 30
    # reasoning tokens are inside completion_tokens (billed as output); cached at the cached rate
    cost = expected_micro(prompt_tokens(msgs), 8, 34)
    assert (await harness.assert_conserved(account))["charged"] == cost
    event = [e for e in harness.ledger(account) if e["type"] == "usage"][-1]
    assert (event["cached_in"], event["out"], event["reasoning"]) == ("8", "34", "30")


async def test_plan_credit_value_and_markup_apply(harness: Harness) -> None:
    account, key = await harness.account(credits=100, plan="pro")  # 1 credit = $0.01, markup 1.5
    client = harness.sdk(key)
    done = await client.chat.completions.create(model="demo-mini", messages=messages("hi"))
    cost = expected_micro(done.usage.prompt_tokens, 0, done.usage.completion_tokens, "0.01", "1.5")
    assert (await harness.assert_conserved(account))["charged"] == cost


async def test_out_of_credits_is_402_and_the_sdk_does_not_retry(harness: Harness) -> None:
    account, key = await harness.account(credits=0)
    client = harness.sync_sdk(key, max_retries=2)  # the SDK's default retries
    before = emulator_state(harness.emulator).total_requests
    with pytest.raises(openai.APIStatusError) as info:
        await run_sync(client.chat.completions.create, model="demo-mini", messages=messages("hi"))
    assert info.value.status_code == 402
    assert not isinstance(info.value, openai.RateLimitError | openai.InternalServerError)
    assert info.value.body["type"] == "insufficient_quota"
    assert info.value.body["code"] == "insufficient_credits"
    assert emulator_state(harness.emulator).total_requests == before  # never forwarded
    ledger_requests = [e for e in harness.ledger(account) if e["type"] not in SETUP_EVENTS]
    assert ledger_requests == []  # refused before any hold: nothing to record
    assert harness.holds(account) == {}


async def test_partial_balance_lowers_the_forwarded_cap_and_the_charge_fits(harness: Harness) -> None:
    # 0.0003 credits = 300 micro: the prompt bound is covered, 4096 output tokens (2458 micro) are not
    account, key = await harness.account(credits="0.0003")
    client = harness.sdk(key)
    msgs = messages("tell me a long story [[emu out=4000]]")
    raw = await client.chat.completions.with_raw_response.create(model="demo-mini", messages=msgs)
    done = raw.parse()
    forwarded = emulator_state(harness.emulator).received[-1]["body"]
    cap = forwarded["max_completion_tokens"]
    assert 0 < cap < 4096
    assert done.usage.completion_tokens == cap and done.choices[0].finish_reason == "length"
    state = await harness.assert_conserved(account)
    assert state["charged"] == expected_micro(done.usage.prompt_tokens, 0, cap)
    assert state["charged"] <= 300
    event = [e for e in harness.ledger(account) if e["type"] == "usage"][-1]
    assert event["lowered_cap"] == str(cap)


async def test_lowered_cap_is_written_to_the_field_the_client_used(harness: Harness) -> None:
    account, key = await harness.account(credits="0.0003")
    client = harness.sdk(key)
    await client.chat.completions.create(model="demo-mini", messages=messages("x"), max_tokens=4000)
    forwarded = emulator_state(harness.emulator).received[-1]["body"]
    assert "max_completion_tokens" not in forwarded and forwarded["max_tokens"] < 4000
    await harness.assert_conserved(account)


async def test_gateway_key_never_goes_upstream_and_the_provider_key_does(harness: Harness) -> None:
    _account, key = await harness.account(credits=1)
    client = harness.sdk(key, organization="org-client", project="proj-client")
    await client.chat.completions.create(model="demo-mini", messages=messages("hi"))
    async for _ in await client.chat.completions.create(model="demo-mini", messages=messages("hi"), stream=True):
        pass
    for record in list(emulator_state(harness.emulator).received)[-2:]:
        headers = {k.lower(): v for k, v in record["headers"].items()}
        assert headers["authorization"] == f"Bearer {PROVIDER_KEY}"
        assert key not in repr(record)
        assert "openai-organization" not in headers and "openai-project" not in headers
        assert ADMIN_KEY not in repr(record)


async def test_upstream_500_releases_the_whole_hold(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="demo-mini", messages=messages("[[emu fail=500]]"))
    state = await harness.assert_conserved(account)
    assert state["charged"] == 0
    assert [e["type"] for e in harness.ledger(account)] == ["account_created", "grant", "key_created", "released"]


async def test_upstream_credentials_rejected_is_a_502_not_the_clients_401(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="demo-mini", messages=messages("[[emu fail=401]]"))
    assert info.value.status_code == 502
    assert (await harness.assert_conserved(account))["charged"] == 0


async def test_upstream_connection_refused_is_502_and_releases(harness: Harness, monkeypatch: pytest.MonkeyPatch,
                                                               config_dir, redis_url, aiohttp_client) -> None:
    from conftest import Harness as H
    from conftest import make_settings

    from gateway.app import create_app
    from gateway.embedded import free_port

    monkeypatch.setenv("EMULATOR_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens there
    client = await aiohttp_client(create_app(make_settings(config_dir, redis_url)))
    h = H(client, harness.redis, harness.emulator)
    account, key = await h.account(credits=1)
    sdk = h.sdk(key)
    with pytest.raises(openai.APIStatusError) as info:
        await sdk.chat.completions.create(model="demo-mini", messages=messages("hi"))
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_error"
    assert (await h.assert_conserved(account))["charged"] == 0
    await h.close()


async def test_upstream_timeout_is_504_and_releases(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    upstream = harness.gw.config.upstreams["demo"]
    object.__setattr__(upstream, "timeout_seconds", 0.3)  # the emulator hangs with fail=hang
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="demo-mini", messages=messages("[[emu fail=hang]]"))
    assert info.value.status_code == 504
    assert (await harness.assert_conserved(account))["charged"] == 0


async def test_stream_cut_midway_charges_an_estimate_no_larger_than_the_hold(harness: Harness) -> None:
    account, key = await harness.account(credits="0.001")
    client = harness.sdk(key)
    msgs = messages("[[emu fail=cut out=40]]")
    received = []
    with pytest.raises(openai.APIError):
        async for chunk in await client.chat.completions.create(model="demo-mini", messages=msgs, stream=True):
            received.append(chunk)
    assert received  # some output got through before the cut
    state = await harness.assert_conserved(account)
    event = [e for e in harness.ledger(account) if e["type"] == "usage"][-1]
    assert event["estimated"] == "1" and event["outcome"] == "upstream_cut_estimated"
    assert 0 < state["charged"] <= int(event["hold"])
    assert int(event["out"]) >= len(received) - 1  # at least the relayed content chunks


async def test_midstream_upstream_error_reaches_the_client_as_an_api_error(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    with pytest.raises(openai.APIError, match="Emulated failure mid-stream"):
        async for _ in await client.chat.completions.create(
                model="demo-mini", messages=messages("[[emu fail=midstream]]"), stream=True):
            pass
    state = await harness.assert_conserved(account)
    assert state["charged"] > 0


async def test_client_disconnect_mid_stream_is_billed_from_the_usage_the_gateway_reads_on(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    body = {"model": "demo-mini", "stream": True, "messages": messages("[[emu out=200 delay_ms=5]]")}
    resp = await harness.client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    events = 0
    while events < 4:  # the role chunk and three words arrive, then the client goes away
        if (await resp.content.readline()).startswith(b"data:"):
            events += 1
    resp.close()
    state = await harness.assert_conserved(account)
    event = [e for e in harness.ledger(account) if e["type"] == "usage"][-1]
    # the upstream was read to its end after the client left: the provider's own usage is billed
    assert event["outcome"] == "client_disconnected" and event["estimated"] == "0"
    assert int(event["out"]) == 200 and state["charged"] == int(event["cost"]) > 0


async def test_client_disconnect_before_any_output_is_still_charged(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    body = {"model": "demo-mini", "stream": True, "messages": messages("[[emu out=20 delay_ms=20]]")}
    resp = await harness.client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    resp.close()
    state = await harness.assert_conserved(account)
    ended = [e for e in harness.ledger(account) if e["type"] in ("usage", "released")]
    assert [e["type"] for e in ended] == ["usage"]  # ended exactly once, and charged: the upstream served it
    assert (ended[0]["outcome"], ended[0]["estimated"]) == ("client_disconnected", "0")  # read on, not cut short
    assert int(ended[0]["in"]) > 0 and int(ended[0]["out"]) == 20 and state["charged"] > 0


async def test_models_lists_what_the_plan_allows(harness: Harness) -> None:
    _account, key = await harness.account(credits=1, plan="starter")
    client = harness.sdk(key)
    ids = [m.id async for m in client.models.list()]
    assert ids == ["demo-mini"]
    assert (await client.models.retrieve("demo-mini")).id == "demo-mini"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-4o")


async def test_model_outside_the_plan_is_403(harness: Harness) -> None:
    account, key = await harness.account(credits=1, plan="starter")
    client = harness.sdk(key)
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client.chat.completions.create(model="demo-large", messages=messages("hi"))
    assert info.value.body["code"] == "model_not_allowed"
    assert harness.holds(account) == {}


# ---------------------------------------------------------------- completions, embeddings, responses


def expected_for(usage_in: int, cached: int, out: int, price_in: str, price_cached: str, price_out: str) -> int:
    usd = ((usage_in - cached) * Decimal(price_in) + cached * Decimal(price_cached) + out * Decimal(price_out))
    return int((usd / 1_000_000 * 1_000_000).to_integral_value(ROUND_CEILING))


@pytest.mark.parametrize("stream", [False, True])
async def test_legacy_completions_are_charged_exactly(harness: Harness, stream: bool) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    prompt = "Write a tagline [[emu out=6]]"
    if stream:
        chunks = [c async for c in await client.completions.create(model="demo-mini", prompt=prompt, max_tokens=10,
                                                                   stream=True)]
        text = "".join(c.choices[0].text for c in chunks)
        assert all(c.choices for c in chunks)  # the injected usage chunk stays hidden
        assert emulator_state(harness.emulator).received[-1]["body"]["stream_options"] == {"include_usage": True}
    else:
        completion = await client.completions.create(model="demo-mini", prompt=prompt, max_tokens=10)
        text = completion.choices[0].text
        assert completion.usage is not None and completion.usage.completion_tokens == 6
    assert len(text.split()) == 6
    prompt_count = len(prompt.split()) + 1  # the emulator's count for a completion prompt
    state = await harness.assert_conserved(account)
    assert state["charged"] == expected_micro(prompt_count, 0, 6)
    [event] = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert event["endpoint"] == "completions" and event["out"] == "6"


async def test_completions_without_max_tokens_hold_the_apis_default_of_16(harness: Harness) -> None:
    # 30 micro-credits cover the prompt bound plus 16 output tokens, far from the model's 4096 ceiling
    account, key = await harness.account(credits="0.00003")
    client = harness.sdk(key)
    completion = await client.completions.create(model="demo-mini", prompt="go on [[emu out=40]]")
    assert "max_tokens" not in emulator_state(harness.emulator).received[-1]["body"]  # held 16: nothing lowered
    assert completion.usage is not None and completion.usage.completion_tokens == 16  # the API's default cap
    assert completion.choices[0].finish_reason == "length"
    await harness.assert_conserved(account)


@pytest.mark.parametrize("encoding", ["float", "base64", None])
async def test_embeddings_in_both_encodings_are_charged_for_input_only(harness: Harness, encoding: str | None) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    options = {} if encoding is None else {"encoding_format": encoding}
    result = await client.embeddings.create(model="demo-embedding", input=["one two three", "four five"], **options)
    sent = emulator_state(harness.emulator).received[-1]["body"]
    # the SDK asks for base64 unless told otherwise, and decodes it; the gateway forwards the choice as is
    assert sent.get("encoding_format") == (encoding or "base64")
    if encoding == "base64":
        assert isinstance(result.data[0].embedding, str)  # the caller asked for base64 and gets it, untouched
    else:
        assert [e.embedding for e in result.data] == [[0.25, -0.5, 1.0]] * 2
    assert result.usage.prompt_tokens == 5
    state = await harness.assert_conserved(account)
    assert state["charged"] == expected_for(5, 0, 0, "0.02", "0.02", "0")
    [event] = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert event["endpoint"] == "embeddings" and event["out"] == "0"


async def test_embeddings_body_reaches_the_client_byte_for_byte(harness: Harness) -> None:
    _account, key = await harness.account(credits=1)
    body = {"model": "demo-embedding", "input": "hello there", "encoding_format": "base64"}
    direct = await harness.emulator_post("/v1/embeddings", body)
    async with harness.client.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
        assert await resp.read() == direct


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_api_is_charged_with_reasoning_and_cached_tokens(harness: Harness, stream: bool) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    prompt = "Think it over [[emu out=5 reasoning=7 cached=2]]"
    if stream:
        events = [e async for e in await client.responses.create(model="demo-mini", input=prompt, stream=True,
                                                                 max_output_tokens=100)]
        assert events[0].type == "response.created" and events[-1].type == "response.completed"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        usage = events[-1].response.usage
    else:
        response = await client.responses.create(model="demo-mini", input=prompt, max_output_tokens=100)
        text, usage = response.output_text, response.usage
    assert len(text.split()) == 5
    assert usage is not None and usage.output_tokens == 12 and usage.output_tokens_details.reasoning_tokens == 7
    assert usage.input_tokens_details.cached_tokens == 2
    state = await harness.assert_conserved(account)
    assert state["charged"] == expected_micro(usage.input_tokens, 2, 12)
    [event] = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert (event["endpoint"], event["reasoning"], event["cached_in"]) == ("responses", "7", "2")


async def test_responses_api_cap_is_lowered_to_what_the_balance_affords(harness: Harness) -> None:
    account, key = await harness.account(credits="0.0001")  # 100 micro: about 160 output tokens of demo-mini
    client = harness.sdk(key)
    response = await client.responses.create(model="demo-mini", input="long answer [[emu out=400]]",
                                             max_output_tokens=1000)
    sent = emulator_state(harness.emulator).received[-1]["body"]
    assert 0 < sent["max_output_tokens"] < 1000
    assert response.status == "incomplete"
    state = await harness.assert_conserved(account)
    assert 0 < state["charged"] <= 100
