"""The OpenAI dialect: request parsing, upstream body rewriting, usage, stream metering, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config import Upstream
from gateway.dialects.openai import OpenAIDialect, parse_usage
from gateway.errors import BadRequest, InsufficientCredits, StoreUnavailable
from gateway.secret import Secret
from gateway.usage import Usage

DATA = Path(__file__).parent / "data"
STREAMS = [DATA / "openai_chat_stream.sse", DATA / "openai_chat_stream_crlf.sse"]
EXPECTED_USAGE = Usage(input_tokens=6, cached_input_tokens=3, cache_write_tokens=None, output_tokens=4,
                       reasoning_tokens=1)
D = OpenAIDialect()
UPSTREAM = Upstream("u", "openai", "http://x/v1", Secret("sk-up"), "bearer", 60, 5, "inject", "max_completion_tokens")


def _parse(body: dict) -> object:
    return D.parse_request("chat", json.dumps(body).encode(), 4)


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.name)
def test_stream_usage_is_the_same_at_every_split(path: Path) -> None:
    data = path.read_bytes()
    eol = b"\r\n" if b"\r\n" in data else b"\n"
    usage_event = next(e for e in data.split(eol * 2) if b'"choices":[]' in e) + eol * 2
    without_usage = data.replace(usage_event, b"")
    for cut in range(1, len(data)):
        for hide in (False, True):
            meter = D.stream_meter("chat", hide)
            out = meter.feed(data[:cut]) + meter.feed(data[cut:]) + meter.finish()
            assert meter.usage == EXPECTED_USAGE, cut
            assert out == (without_usage if hide else data), cut


# the terminal response lists its output items: no built-in tool ran
NO_TOOL_CALLS = (("code_interpreter", 0), ("file_search", 0), ("image_generation", 0), ("web_search", 0))


def test_responses_stream_usage_is_the_same_at_every_split() -> None:
    """The Responses API names its events; usage is on the terminal event's response.usage."""
    data = (DATA / "openai_responses_stream.sse").read_bytes()
    for cut in range(1, len(data)):
        meter = D.stream_meter("responses", hide_usage=False)
        out = meter.feed(data[:cut]) + meter.feed(data[cut:]) + meter.finish()
        assert meter.usage == Usage(input_tokens=5, cached_input_tokens=4, cache_write_tokens=None, output_tokens=6,
                                    reasoning_tokens=2, tool_calls=NO_TOOL_CALLS), cut
        assert out == data, cut  # `event:` lines and every byte relayed untouched


def test_responses_stream_without_terminal_event_has_no_usage_but_an_estimate() -> None:
    data = (DATA / "openai_responses_stream.sse").read_bytes()
    meter = D.stream_meter("responses", hide_usage=False)
    meter.feed(data[: data.index(b"event: response.output_text.done")])
    meter.finish()
    assert meter.usage is None
    assert meter.estimated_output_tokens() >= 2


def test_stream_estimate_counts_relayed_output() -> None:
    meter = D.stream_meter("chat", hide_usage=False)
    data = STREAMS[0].read_bytes()
    meter.feed(data[: data.index(b'"finish_reason":"stop"')])
    assert meter.usage is None
    assert meter.estimated_output_tokens() >= 2


def test_usage_semantics_cached_inside_prompt_reasoning_inside_output() -> None:
    usage = parse_usage({"prompt_tokens": 100, "completion_tokens": 50,
                         "prompt_tokens_details": {"cached_tokens": 40},
                         "completion_tokens_details": {"reasoning_tokens": 30}})
    assert usage == Usage(60, 40, None, 50, 30)
    responses = parse_usage({"input_tokens": 36, "input_tokens_details": {"cached_tokens": 6}, "output_tokens": 87})
    assert (responses.input_tokens, responses.cached_input_tokens, responses.output_tokens) == (30, 6, 87)
    assert parse_usage({}).reported is False
    assert parse_usage({"prompt_tokens": "x", "completion_tokens": -1}) == Usage()


def test_the_prompt_bound_covers_unicode_and_media() -> None:
    text = "中文字符" * 100
    parsed = _parse({"model": "m", "messages": [{"role": "user", "content": text}]})
    assert parsed.prompt_tokens_bound >= len(text.encode())  # byte-level BPE: at most one token per byte
    with_image = _parse({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]})
    assert with_image.prompt_tokens_bound >= 2000


