"""The real google-genai SDK through the gateway to the emulator, on the v1 and v1beta paths:
answers intact, charges exact (thinking and cached tokens included), errors as the SDK's own."""

from __future__ import annotations

import logging
from decimal import ROUND_CEILING, Decimal

import pytest
from conftest import PROVIDER_KEY, Harness, emulator_state
from google.genai import errors, types

from gateway.emulator import gemini_prompt

IN, CACHED, OUT, EMBED = Decimal("0.30"), Decimal("0.03"), Decimal("2.50"), Decimal("0.15")  # USD per 1M


def expected_micro(prompt: int, cached: int, out: int, rate_in: Decimal = IN) -> int:
    usd = ((prompt - cached) * rate_in + cached * CACHED + out * OUT) / 1_000_000
    return int((usd * 1_000_000).to_integral_value(ROUND_CEILING))


def body_of(text: str) -> dict:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


@pytest.mark.parametrize("version", [None, "v1beta"])  # None: the SDK's default (v1 in 3.x)
async def test_generate_content_is_charged_exactly(harness: Harness, version: str | None) -> None:
    account, key = await harness.account(credits=1)
    client = harness.genai_client(key, version)
    reply = await client.aio.models.generate_content(model="demo-gemini", contents="say hello")
    assert reply.text.startswith("Hello from the metering gateway")
    path = emulator_state(harness.emulator).received[-1]["path"]
    assert path == f"/{version or 'v1'}/models/demo-gemini:generateContent"
    usage = reply.usage_metadata
    cost = expected_micro(usage.prompt_token_count, 0, usage.candidates_token_count)
    assert (await harness.assert_conserved(account))["charged"] == cost


@pytest.mark.parametrize("stream", [False, True])
async def test_thinking_and_cached_tokens_are_billed(harness: Harness, stream: bool) -> None:
    account, key = await harness.account(credits=1)
    client = harness.genai_client(key)
    text = "a b c d e f g h [[emu reasoning=40 cached=6 out=5]]"
    if stream:
        chunks = [c async for c in await client.aio.models.generate_content_stream(model="demo-gemini",
                                                                                   contents=text)]
        usage = chunks[-1].usage_metadata
        assert "".join(c.text or "" for c in chunks).split() == ["Hello", "from", "the", "metering", "gateway"]
    else:
        usage = (await client.aio.models.generate_content(model="demo-gemini", contents=text)).usage_metadata
    assert (usage.thoughts_token_count, usage.cached_content_token_count, usage.candidates_token_count) == (40, 6, 5)
    prompt = gemini_prompt(body_of(text))
    assert (await harness.assert_conserved(account))["charged"] == expected_micro(prompt, 6, 45)


