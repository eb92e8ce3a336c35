"""Server-Sent Events framing that keeps each event's raw bytes, built for metering whole chunks.

`SSEDecoder.feed_run(chunk)` may be called with the stream split anywhere (even inside a `\\r\\n`);
it returns the bytes of the events that chunk completes, as one run, without decoding them. A
meter searches the run once (for a usage key, for delta text) and decodes only the events that
may matter with `Run.event_at`. Concatenating every run plus `flush()`'s remainder gives back the
input exactly, and a run's events are the ones `feed` would decode one by one.

Linear on any input: the unfinished event is kept in a bytearray (no copy of it per chunk) and
scanning resumes where it stopped; an unfinished event above MAX_PENDING bytes is given up
(released as it is, unparsed) instead of buffered without bound.
"""

from __future__ import annotations

import re
from bisect import bisect_right

from gateway.money import ceil_div
from gateway.usage import Usage

#: The most bytes kept for one unfinished event (a Responses `response.completed` carries the whole
#: output, images included, so this is far above any real event).
MAX_PENDING = 64 * 1024 * 1024
#: The most bytes of runs kept for a lazy output estimate before their text is counted.
ESTIMATE_BATCH = 256 * 1024
_LINE_END = re.compile(rb"[\r\n]")


class SSEEvent:
    """One event. A plain slotted class, not a frozen dataclass: a frozen dataclass's `__init__`
    costs several times more (treat it as read-only)."""

    __slots__ = ("data", "event", "raw")

    def __init__(self, raw: bytes, event: str | None, data: str) -> None:
        self.raw = raw  # the event's bytes as received, including the blank line that ended it
        self.event = event  # the `event:` field, if any
        self.data = data  # the `data:` lines joined with "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SSEEvent) and (self.raw, self.event, self.data) == (other.raw, other.event,
                                                                                      other.data)

    def __repr__(self) -> str:
        return f"SSEEvent(raw={self.raw!r}, event={self.event!r}, data={self.data!r})"


def _is_event_field(buf: bytes | bytearray, start: int, end: int) -> bool:
    """Whether the line buf[start:end] is a `data` or `event` field (WHATWG: the name is what
    precedes the first colon, or the whole line). Only these make a block of lines an event;
    comments, `id:`, `retry:` and unknown fields alone end no event (their bytes stay with the
    next event's)."""
    for name in (b"data", b"event"):
        if buf.startswith(name, start, end):
            after = start + len(name)
            return after == end or buf[after] == 58  # ':'
    return False


def _block_has_event(buf: bytes | bytearray, start: int, end: int, eol: bytes) -> bool:
    """Whether the lines of buf[start:end] (ended by `eol`) hold an event field."""
    while start < end:
        line_end = buf.find(eol, start, end)
        if line_end < 0:
            line_end = end
        if _is_event_field(buf, start, line_end):
            return True
        start = line_end + len(eol)
    return False


def _eol_of(data: bytes) -> bytes:
    """The one line end `data` uses: b"\n" (no CR at all), b"\r\n" (every CR and every LF in a
    CRLF), or b"" (mixed, or a CR that may be half of a CRLF: read line by line)."""
    if b"\r" not in data:
        return b"\n"
    pairs = data.count(b"\r\n")
    return b"\r\n" if data.count(b"\r") == pairs == data.count(b"\n") else b""


def _fits(chunk: bytes, eol: bytes) -> bool:
    """Whether `chunk` keeps a buffer with line end `eol` free of any other line end."""
    if eol == b"\n":
        return b"\r" not in chunk
    found = _eol_of(chunk)
    return found == eol or (found == b"\n" and b"\n" not in chunk)


def _ends_with_an_event(chunk: bytes, eol: bytes) -> bool:
    """A quick yes for the usual chunk, read from a clean state: it ends with a blank line right
    after a block whose first line is a `data` or `event` field."""
    width = len(eol)
    n = len(chunk) - 2 * width
    if not chunk.endswith(eol + eol) or n <= 0 or chunk.endswith(eol, 0, n):
        return False
    j = chunk.rfind(eol + eol, 0, n)
    return chunk.startswith((b"data:", b"event:"), j + 2 * width if j >= 0 else 0)


