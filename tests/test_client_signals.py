"""What a response tells the client (issue 15, item 5), checked through the real SDKs: rate-limit
headers on served answers in each dialect's names, a 402 every SDK raises as usual with the
shortfall inside its error object, and 429s the SDKs retry only when the wait is a minute window's."""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

import anthropic
import httpx2 as httpx
import openai
import pytest
from conftest import Harness
from google.genai import errors as genai_errors

from gateway.keys import KeySchema
from gateway.signals import go_duration

PLANS = """
default_plan: free
plans:
  free: {monthly_credits: 0, models: ["demo-*"]}
  windowed:
    monthly_credits: 100
    models: ["demo-*"]
    limits: {requests_per_minute: 10, requests_per_day: 1000, tokens_per_minute: 100000}
  minute: {monthly_credits: 100, models: ["demo-*"], limits: {requests_per_minute: 1}}
  daily: {monthly_credits: 100, models: ["demo-*"], limits: {requests_per_day: 1}}
"""
MESSAGES: Any = [{"role": "user", "content": "hi [[emu out=3]]"}]
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+(\.\d+)?s$|^\d+ms$")


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


def test_reset_durations_print_as_go_does() -> None:
    assert [go_duration(ms) for ms in (12, 1000, 1500, 60_000, 61_250, 3_600_000, 86_399_000)] == [
        "12ms", "1s", "1.5s", "1m0s", "1m1.25s", "1h0m0s", "23h59m59s"]


async def test_openai_answers_carry_the_tightest_request_and_token_windows(harness: Harness) -> None:
    _account, key = await harness.account(plan="windowed")
    client = harness.sdk(key)
    raw = await client.chat.completions.with_raw_response.create(model="demo-mini", max_tokens=5, messages=MESSAGES)
    h = raw.headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("10", "9")  # the minute's
    assert GO_DURATION.match(h["x-ratelimit-reset-requests"]) and h["x-ratelimit-limit-tokens"] == "100000"
    assert 100000 - 200 < int(h["x-ratelimit-remaining-tokens"]) < 100000  # less the hold's worst case
    assert "x-gateway-output-cap-lowered" not in h
    stream = await client.chat.completions.with_raw_response.create(
        model="demo-mini", max_tokens=5, messages=MESSAGES, stream=True)
    assert stream.headers["x-ratelimit-remaining-requests"] == "8"
    async for _chunk in stream.parse():
        pass


async def test_anthropic_answers_carry_its_own_rate_limit_names_with_an_rfc3339_reset(harness: Harness) -> None:
    _account, key = await harness.account(plan="windowed")
    raw = await harness.anthropic_sdk(key).messages.with_raw_response.create(
        model="demo-claude", max_tokens=5, messages=MESSAGES)
    h = raw.headers
    assert (h["anthropic-ratelimit-requests-limit"], h["anthropic-ratelimit-requests-remaining"]) == ("10", "9")
    reset = datetime.fromisoformat(h["anthropic-ratelimit-requests-reset"].replace("Z", "+00:00")).timestamp()
    assert time.time() - 1 < reset <= time.time() + 62  # the minute window is whole again within a minute
    assert h["anthropic-ratelimit-tokens-limit"] == "100000" and "anthropic-ratelimit-tokens-reset" in h
    assert "x-ratelimit-limit-requests" not in h


async def test_gemini_answers_carry_openai_style_names_and_a_plan_without_windows_none(harness: Harness) -> None:
    _account, key = await harness.account(plan="windowed")
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 5}}
    async with harness.client.post("/v1beta/models/demo-gemini:generateContent", json=body,
                                   headers={"x-goog-api-key": key}) as resp:
        assert resp.status == 200 and resp.headers["x-ratelimit-limit-requests"] == "10"
    _account, plain = await harness.account(credits=1)
    raw = await harness.sdk(plain).chat.completions.with_raw_response.create(
        model="demo-mini", max_tokens=5, messages=MESSAGES)
    assert not [name for name in raw.headers if "ratelimit" in name]