def test_cap_fields_are_read_and_n_is_bounded() -> None:
    assert _parse({"model": "m", "messages": [{}], "max_tokens": 7}).output_cap == 7
    parsed = _parse({"model": "m", "messages": [{}], "max_completion_tokens": 9, "n": 3})
    assert (parsed.cap_field, parsed.output_cap, parsed.choices) == ("max_completion_tokens", 9, 3)
    with pytest.raises(BadRequest):
        _parse({"model": "m", "messages": [{}], "n": 5})
    with pytest.raises(BadRequest):  # two caps: an upstream might honour the one not priced
        _parse({"model": "m", "messages": [{}], "max_completion_tokens": 9, "max_tokens": 7000})


def test_output_the_gateway_cannot_price_is_refused() -> None:
    for extra in ({"modalities": ["text", "audio"]}, {"audio": {"voice": "alloy", "format": "wav"}}):
        with pytest.raises(BadRequest):
            _parse({"model": "m", "messages": [{}], **extra})
    with pytest.raises(BadRequest) as refused:
        D.parse_request("responses", json.dumps({"model": "m", "input": "x", "background": True}).encode(), 4)
    assert refused.value.param == "background"


def test_media_spelt_with_json_escapes_still_gets_its_allowance() -> None:
    plain = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}
    escaped = json.dumps(plain).replace("image_url", "image\\u005furl").encode()
    assert json.loads(escaped) == plain
    bound = D.parse_request("chat", json.dumps(plain).encode(), 4).prompt_tokens_bound
    assert D.parse_request("chat", escaped, 4).prompt_tokens_bound >= bound - 20 > 4000


def test_upstream_body_is_untouched_unless_it_must_change() -> None:
    parsed = _parse({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert D.upstream_body(parsed, UPSTREAM, None) == (None, False)
    body, hide = D.upstream_body(parsed, UPSTREAM, 10)
    assert json.loads(body or b"")["max_completion_tokens"] == 10 and hide is False


def test_stream_usage_is_injected_only_when_missing() -> None:
    parsed = _parse({"model": "m", "messages": [{}], "stream": True})
    body, hide = D.upstream_body(parsed, UPSTREAM, None)
    assert json.loads(body or b"")["stream_options"] == {"include_usage": True} and hide
    asked = _parse({"model": "m", "messages": [{}], "stream": True, "stream_options": {"include_usage": True}})
    assert D.upstream_body(asked, UPSTREAM, None) == (None, False)
    mistral_like = Upstream("m", "openai", "http://x", Secret(""), "bearer", 1, 1, "always", "max_tokens")
    assert D.upstream_body(parsed, mistral_like, None) == (None, False)


def test_client_credentials_are_replaced_by_the_provider_key() -> None:
    headers = D.upstream_headers(UPSTREAM, {"Authorization": "Bearer gwk_client", "OpenAI-Organization": "org",
                                            "X-Stainless-Lang": "python", "Content-Type": "application/json"})
    assert headers["Authorization"] == "Bearer sk-up"
    assert "OpenAI-Organization" not in headers and headers["X-Stainless-Lang"] == "python"
    assert headers["Accept-Encoding"] == "identity"


def test_errors_render_in_openai_shape() -> None:
    status, body = D.error_response(InsufficientCredits("no money"))
    assert status == 402
    assert json.loads(body) == {"error": {"message": "no money", "type": "insufficient_quota", "param": None,
                                          "code": "insufficient_credits"}}
    assert D.error_response(StoreUnavailable("down"))[0] == 503
    event = D.stream_error_event("lost")
    assert event.startswith(b"data: ") and json.loads(event[6:])["error"]["message"] == "lost"


def test_client_key_from_bearer_only() -> None:
    assert D.client_key({"Authorization": "Bearer abc"}, {}) == "abc"
    assert D.client_key({"Authorization": "bearer  abc "}, {}) == "abc"
    assert D.client_key({}, {}) is None
    assert D.client_key({"Authorization": "Basic abc"}, {}) == ""


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "max_tokens": 1000, "max_tokens": 20}',
    b'{"model": "m", "messages": [{"role": "user", "content": "a", "content": "b"}]}',
    '{"model": "m", "n": 1, "n": 2}'.encode("utf-16"),
])
def test_a_key_given_twice_at_any_depth_is_refused_by_the_body_parser(raw: bytes) -> None:
    """The parser built once for every request keeps the duplicate-key check (and reads UTF-16 bodies
    as json.loads does)."""
    with pytest.raises(BadRequest) as refused:
        OpenAIDialect().parse_request("chat", raw, 4)
    assert "repeats the key" in refused.value.message