def _last_event_end(buf: bytes | bytearray, pos: int, last: int, is_open: bool, eol: bytes) -> int:
    """With one line end `eol` throughout: walk back from the blank line ending at `last` to the
    last blank line that ends an event (0: none). `pos` is a line start; `is_open`: the lines
    before it since the last blank line hold an event field."""
    width, sep = len(eol), eol + eol
    end = last
    while True:
        k = end
        while k > pos and buf.endswith(eol, pos, k):
            k -= width
        if k == pos:  # only blank lines in [pos, end): the first one ends the open block
            return pos + width if is_open else 0
        j = buf.rfind(sep, pos, k)
        if j >= 0:
            start, continues = j + 2 * width, False
        elif buf.startswith(eol, pos):  # a blank line at pos ended the open block
            start, continues = pos + width, False
        else:
            start, continues = pos, True
        if (continues and is_open) or _block_has_event(buf, start, k, eol):
            return k + 2 * width
        if continues:
            return 0
        end = start


class SSEDecoder:
    """Incremental SSE framing (WHATWG rules: CRLF, LF or CR line ends; `:` comments ignored).

    A buffer with one kind of line end throughout (LF, or CRLF: what providers send) is framed
    from its last blank line with a few searches; any other is read line by line."""

    __slots__ = ("_buf", "_eol", "_open", "_pos", "_searched")

    def __init__(self) -> None:
        self._buf = bytearray()  # from the raw start of the next event
        self._pos = 0  # the start of the first line not yet read (lines before it are in _open)
        self._open = False  # the lines read since the last blank line include an event field
        self._searched = 0  # no line end (b"" mode) / blank line (else) starts in [_pos, _searched)
        self._eol = b"\n"  # the buffer's one line end, b"" when mixed (read line by line)

    @property
    def eol(self) -> bytes:
        """The line end of the run `feed_run` returned last (b"": mixed), for `Run`."""
        return self._eol

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events `chunk` completes, decoded."""
        run = self.feed_run(chunk)
        return parse_events(run, self._eol) if run else []

    def feed_run(self, chunk: bytes) -> bytes:
        """The bytes of the events `chunk` completes (b"" if none): `chunk` itself when it holds
        whole events only and nothing was pending."""
        buf = self._buf
        if not buf:
            if not chunk:
                return b""
            eol = self._eol = _eol_of(chunk)
            if eol:
                if _ends_with_an_event(chunk, eol):
                    return chunk  # the usual chunk: whole events, no copy
                end = self._scan(chunk, eol)
                if end == len(chunk):
                    self._pos = self._searched = 0
                    return chunk  # the usual chunk: whole events, no copy
                buf += memoryview(chunk)[end:]
                self._pos -= end
                self._searched = max(self._searched - end, self._pos)
                return chunk[:end]
            buf += chunk
            return self._release(self._read_lines())
        buf += chunk
        eol = self._eol
        if eol and not _fits(chunk, eol):
            eol = self._eol = b""  # mixed line ends from here on: read line by line
            self._searched = self._pos  # the fast path only looked for blank lines
        return self._release(self._scan(buf, eol) if eol else self._read_lines())

    def _release(self, end: int) -> bytes:
        buf = self._buf
        if end <= 0 and len(buf) <= MAX_PENDING:
            return b""
        if len(buf) - end > MAX_PENDING:  # an unfinished event beyond any real one: give it up
            end = len(buf)
            self._pos = self._searched = end
            self._open = False
        run = bytes(buf[:end])
        del buf[:end]
        self._pos -= end
        self._searched = max(self._searched - end, self._pos)
        return run

    def _scan(self, buf: bytes | bytearray, eol: bytes) -> int:
        """One line end throughout: the end of the last event (0: none), found from the last blank
        line instead of line by line. Leaves `_pos` after that blank line (a clean state)."""
        pos, width = self._pos, len(eol)
        j = buf.rfind(eol + eol, max(pos, self._searched - 2 * width + 1))
        if j >= 0:
            last = j + 2 * width
        elif buf.startswith(eol, pos):
            last = pos + width
        else:
            self._searched = len(buf)
            return 0
        end = _last_event_end(buf, pos, last, self._open, eol)
        self._pos = self._searched = last
        self._open = False
        return end

    def _read_lines(self) -> int:
        """Any line ends: line by line from `_pos`. Returns the end of the last event (0: none)."""
        buf = self._buf
        n = len(buf)
        pos, is_open, end = self._pos, self._open, 0
        at = max(pos, self._searched)
        while True:
            found = _LINE_END.search(buf, at)
            if found is None:
                at = n
                break
            cr = found.start()
            if buf[cr] == 13:
                if cr + 1 == n:  # a CR at the end may be the first half of CRLF: wait for more
                    at = cr
                    break
                nxt = cr + 2 if buf[cr + 1] == 10 else cr + 1
            else:
                nxt = cr + 1
            if cr == pos:
                if is_open:
                    end = nxt
                is_open = False
            elif not is_open and _is_event_field(buf, pos, cr):
                is_open = True
            pos = at = nxt
        self._pos, self._open, self._searched = pos, is_open, at
        return end

    def flush(self) -> bytes:
        """Bytes of an unfinished event at end of stream (forwarded as they were)."""
        rest = bytes(self._buf)
        self._buf = bytearray()
        self._pos = self._searched = 0
        self._open = False
        self._eol = b"\n"
        return rest


def _field(line: bytes, fields: list[str], event: str | None) -> str | None:
    """Apply one line to the event being built; returns its `event` name."""
    if line.startswith(b":"):
        return event
    name, sep, value = line.partition(b":")
    if sep and value.startswith(b" "):
        value = value[1:]
    if name == b"data":
        fields.append(value.decode("utf-8", "replace"))
    elif name == b"event":
        return value.decode("utf-8", "replace")
    return event


def parse_events(run: bytes, eol: bytes | None = None) -> list[SSEEvent]:
    """The events of a run of complete events (as `feed_run` returns; a CR at its end is a line end);
    `eol`: its one line end if known (`SSEDecoder.eol`; b"": mixed)."""
    if not run:
        return []
    if eol is None:
        eol = _eol_of(run)
    if eol:
        return _parse_one_eol(run, eol)
    events: list[SSEEvent] = []
    pos = start = 0
    n = len(run)
    event: str | None = None
    data: list[str] = []
    while pos < n:
        found = _LINE_END.search(run, pos)
        if found is None:
            break
        cr = found.start()
        nxt = cr + 2 if run[cr] == 13 and run[cr + 1:cr + 2] == b"\n" else cr + 1
        if cr == pos:
            if data or event is not None:
                events.append(SSEEvent(run[start:nxt], event, "\n".join(data)))
                start = nxt
            # a blank line ending no event (after comments only) stays with the next event's bytes
            event, data = None, []
        else:
            event = _field(run[pos:cr], data, event)
        pos = nxt
    return events


def _parse_one_eol(run: bytes, eol: bytes) -> list[SSEEvent]:
    """`parse_events` for one line end throughout (what providers send): whole events found by
    their blank line, a one-line `data: ` event without per-line work."""
    events: list[SSEEvent] = []
    pos = start = 0
    n, width, sep = len(run), len(eol), eol + eol
    event: str | None = None
    data: list[str] = []
    while pos < n:
        if run.startswith(eol, pos):  # a blank line: the end of an event (or of comments only)
            end = pos + width
        else:
            blank = run.find(sep, pos)
            if blank < 0:
                break
            end = blank + 2 * width
            if run.startswith(b"data: ", pos) and run.find(eol, pos, blank) < 0:
                events.append(SSEEvent(run[start:end], None, run[pos + 6:blank].decode("utf-8", "replace")))
                start = pos = end
                continue
            for line in run[pos:blank].split(eol):
                event = _field(line, data, event)
        pos = end
        if data or event is not None:
            events.append(SSEEvent(run[start:end], event, "\n".join(data)))
            start = end
        event, data = None, []
    return events


class Run:
    """A run of complete events (from `feed_run`) and lookups of single events in it by offset, so
    that a meter decodes only the events a search over the whole run pointed at."""

    __slots__ = ("_ends", "_eol", "_events", "data")

    def __init__(self, data: bytes, eol: bytes | None = None) -> None:
        self.data = data
        self._eol = eol  # the run's one line end (b"": mixed), if known (`SSEDecoder.eol`), else found once
        self._events: list[SSEEvent] | None = None  # with mixed line ends: all decoded, once
        self._ends: list[int] = []

    def event_at(self, at: int) -> tuple[int, int, SSEEvent | None]:
        """The raw span (start, end) of the event whose bytes hold offset `at` (not a line end),
        and the event (None: `at` is in a block of comments only, or after the run's last event)."""
        if self._eol is None:
            self._eol = _eol_of(self.data)
        if self._eol:
            return self._event_at(at, self._eol)
        if self._events is None:  # mixed line ends: every event decoded, once
            self._events = parse_events(self.data)
            total = 0
            for event in self._events:
                total += len(event.raw)
                self._ends.append(total)
        i = bisect_right(self._ends, at)
        if i == len(self._events):
            return (self._ends[-1] if self._ends else 0), len(self.data), None
        return (self._ends[i - 1] if i else 0), self._ends[i], self._events[i]

    def _event_at(self, at: int, eol: bytes) -> tuple[int, int, SSEEvent | None]:
        """With one line end: the block around `at` found by its blank lines, decoded alone."""
        run, width = self.data, len(eol)
        sep = eol + eol
        j = run.rfind(sep, 0, at)
        block = j + 2 * width if j >= 0 else 0
        k = run.find(sep, at)
        end = k + 2 * width if k >= 0 else len(run)
        found = _parse_one_eol(run[block:end], eol)
        if not found:
            return block, end, None
        # the event's raw bytes start after the previous event: comment-only blocks before it are its
        start = block
        while start > 0:
            k = start
            while k > 0 and run.endswith(eol, 0, k):
                k -= width
            if k == 0:
                start = 0
                break
            j = run.rfind(sep, 0, k)
            prev = j + 2 * width if j >= 0 else 0
            if _block_has_event(run, prev, k, eol):
                start = k + 2 * width
                break
            start = prev
        event = found[-1]
        if start == block:  # nothing before it in the block: its raw bytes are already right
            return start, end, event
        return start, end, SSEEvent(run[start:end], event.event, event.data)

    def events_at(self, marks: list[int]) -> list[tuple[int, int, SSEEvent]]:
        """The events holding the offsets `marks` (ascending), each once, in stream order."""
        out: list[tuple[int, int, SSEEvent]] = []
        done = -1
        for at in marks:
            if at < done:
                continue
            start, end, event = self.event_at(at)
            done = end
            if event is not None:
                out.append((start, end, event))
        return out


def unreported_output(usage: Usage | None, text: TextEstimate) -> int:
    """A meter's `estimated_output_tokens`: the estimate from the text seen, or 0 when usage reports
    the output count (billing then never uses the estimate: the text is not searched at all)."""
    return 0 if usage is not None and usage.output_tokens is not None else text.tokens()


class TextEstimate:
    """The output tokens of the generated text in a stream's runs (`pattern`'s group: the contents
    of a JSON string), about 4 characters a token and at least 1 for a batch with any text: the
    estimate billed when usage never reports the output. Counted lazily, a batch of runs (at most
    ESTIMATE_BATCH bytes kept) with one search: not at all when usage reports the output."""

    __slots__ = ("_pattern", "_runs", "_size", "_tokens")

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self._pattern = pattern
        self._runs: list[bytes] = []
        self._size = 0
        self._tokens = 0

    def add(self, run: bytes) -> None:
        self._runs.append(run)
        self._size += len(run)
        if self._size >= ESTIMATE_BATCH:
            self._count()

    def tokens(self) -> int:
        if self._runs:
            self._count()
        return self._tokens

    def _count(self) -> None:
        texts = self._pattern.findall(b"".join(self._runs).decode("utf-8", "replace"))
        self._runs, self._size = [], 0
        if texts:
            self._tokens += max(1, ceil_div(sum(map(len, texts)), 4))