async def test_a_402_states_available_needed_and_shortfall_and_each_sdk_raises_as_usual(harness: Harness) -> None:
    _account, key = await harness.account()  # no credits at all
    with pytest.raises(openai.APIStatusError) as oa:
        await harness.sdk(key).chat.completions.create(model="demo-mini", max_tokens=5, messages=MESSAGES)
    body: Any = oa.value.body
    assert oa.value.status_code == 402 and "Insufficient credits: 0 credits available" in oa.value.message
    assert (body["available"], body["available_micro"], body["limited_by"]) == ("0", 0, "account_balance")
    assert body["needed_micro"] > 0 and body["shortfall_micro"] == body["needed_micro"]
    assert body["shortfall"] == body["needed"] and isinstance(body["needed"], str)
    with pytest.raises(anthropic.APIStatusError) as an:
        await harness.anthropic_sdk(key).messages.create(model="demo-claude", max_tokens=5, messages=MESSAGES)
    assert type(an.value).__name__ == "PaymentRequiredError" and an.value.status_code == 402
    error: Any = an.value.body
    assert error["error"]["type"] == "billing_error" and error["error"]["shortfall_micro"] > 0
    with pytest.raises(genai_errors.ClientError) as ge:
        await harness.genai_client(key).aio.models.generate_content(model="demo-gemini", contents="hi")
    assert ge.value.code == 402 and "Insufficient credits" in str(ge.value.message)
    assert ge.value.details["error"]["needed_micro"] > 0


def _counted(requests: list[httpx.Request]) -> httpx.AsyncClient:
    async def count(request: httpx.Request) -> None:
        requests.append(request)

    return httpx.AsyncClient(event_hooks={"request": [count]})


async def test_a_429_of_a_day_window_is_not_retried_by_the_sdks(harness: Harness) -> None:
    _account, key = await harness.account(plan="daily")
    sent: list[httpx.Request] = []
    client = harness.sdk(key, max_retries=2, http_client=_counted(sent))
    await client.chat.completions.create(model="demo-mini", max_tokens=5, messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="demo-mini", max_tokens=5, messages=MESSAGES)
    assert len(sent) == 2  # one attempt for the 429: no retry, no sleep
    assert limited.value.response.headers["x-should-retry"] == "false"
    sent_anthropic: list[httpx.Request] = []
    other = harness.anthropic_sdk(key, max_retries=2, http_client=_counted(sent_anthropic))
    with pytest.raises(anthropic.RateLimitError):
        await other.messages.create(model="demo-claude", max_tokens=5, messages=MESSAGES)
    assert len(sent_anthropic) == 1


async def test_a_429_of_a_minute_window_is_retried_once_it_frees(harness: Harness) -> None:
    """The request window's one request ages out two seconds after the 429: the SDK waits what
    `retry-after-ms` says and its retry is served."""
    account, key = await harness.account(plan="minute")
    sent: list[httpx.Request] = []
    client = harness.sdk(key, max_retries=2, http_client=_counted(sent))
    await client.chat.completions.create(model="demo-mini", max_tokens=5, messages=MESSAGES)
    await harness.gw.quiesce()
    (bucket,) = [int(k.rsplit(b":", 1)[1]) for k in harness.redis.hkeys(KeySchema().for_account(account).limits)
                 if k.startswith(b"w:a:requests_per_minute:")]
    seconds, micros = harness.redis.time()
    meter = harness.gw.meter
    assert meter is not None
    meter.clock_offset_ms = (bucket + 60) * 1000 - 2000 - (seconds * 1000 + micros // 1000)  # 2 s before it frees
    raw = await client.chat.completions.with_raw_response.create(model="demo-mini", max_tokens=5, messages=MESSAGES)
    assert raw.status_code == 200 and len(sent) == 3  # the first call, the 429, the retry
    assert sent[2].headers["x-stainless-retry-count"] == "1"
