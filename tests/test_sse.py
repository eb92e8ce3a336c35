"""The SSE decoder: any split of the input gives the same events and gives back every byte."""

from __future__ import annotations

import itertools

import pytest

from gateway.sse import SSEDecoder

SAMPLE = (b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n: keep-alive comment\n\n"
          b"data: line one\ndata: line two\n\ndata:no-space\r\rid: 7\nevent: ping\ndata: {}\n\n")
EXPECTED = [("message_start", '{"a":1}'), (None, "line one\nline two"), (None, "no-space"), ("ping", "{}")]


def _decode(data: bytes, cuts: list[int]) -> tuple[list[tuple[str | None, str]], bytes]:
    decoder = SSEDecoder()
    events, raw = [], b""
    bounds = [0, *cuts, len(data)]
    for start, end in itertools.pairwise(bounds):
        for event in decoder.feed(data[start:end]):
            events.append((event.event, event.data))
            raw += event.raw
    return events, raw + decoder.flush()


@pytest.mark.parametrize("cut", range(1, len(SAMPLE)))
def test_split_at_every_offset_gives_the_same_events_and_bytes(cut: int) -> None:
    events, raw = _decode(SAMPLE, [cut])
    assert events == EXPECTED
    assert raw == SAMPLE


def test_byte_by_byte_feed() -> None:
    assert _decode(SAMPLE, list(range(1, len(SAMPLE)))) == (EXPECTED, SAMPLE)


def test_unfinished_event_is_returned_by_flush_unparsed() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: done\n\ndata: half") != []
    assert decoder.flush() == b"data: half"


LF_SAMPLE = (b": hello\n\n\ndata: {\"x\":1}\n\nevent: delta\ndata: a\ndata: b\n\n: c\nid: 3\ndata: last\n\n"
             b"data: unfinished")
LF_EXPECTED = [(None, '{"x":1}'), ("delta", "a\nb"), (None, "last")]


@pytest.mark.parametrize("cut", range(1, len(LF_SAMPLE)))
def test_lf_only_stream_split_anywhere_matches_whole(cut: int) -> None:
    """LF-only input takes the whole-event path; any split (and the CRLF path, for the same
    events) gives the same events and every byte back."""
    assert _decode(LF_SAMPLE, [cut]) == (LF_EXPECTED, LF_SAMPLE)
    assert _decode(LF_SAMPLE, []) == (LF_EXPECTED, LF_SAMPLE)
    crlf = LF_SAMPLE.replace(b"\n", b"\r\n")
    assert _decode(crlf, [cut])[0] == LF_EXPECTED


def test_switching_between_lf_and_crlf_chunks_mid_event() -> None:
    """A stream whose line ends change between chunks (the LF path hands over to the general one
    with a half-read event, and back)."""
    data = b"event: a\ndata: 1\r\ndata: 2\n\ndata: 3\n\r\nevent: b\ndata: 4\r\n\r\n"
    expected = [("a", "1\n2"), (None, "3"), ("b", "4")]
    for cuts in ([9], [17], [9, 30], [26, 27], list(range(1, len(data)))):
        assert _decode(data, cuts) == (expected, data)