async def test_stream_bytes_pass_untouched(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    resp = await harness.client.post("/v1beta/models/demo-gemini:streamGenerateContent?alt=sse",
                                     json=body_of("hi [[emu out=3]]"), headers={"x-goog-api-key": key})
    raw = await resp.read()
    assert resp.status == 200 and raw.count(b"data: ") == 3 and b"\r\n\r\n" in raw
    assert emulator_state(harness.emulator).received[-1]["query"] == {"alt": "sse"}
    await harness.assert_conserved(account)


async def test_output_cap_is_lowered_to_what_the_balance_affords(harness: Harness) -> None:
    account, key = await harness.account(credits="0.002")  # 2000 micro; 65536 output tokens cost 163840
    client = harness.genai_client(key)
    config = types.GenerateContentConfig(max_output_tokens=65536)
    reply = await client.aio.models.generate_content(model="demo-gemini", contents="[[emu out=5000]]", config=config)
    sent = emulator_state(harness.emulator).received[-1]["body"]["generationConfig"]["maxOutputTokens"]
    assert 0 < sent < 65536 and reply.usage_metadata.candidates_token_count == sent
    assert (await harness.assert_conserved(account))["charged"] <= 2000


async def test_count_tokens_is_free_and_embeddings_are_charged(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.genai_client(key, "v1beta")
    counted = await client.aio.models.count_tokens(model="demo-gemini", contents="count these words")
    assert counted.total_tokens == gemini_prompt(body_of("count these words"))
    assert harness.state(account)["charged"] == 0
    embedded = await client.aio.models.embed_content(model="demo-gemini-embedding", contents=["alpha beta", "gamma"])
    sent = emulator_state(harness.emulator).received[-1]
    assert sent["path"].endswith(":batchEmbedContents")
    assert len(embedded.embeddings) == len(sent["body"]["requests"])
    state = await harness.assert_conserved(account)
    assert state["charged"] == expected_micro(3, 0, 0, EMBED)  # three words, input only
    assert state["requests"] == 1


async def test_models_list_in_gemini_shape(harness: Harness) -> None:
    _account, key = await harness.account(credits=1)
    names = [m.name async for m in await harness.genai_client(key).aio.models.list()]
    assert "models/demo-gemini" in names
    assert "models/demo-claude" not in names and "models/demo-mini" not in names


async def test_errors_are_client_and_server_errors(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    with pytest.raises(errors.ClientError) as info:
        await harness.genai_client("gwk_bad").aio.models.generate_content(model="demo-gemini", contents="x")
    assert info.value.code == 401 and info.value.status == "UNAUTHENTICATED"
    _poor, poor_key = await harness.account(credits=0)
    with pytest.raises(errors.ClientError) as info:
        await harness.genai_client(poor_key).aio.models.generate_content(model="demo-gemini", contents="x")
    assert info.value.code == 402
    _starter, starter_key = await harness.account(credits=1, plan="starter")
    with pytest.raises(errors.ClientError) as info:
        await harness.genai_client(starter_key).aio.models.generate_content(model="demo-gemini", contents="x")
    assert info.value.code == 403 and info.value.status == "PERMISSION_DENIED"
    with pytest.raises(errors.ServerError):
        await harness.genai_client(key).aio.models.generate_content(model="demo-gemini", contents="[[emu fail=503]]")
    assert (await harness.assert_conserved(account))["charged"] == 0


async def test_midstream_failure_is_raised_by_the_sdk(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.genai_client(key)
    with pytest.raises(errors.APIError):
        async for _ in await client.aio.models.generate_content_stream(
                model="demo-gemini", contents="[[emu fail=midstream out=10]]"):
            pass
    state = await harness.assert_conserved(account)
    assert state["charged"] > 0


async def test_key_in_the_query_never_goes_upstream_nor_into_logs_or_metrics(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    account, key = await harness.account(credits=1)
    resp = await harness.client.post(f"/v1beta/models/demo-gemini:generateContent?key={key}",
                                     json=body_of("hello"))
    assert resp.status == 200
    record = emulator_state(harness.emulator).received[-1]
    assert record["query"] == {} and key not in repr(record)
    assert record["headers"]["x-goog-api-key"] == PROVIDER_KEY
    bad = await harness.client.post(f"/v1beta/models/demo-gemini:generateContent?key={key}x", json=body_of("x"))
    assert bad.status == 401 and key not in await bad.text()
    metrics = await (await harness.client.get("/metrics")).text()
    assert key not in caplog.text and key not in metrics
    await harness.assert_conserved(account)


async def test_only_the_query_parameters_a_dialect_needs_are_forwarded(harness: Harness) -> None:
    # `alt=proto`, `fields` or a field mask could strip usageMetadata from the answer the bill is read from
    _account, key = await harness.account(credits=1)
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    for path in ("/v1beta/models/demo-gemini:generateContent?alt=proto&fields=candidates",
                 "/v1beta/models/demo-gemini:streamGenerateContent?alt=sse&fields=candidates&$fields=x"):
        async with harness.client.post(path, json=body, headers={"x-goog-api-key": key,
                                                                 "X-Goog-FieldMask": "candidates"}) as resp:
            assert resp.status == 200
            await resp.read()
        seen = emulator_state(harness.emulator).received[-1]
        assert seen["query"] == ({"alt": "sse"} if "stream" in path else {})
        assert "x-goog-fieldmask" not in {h.lower() for h in seen["headers"]}
