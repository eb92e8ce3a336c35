"""The stream meters work per chunk (whole runs of events, one search each) and must bill exactly as
the per-event meters did: for real-format streams of every dialect, split anywhere, with LF, CRLF or
CR line ends, comments and keep-alives, with and without hidden usage, the bytes sent to the client
after every chunk and the usage read are the old meters' (tests/unit/stream_oracle.py); the output
estimate, taken per batch of runs instead of per event, stays between the text's length / 4 and the old one."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stream_oracle import OldDecoder, OldMeter

from gateway import sse
from gateway.dialects.anthropic import AnthropicDialect
from gateway.dialects.base import StreamMeter
from gateway.dialects.gemini import GeminiDialect
from gateway.dialects.openai import OpenAIDialect
from gateway.money import ceil_div
from gateway.sse import SSEDecoder

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
EOLS = st.sampled_from([b"\n", b"\r\n", b"\r"])
COMMENT = b": keep-alive"


def _frame(obj: Any, eol: bytes, name: str | None = None) -> bytes:
    head = f"event: {name}".encode() + eol if name else b""
    return head + b"data: " + json.dumps(obj, separators=(",", ":")).encode() + eol + eol


def chat_stream(texts: list[str], usage: str, eol: bytes, comments: list[bool]) -> bytes:
    """OpenAI chat chunks (`"usage":null` in each when usage was asked for), then the usage chunk
    (`usage`: "own" with empty choices, "last" on the last content chunk, "none": never came)."""
    null: dict[str, Any] = {} if usage == "none" else {"usage": None}
    out = [_frame({"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": t}, "finish_reason": None}], **null}, eol) for t in texts]
    counts = {"prompt_tokens": 9, "completion_tokens": len(texts), "total_tokens": 9 + len(texts),
              "prompt_tokens_details": {"cached_tokens": 2}}
    if usage == "own":
        out.append(_frame({"id": "c", "choices": [], "usage": counts}, eol))
    elif usage == "last":
        out.append(_frame({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                           "usage": counts}, eol))
    if usage != "none":
        out.append(b"data: [DONE]" + eol + eol)
    return _with_comments(out, comments, eol)


def responses_stream(texts: list[str], usage: str, eol: bytes, comments: list[bool]) -> bytes:
    out = [_frame({"type": "response.created", "response": {"id": "r", "usage": None}}, eol, "response.created")]
    out += [_frame({"type": "response.output_text.delta", "delta": t}, eol, "response.output_text.delta")
            for t in texts]
    if usage != "none":
        name = "response.completed" if usage == "own" else "response.incomplete"
        out.append(_frame({"type": name, "response": {"id": "r", "output": [{"type": "web_search_call"}],
                                                      "usage": {"input_tokens": 7, "output_tokens": len(texts)}}},
                          eol, name))
    return _with_comments(out, comments, eol)


def anthropic_stream(texts: list[str], usage: str, eol: bytes, comments: list[bool]) -> bytes:
    out = [_frame({"type": "message_start", "message": {"id": "m", "content": [], "usage": {
        "input_tokens": 25, "cache_read_input_tokens": 3, "output_tokens": 1}}}, eol, "message_start"),
        _frame({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}, eol,
               "content_block_start")]
    out += [_frame({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}, eol,
                   "content_block_delta") for t in texts]
    if usage != "none":
        out.append(_frame({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": len(texts)}}, eol, "message_delta"))
        if usage == "last":  # a second, later snapshot
            out.append(_frame({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 2 * len(texts),
                                                                                "server_tool_use": {
                                                                                    "web_search_requests": 1}}},
                              eol, "message_delta"))
    out.append(_frame({"type": "message_stop"}, eol, "message_stop"))
    return _with_comments(out, comments, eol)


def gemini_stream(texts: list[str], usage: str, eol: bytes, comments: list[bool]) -> bytes:
    out = []
    for i, t in enumerate(texts):
        candidate: dict[str, Any] = {"content": {"parts": [{"text": t}], "role": "model"}, "index": 0}
        if i == len(texts) - 1 and usage != "none":
            candidate["finishReason"] = "STOP"
        chunk: dict[str, Any] = {"candidates": [candidate], "modelVersion": "g"}
        if usage != "none" and (usage == "own" or i % 2 == 0 or i == len(texts) - 1):
            chunk["usageMetadata"] = {"promptTokenCount": 8, "candidatesTokenCount": i + 1, "thoughtsTokenCount": i}
        out.append(_frame(chunk, eol))
    return _with_comments(out, comments, eol)


def _with_comments(frames: list[bytes], comments: list[bool], eol: bytes) -> bytes:
    """Keep-alive comments (blocks of comments only, whose bytes belong to the next event) and an
    extra blank line before some frames."""
    out = []
    for i, frame in enumerate(frames):
        if comments[i % len(comments)]:
            out.append(COMMENT + eol + (eol if i % 2 else b"") + eol)
        out.append(frame)
    return b"".join(out)


def _meter(kind: str, hide: bool) -> StreamMeter:
    if kind == "chat":
        return OpenAIDialect().stream_meter("chat", hide)
    if kind == "responses":
        return OpenAIDialect().stream_meter("responses", False)
    if kind == "anthropic":
        return AnthropicDialect().stream_meter("messages", False)
    return GeminiDialect().stream_meter("streamGenerateContent", False)


STREAMS: dict[str, Callable[[list[str], str, bytes, list[bool]], bytes]] = {
    "chat": chat_stream, "responses": responses_stream, "anthropic": anthropic_stream, "gemini": gemini_stream}


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _compare(kind: str, hide: bool, data: bytes, chunks: list[bytes]) -> tuple[StreamMeter, OldMeter]:
    new, old = _meter(kind, hide), OldMeter(kind, hide)
    for chunk in chunks:
        out = new.feed(chunk)
        assert out == old.feed(chunk)
        if not hide:
            assert out is chunk  # passed through untouched, not copied
    assert new.finish() == old.finish()
    assert new.usage == old.usage
    return new, old


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(STREAMS)), hide=st.booleans(), texts=st.lists(TEXT, min_size=1, max_size=8),
       usage=st.sampled_from(["own", "last", "none"]), eol=EOLS,
       comments=st.lists(st.booleans(), min_size=1, max_size=4),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_split_of_a_real_stream_sends_the_same_bytes_and_bills_the_same_usage(
        kind: str, hide: bool, texts: list[str], usage: str, eol: bytes, comments: list[bool], cuts: list[int]) -> None:
    hide = hide and kind == "chat"
    data = STREAMS[kind](texts, usage, eol, comments)
    new, old = _compare(kind, hide, data, _cut(data, cuts))
    if usage != "none" and eol != b"\r":  # with CR ends the last event waits: its CR may be half a CRLF
        assert new.usage is not None and new.usage.reported
    # the estimate (billed when usage never reports the output): per batch of runs, at least the text's
    # length / 4, at most the old per-event sum (a stream ending in CR keeps its last event pending)
    estimate = new._text.tokens()  # type: ignore[attr-defined]
    assert ceil_div(old.chars, 4) <= estimate <= old.estimate
    assert (estimate > 0) == (old.chars > 0)
    reported = new.usage is not None and new.usage.output_tokens is not None
    assert new.estimated_output_tokens() == (0 if reported else estimate)


@pytest.mark.parametrize("kind", sorted(STREAMS))
@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_a_stream_fed_byte_by_byte_matches_the_old_meter(kind: str, eol: bytes) -> None:
    data = STREAMS[kind](["Hello", " wor\"ld", " \u00e9\u4e16\\n"], "own", eol, [True, False])
    for hide in (False, True) if kind == "chat" else (False,):
        new, _old = _compare(kind, hide, data, [data[i:i + 1] for i in range(len(data))])
        assert eol == b"\r" or (new.usage is not None and new.usage.reported)
        assert new._text.tokens() >= 1  # type: ignore[attr-defined]


def test_the_bench_stream_in_one_read_hides_only_the_usage_chunk() -> None:
    data = chat_stream(["Hello", " from", " the", " bench"], "own", b"\n", [False])
    meter = _meter("chat", True)
    out = meter.feed(data)
    assert b'"usage":{' not in out and out.endswith(b"data: [DONE]\n\n") and out.count(b"data: ") == 5
    assert meter.usage is not None and meter.usage.input_tokens == 7 and meter.usage.cached_input_tokens == 2
    assert meter.estimated_output_tokens() == 0  # the output count is reported: no estimate is needed
    assert meter._text.tokens() == ceil_div(len("Hello from the bench"), 4)  # type: ignore[attr-defined]


# -- the decoder alone: any SSE byte soup, split anywhere, frames as the old one did -------------------

PIECES = st.sampled_from([b"data:", b"data: ", b"data", b"event: x", b"event:", b": c", b"id: 1", b"retry: 5",
                          b"x", b"\xc3", b"\xa9", b'{"usage":{}}', b"\n", b"\r", b"\r\n", b"\n\n", b"\r\n\r\n"])


@settings(max_examples=500, deadline=None)
@given(pieces=st.lists(PIECES, max_size=40), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10))
def test_the_decoder_frames_any_input_as_before(pieces: list[bytes], cuts: list[int]) -> None:
    data = b"".join(pieces)
    new, old = SSEDecoder(), OldDecoder()
    for chunk in _cut(data, cuts):
        assert new.feed(chunk) == old.feed(chunk)  # the same events, raw bytes included, per chunk
    assert new.flush() == old.flush()


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(PIECES, max_size=40), marks=st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_an_event_looked_up_in_a_run_is_the_event_decoded_with_the_run(pieces: list[bytes], marks: list[int]) -> None:
    """A mark in an event's own lines finds that event, raw span included (comment-only blocks
    before it are its bytes); a mark in comments alone may find nothing."""
    run = SSEDecoder().feed_run(b"".join(pieces))
    spans, at = [], 0
    for event in sse.parse_events(run):
        spans.append((at, at + len(event.raw), event))
        at += len(event.raw)
    lookup = sse.Run(run)
    eol = sse._eol_of(run)
    for mark in sorted(m % (len(run) or 1) for m in marks):
        if not run or run[mark] in b"\r\n":
            continue
        found = lookup.event_at(mark)
        holding = [span for span in spans if span[0] <= mark < span[1]]
        if found[2] is not None or not eol:
            assert found == holding[0]
        elif holding:  # None: the mark is in a block of comments before the event's own lines
            start, _end, event = holding[0]
            own = event.raw[:-2 * len(eol)].rfind(eol + eol)
            assert own >= 0 and mark < start + own + 2 * len(eol)


# -- a hostile upstream: large inputs stay linear and bounded (results asserted, not time) ------------

def test_a_huge_event_in_many_tiny_chunks_is_read_once_and_its_usage_counted() -> None:
    """8 MB of content in one event, 64 bytes a chunk (a copy or a rescan per chunk would be
    quadratic: hours), then the usage chunk."""
    big = b'data: {"choices":[{"delta":{"content":"' + b"a" * 8_000_000 + b'"}}],"usage":null}\n\n'
    data = big + chat_stream(["x"], "own", b"\n", [False])
    meter = _meter("chat", True)
    out = [meter.feed(data[i:i + 64]) for i in range(0, len(data), 64)]
    out.append(meter.finish())
    sent = b"".join(out)
    assert sent.startswith(big) and b'"usage":{' not in sent and sent.endswith(b"data: [DONE]\n\n")
    assert meter.usage is not None and meter.usage.input_tokens == 7
    assert meter._text.tokens() >= 2_000_000  # type: ignore[attr-defined]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_an_unterminated_string_without_blank_lines_is_bounded_and_forwarded(
        monkeypatch: pytest.MonkeyPatch, eol: bytes) -> None:
    """No blank line ever, a string never closed: the unfinished event is given up past MAX_PENDING
    (released unparsed, so a hiding meter forwards it) instead of growing without bound."""
    monkeypatch.setattr(sse, "MAX_PENDING", 100_000)
    data = b'data: {"choices":[{"delta":{"content":"' + (b'\\"usage":{' + eol) * 100_000  # a mark on every line
    meter = _meter("chat", True)
    sent = []
    for i in range(0, len(data), 1000):
        sent.append(meter.feed(data[i:i + 1000]))
        assert len(meter._decoder._buf) <= 100_000 + 1000  # type: ignore[attr-defined]
    sent.append(meter.finish())
    assert b"".join(sent) == data
    assert meter.usage is None


def test_a_long_line_with_lone_cr_ends_in_tiny_chunks_is_linear() -> None:
    """CR line ends take the line-by-line path: it resumes where it stopped, never from the start."""
    line = b"data: " + b"y" * 2_000_000 + b"\r\r"
    decoder = SSEDecoder()
    events = []
    for i in range(0, len(line), 32):
        events += decoder.feed(line[i:i + 32])
    events += decoder.feed(b"data: next")  # the last CR is known not to be half a CRLF
    assert len(events) == 1 and len(events[0].data) == 2_000_000 and events[0].raw == line


def test_many_comment_only_blocks_are_walked_once() -> None:
    """Thousands of keep-alive blocks before one event (their bytes stay with it), fed in pieces."""
    data = (COMMENT + b"\n\n") * 50_000 + b'data: {"choices":[],"usage":{"prompt_tokens":3}}\n\n'
    meter = _meter("chat", True)
    out = b"".join(meter.feed(data[i:i + 4096]) for i in range(0, len(data), 4096)) + meter.finish()
    assert out == b""  # the hidden usage chunk takes the comments before it with it, as before
    assert meter.usage is not None and meter.usage.input_tokens == 3
