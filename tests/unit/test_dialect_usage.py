"""Usage parsing and request parsing of the dialects, without Redis: what is reported is what is
billed, and what a body asks for is what is priced."""

from __future__ import annotations

import json

import pytest

from gateway.config import Rates
from gateway.dialects.anthropic import AnthropicDialect, parse_usage
from gateway.dialects.base import json_object
from gateway.dialects.gemini import GeminiDialect
from gateway.dialects.openai import OpenAIDialect
from gateway.errors import BadRequest
from gateway.metering import cost_of
from gateway.usage import Usage

CLAUDE = Rates(input=3_000_000, cached_input=300_000, cache_write=3_750_000, output=15_000_000, per_request=0,
               cache_write_1h=6_000_000)


def _sse(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


# ---------------------------------------------------------------- item 7: Anthropic 1-hour cache writes


def test_anthropic_stream_keeps_the_one_hour_cache_split_when_the_final_delta_repeats_only_the_total() -> None:
    start_usage = {"input_tokens": 120, "cache_creation_input_tokens": 1533, "cache_read_input_tokens": 0,
                   "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 533},
                   "output_tokens": 1}
    stream = (_sse("message_start", {"type": "message_start", "message": {"usage": start_usage}})
              + _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                       "usage": {"input_tokens": 120, "cache_creation_input_tokens": 1533,
                                                 "cache_read_input_tokens": 0, "output_tokens": 800}}))
    meter = AnthropicDialect().stream_meter("messages", False)
    meter.feed(stream)
    whole = parse_usage({**start_usage, "output_tokens": 800})  # the same answer, not streamed
    assert meter.usage == whole
    assert (whole.cache_write_tokens, whole.cache_write_1h_tokens) == (1000, 533)
    assert cost_of(CLAUDE, meter.usage) == cost_of(CLAUDE, whole) == 19_308  # 360 + 3750 + 3198 + 12000 (was 21307)


def test_anthropic_snapshot_with_the_breakdown_replaces_the_earlier_split() -> None:
    first = parse_usage({"input_tokens": 5, "cache_creation_input_tokens": 10,
                         "cache_creation": {"ephemeral_5m_input_tokens": 4, "ephemeral_1h_input_tokens": 6}})
    later = parse_usage({"cache_creation_input_tokens": 12,
                         "cache_creation": {"ephemeral_5m_input_tokens": 4, "ephemeral_1h_input_tokens": 8}}, first)
    assert (later.cache_write_tokens, later.cache_write_1h_tokens) == (4, 8)
    grown = parse_usage({"cache_creation_input_tokens": 14}, later)  # no breakdown: the 1 h part stands
    assert (grown.cache_write_tokens, grown.cache_write_1h_tokens) == (6, 8)


