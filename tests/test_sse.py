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
