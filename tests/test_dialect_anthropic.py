"""The Anthropic dialect: usage semantics, stream metering at every split, request parsing, errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config import Upstream
from gateway.dialects.anthropic import AnthropicDialect, parse_usage
from gateway.errors import BadRequest, InsufficientCredits
from gateway.secret import Secret
from gateway.usage import Usage

STREAM = Path(__file__).parent / "data" / "anthropic_messages_stream.sse"
D = AnthropicDialect()
UPSTREAM = Upstream("a", "anthropic", "http://x", Secret("sk-ant"), "x-api-key", 60, 5, "inject", "max_tokens")
# input_tokens excludes cache; 7 written = 4 (5 min) + 3 (1 h); output is the last cumulative value
EXPECTED = Usage(input_tokens=25, cached_input_tokens=100, cache_write_tokens=4, output_tokens=15,
                 cache_write_1h_tokens=3)


def test_stream_usage_is_the_same_at_every_split_and_bytes_pass_untouched() -> None:
    data = STREAM.read_bytes()
    for cut in range(1, len(data)):
        meter = D.stream_meter("messages", False)
        out = meter.feed(data[:cut]) + meter.feed(data[cut:]) + meter.finish()
        assert out == data, cut
        assert meter.usage == EXPECTED, cut


def test_stream_without_message_delta_leaves_output_unknown() -> None:
    data = STREAM.read_bytes()
    meter = D.stream_meter("messages", False)
    meter.feed(data[: data.index(b"event: message_delta")])
    usage = meter.usage
    assert usage is not None and usage.input_tokens == 25 and usage.output_tokens is None
    assert meter.estimated_output_tokens() >= 2  # the thinking and text deltas


def test_usage_without_cache_breakdown_bills_writes_at_the_5_minute_rate() -> None:
    usage = parse_usage({"input_tokens": 10, "cache_creation_input_tokens": 6, "cache_read_input_tokens": 2,
                         "output_tokens": 3})
    assert usage == Usage(10, 2, 6, 3, None, None)


def _parse(body: dict, endpoint: str = "messages") -> object:
    return D.parse_request(endpoint, json.dumps(body).encode(), 1)


def test_max_tokens_is_required_for_messages_but_not_for_count_tokens() -> None:
    with pytest.raises(BadRequest):
        _parse({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    parsed = _parse({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "count_tokens")
    assert parsed.output_cap is None


def test_tools_and_media_widen_the_prompt_bound() -> None:
    plain = _parse({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    rich = _parse({"model": "m", "max_tokens": 5, "tools": [{"name": "t"}], "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]})
    assert rich.prompt_tokens_bound >= plain.prompt_tokens_bound + 2000 + 1000


def test_lowering_max_tokens_keeps_the_thinking_budget_below_it() -> None:
    body = {"model": "m", "max_tokens": 20000, "thinking": {"type": "enabled", "budget_tokens": 16000},
            "messages": [{"role": "user", "content": "x"}]}
    new, _ = D.upstream_body(_parse(body), UPSTREAM, 5000)
    sent = json.loads(new or b"")
    assert sent["max_tokens"] == 5000 and sent["thinking"]["budget_tokens"] == 4999
    with pytest.raises(InsufficientCredits):
        D.upstream_body(_parse(body), UPSTREAM, 900)


def test_keys_from_x_api_key_or_bearer_and_the_provider_key_injected() -> None:
    assert D.client_key({"x-api-key": "k1"}, {}) == "k1"
    assert D.client_key({"Authorization": "Bearer k2"}, {}) == "k2"
    allowing = replace(UPSTREAM, allowed_betas=frozenset({"b1"}))
    headers = D.upstream_headers(allowing, {"Authorization": "Bearer gwk_c", "x-api-key": "gwk_c",
                                            "anthropic-beta": "b1"})
    assert headers["x-api-key"] == "sk-ant" and "Authorization" not in headers
    assert headers["anthropic-beta"] == "b1" and headers["anthropic-version"] == "2023-06-01"


def test_a_beta_header_the_upstream_does_not_allow_is_never_forwarded() -> None:
    with pytest.raises(BadRequest) as info:
        D.upstream_headers(UPSTREAM, {"x-api-key": "gwk_c", "anthropic-beta": "context-1m-2025-08-07"})
    assert info.value.param == "anthropic-beta" and "context-1m-2025-08-07" in info.value.message


def test_errors_in_anthropic_shape() -> None:
    status, body = D.error_response(InsufficientCredits("no credits"))
    assert status == 402
    assert json.loads(body) == {"type": "error", "error": {"type": "billing_error", "message": "no credits"}}
    event = D.stream_error_event("lost")
    assert event.startswith(b"event: error\ndata: ")
    assert json.loads(event.split(b"data: ", 1)[1])["error"]["message"] == "lost"
