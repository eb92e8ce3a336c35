"""The Gemini dialect: usageMetadata semantics, stream metering at every split, caps, keys, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config import Upstream
from gateway.dialects.gemini import GeminiDialect, parse_usage
from gateway.errors import BadRequest, InsufficientCredits, Unauthorized
from gateway.secret import Secret
from gateway.usage import Usage

STREAM = Path(__file__).parent / "data" / "gemini_stream.sse"
D = GeminiDialect()
UPSTREAM = Upstream("g", "gemini", "http://x", Secret("AIza-up"), "x-goog-api-key", 60, 5, "inject", "max_tokens")
# the prompt count includes cached tokens; thoughts are billed as output on top of candidates
EXPECTED = Usage(input_tokens=5, cached_input_tokens=3, output_tokens=123, reasoning_tokens=120)


def test_stream_usage_is_the_last_snapshot_at_every_split_and_bytes_pass_untouched() -> None:
    data = STREAM.read_bytes()
    for cut in range(1, len(data)):
        meter = D.stream_meter("streamGenerateContent", False)
        out = meter.feed(data[:cut]) + meter.feed(data[cut:]) + meter.finish()
        assert out == data, cut
        assert meter.usage == EXPECTED, cut


def test_a_stream_cut_before_the_final_chunk_has_unknown_output_until_counts_appear() -> None:
    data = STREAM.read_bytes()
    first_event = data.index(b"\r\n\r\n") + 4
    meter = D.stream_meter("streamGenerateContent", False)
    meter.feed(data[:first_event])
    assert meter.usage == Usage(input_tokens=8, cached_input_tokens=0, output_tokens=None)
    assert meter.estimated_output_tokens() == 1


def test_tool_use_prompt_tokens_are_input() -> None:
    usage = parse_usage({"promptTokenCount": 10, "toolUsePromptTokenCount": 7, "candidatesTokenCount": 2})
    assert (usage.input_tokens, usage.output_tokens) == (17, 2)


def _parse(body: dict, endpoint: str = "generateContent", model: str | None = "gemini-2.5-flash") -> object:
    return D.parse_request(endpoint, json.dumps(body).encode(), 2, model)


CONTENTS = [{"role": "user", "parts": [{"text": "hi"}]}]


def test_caps_in_camel_or_snake_case_and_candidate_count() -> None:
    camel = _parse({"contents": CONTENTS, "generationConfig": {"maxOutputTokens": 50, "candidateCount": 2}})
    assert (camel.output_cap, camel.choices, camel.cap_field) == (50, 2, "generationConfig.maxOutputTokens")
    snake = _parse({"contents": CONTENTS, "generation_config": {"max_output_tokens": 40}})
    new, _ = D.upstream_body(snake, UPSTREAM, 10)
    assert json.loads(new or b"")["generation_config"] == {"max_output_tokens": 10}
    plain = _parse({"contents": CONTENTS})
    new, _ = D.upstream_body(plain, UPSTREAM, 7)
    assert json.loads(new or b"")["generationConfig"] == {"maxOutputTokens": 7}
    with pytest.raises(BadRequest):
        _parse({"contents": CONTENTS, "generationConfig": {"candidateCount": 3}})
    with pytest.raises(BadRequest):
        _parse({"contents": CONTENTS, "generationConfig": {"maxOutputTokens": -1}})


def test_embeddings_hold_no_output_and_model_comes_from_the_path() -> None:
    parsed = _parse({"content": {"parts": [{"text": "x"}]}}, "embedContent", "gemini-embedding-001")
    assert parsed.output_cap == 0 and parsed.model == "gemini-embedding-001"
    with pytest.raises(BadRequest):
        _parse({"contents": CONTENTS}, model=None)
    with pytest.raises(BadRequest):
        _parse({}, "generateContent")


def test_key_from_header_or_query_and_the_provider_key_injected() -> None:
    assert D.client_key({"x-goog-api-key": "k1"}, {}) == "k1"
    assert D.client_key({}, {"key": "k2"}) == "k2"
    headers = D.upstream_headers(UPSTREAM, {"x-goog-api-key": "gwk_c", "Content-Type": "application/json"})
    assert headers["x-goog-api-key"] == "AIza-up"


def test_errors_in_google_shape() -> None:
    status, body = D.error_response(InsufficientCredits("no credits"))
    assert status == 402 and json.loads(body)["error"] == {"code": 402, "message": "no credits",
                                                           "status": "RESOURCE_EXHAUSTED"}
    assert json.loads(D.error_response(Unauthorized("bad"))[1])["error"]["status"] == "UNAUTHENTICATED"
    event = D.stream_error_event("lost")
    assert event.startswith(b"data: ") and json.loads(event[6:])["error"]["status"] == "UNAVAILABLE"


@pytest.mark.parametrize("config", [
    {"generationConfig": {"maxOutputTokens": 10}, "generation_config": {"max_output_tokens": 60000}},
    {"generationConfig": {"maxOutputTokens": 10, "candidate_count": 8}},
    {"generation_config": {"max_output_tokens": 10, "maxOutputTokens": 60000}},
])
def test_mixed_generation_config_spellings_are_refused_not_priced_one_way_and_served_another(
        config: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        _parse({"contents": [{"parts": [{"text": "hi"}]}], **config})


def test_image_or_audio_output_is_refused() -> None:
    with pytest.raises(BadRequest) as refused:
        _parse({"contents": [{"parts": [{"text": "hi"}]}],
                "generationConfig": {"responseModalities": ["TEXT", "IMAGE"]}})
    assert refused.value.param == "responseModalities"
    assert _parse({"contents": [{"parts": [{"text": "hi"}]}],
                   "generationConfig": {"responseModalities": ["TEXT"]}}) is not None


def test_inline_data_spelt_with_json_escapes_still_gets_its_allowance() -> None:
    body = {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]}]}
    escaped = json.dumps(body).replace("inlineData", "inline\\u0044ata").encode()
    assert json.loads(escaped) == body
    parsed = D.parse_request("generateContent", escaped, 4, "gemini-2.5-flash")
    assert parsed.prompt_tokens_bound > 2000  # type: ignore[attr-defined]