def test_anthropic_usage_reports_the_service_tier_and_server_tool_calls() -> None:
    usage = parse_usage({"input_tokens": 1, "output_tokens": 2, "service_tier": "priority",
                         "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 0}})
    assert usage.service_tier == "priority" and usage.tool_calls == (("web_fetch", 0), ("web_search", 3))


# ---------------------------------------------------------------- item 8: Gemini JSON-array streams


def test_gemini_stream_without_alt_sse_is_billed_from_the_last_usage_of_the_json_array() -> None:
    chunks = [
        {"candidates": [{"content": {"parts": [{"text": "Hel"}]}}],
         "usageMetadata": {"promptTokenCount": 300, "totalTokenCount": 300}},
        {"candidates": [{"content": {"parts": [{"text": "lo"}]}, "finishReason": "STOP"}],
         "usageMetadata": {"promptTokenCount": 300, "cachedContentTokenCount": 200, "candidatesTokenCount": 3,
                           "thoughtsTokenCount": 260, "totalTokenCount": 563}},
    ]
    usage = GeminiDialect().usage_from_body("streamGenerateContent", json.dumps(chunks).encode())
    assert usage == Usage(input_tokens=100, cached_input_tokens=200, output_tokens=263, reasoning_tokens=260)


# ---------------------------------------------------------------- item 9: embeddings have no output


def test_embeddings_with_reported_usage_have_zero_output_not_unknown() -> None:
    openai_body = {"object": "list", "data": [], "model": "m", "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    assert OpenAIDialect().usage_from_body("embeddings", json.dumps(openai_body).encode()) == Usage(
        input_tokens=8, output_tokens=0)
    gemini_body = {"embeddings": [{"values": [0.1]}], "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}}
    for endpoint in ("embedContent", "batchEmbedContents"):
        usage = GeminiDialect().usage_from_body(endpoint, json.dumps(gemini_body).encode())
        assert usage is not None and (usage.input_tokens, usage.output_tokens) == (5, 0)


# ---------------------------------------------------------------- item 12: duplicate keys, deep nesting


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "max_tokens": 1000, "max_tokens": 20}',
    b'{"model": "m", "messages": [{"role": "user", "content": "x", "content": "y"}]}',
    b'{"model": "m", "max_tokens": 1, "max\\u005ftokens": 2}',  # the same key, spelt with an escape
])
def test_a_body_repeating_a_key_at_any_depth_is_refused_naming_the_key(raw: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        json_object(raw)
    assert info.value.status == 400 and info.value.param in ("max_tokens", "content")
    assert repr(info.value.param) in info.value.message


@pytest.mark.parametrize("raw", [b"[" * 2000 + b"]" * 2000, b'{"a":' * 5000 + b"1" + b"}" * 5000])
def test_deeply_nested_json_is_a_bad_request_not_a_crash(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        json_object(raw)


# ---------------------------------------------------------------- item 5: completions prompt arrays


@pytest.mark.parametrize(("prompt", "n", "best_of", "choices"), [
    ("one", None, None, 1),
    (["a", "b", "c"], None, None, 3),
    (["a", "b"], 2, 3, 6),  # prompts x max(n, best_of)
    ([1, 2, 3], None, None, 1),  # one token array is one prompt
    ([[1, 2], [3], [4]], 2, None, 6),  # token arrays: one prompt each
])
def test_completions_hold_one_completion_per_prompt(prompt: object, n: int | None, best_of: int | None,
                                                    choices: int) -> None:
    body = {"model": "m", "prompt": prompt, "max_tokens": 10, **({"n": n} if n else {}),
            **({"best_of": best_of} if best_of else {})}
    parsed = OpenAIDialect().parse_request("completions", json.dumps(body).encode(), 8)
    assert parsed.choices == choices and parsed.output_cap == 10


def test_max_choices_bounds_prompts_times_choices() -> None:
    body = {"model": "m", "prompt": ["a", "b", "c"], "n": 2}
    with pytest.raises(BadRequest) as info:
        OpenAIDialect().parse_request("completions", json.dumps(body).encode(), 4)
    assert info.value.param == "prompt"


# ---------------------------------------------------------------- item 4: model names


@pytest.mark.parametrize("model", ["cheap-x/../pricey-pro", "a\\b", "a%2Fb", "a b", "a\nb", "a\x00", "x" * 300,
                                   "cheap-..", ""])
def test_unsafe_model_names_are_refused_in_every_dialect(model: str) -> None:
    for dialect, endpoint, body in ((OpenAIDialect(), "chat", {"messages": [{"role": "user", "content": "x"}]}),
                                    (AnthropicDialect(), "messages",
                                     {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})):
        with pytest.raises(BadRequest) as info:
            dialect.parse_request(endpoint, json.dumps({"model": model, **body}).encode(), 1)
        assert info.value.param == "model"
    with pytest.raises(BadRequest):
        GeminiDialect().parse_request("generateContent", b'{"contents": [{"parts": [{"text": "x"}]}]}', 1, model)


def test_gemini_path_model_may_not_hide_a_method_and_batch_items_must_name_the_path_model() -> None:
    with pytest.raises(BadRequest):
        GeminiDialect().parse_request("generateContent", b'{"contents": [{"parts": []}]}', 1, "cheap:x")
    body = {"requests": [{"model": "models/pricey-pro", "content": {"parts": [{"text": "x"}]}}]}
    with pytest.raises(BadRequest) as info:
        GeminiDialect().parse_request("batchEmbedContents", json.dumps(body).encode(), 1, "cheap-embed")
    assert info.value.param == "model"
    body["requests"][0]["model"] = "models/cheap-embed"
    assert GeminiDialect().parse_request("batchEmbedContents", json.dumps(body).encode(), 1, "cheap-embed").model \
        == "cheap-embed"


def test_gemini_upstream_path_is_rebuilt_from_the_validated_model_and_method() -> None:
    d = GeminiDialect()
    assert d.upstream_path("/v1beta/models/gemini-2.5-flash:streamGenerateContent") == \
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    for path in ("/v1beta/models/cheap-x/../pricey-pro:generateContent", "/v1/models/a:b:generateContent",
                 "/v1/models/x:deleteEverything", "/v2/models/x:generateContent"):
        with pytest.raises(BadRequest):
            d.upstream_path(path)
