"""A line-buffered Server-Sent Events decoder that keeps each event's raw bytes.

`feed(chunk)` may be called with the stream split anywhere (even inside a `\\r\\n`); it returns the
events completed by that chunk. Concatenating every event's `raw` plus `flush()`'s remainder gives
back the input exactly, so a filtered stream forwards untouched bytes for every event it keeps.
"""

from __future__ import annotations


class SSEEvent:
    """One event. A plain slotted class, not a frozen dataclass: one is built per event of every
    stream, and a frozen dataclass's `__init__` costs several times more (treat it as read-only)."""

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


class SSEDecoder:
    """Incremental SSE decoder (WHATWG rules: CRLF, LF or CR line ends; `:` comments ignored)."""

    __slots__ = ("_buf", "_data", "_event", "_raw_start", "_scan")

    def __init__(self) -> None:
        self._buf = b""
        self._scan = 0  # where to resume looking for a line end in _buf
        self._raw_start = 0  # start in _buf of the event being built
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" not in buf:
            return self._feed_lf(buf)
        events: list[SSEEvent] = []
        pos = self._scan
        start = self._raw_start
        n = len(buf)
        while pos < n:
            lf = buf.find(b"\n", pos)
            cr = buf.find(b"\r", pos)
            if lf < 0 and cr < 0:
                break
            if cr >= 0 and (lf < 0 or cr < lf):
                if cr + 1 == n:  # a CR at the end may be the first half of CRLF: wait for more
                    break
                line_end, next_pos = cr, cr + 2 if buf[cr + 1 : cr + 2] == b"\n" else cr + 1
            else:
                line_end, next_pos = lf, lf + 1
            line = buf[pos:line_end]
            pos = next_pos
            if not line:
                if self._data or self._event is not None:
                    events.append(SSEEvent(buf[start:pos], self._event, "\n".join(self._data)))
                    start = pos
                # a blank line ending no event (after comments only) stays with the next event's bytes
                self._event, self._data = None, []
                continue
            self._field(line)
        # keep only the unfinished event in the buffer
        self._buf = buf[start:]
        self._scan = pos - start
        self._raw_start = 0
        return events

    def _feed_lf(self, buf: bytes) -> list[SSEEvent]:
        """`feed` for a buffer with LF line ends only (what providers send): whole events are found
        by their blank line and split at once, instead of a scan per line. The state it leaves is
        the general path's: `_scan` at the start of the first line not yet read."""
        events: list[SSEEvent] = []
        pos = self._scan
        start = self._raw_start
        n = len(buf)
        while pos < n:
            if buf[pos] == 10:  # a blank line: the end of an event (or of comments only)
                end = pos + 1
            else:
                blank = buf.find(b"\n\n", pos)
                if blank < 0:
                    break
                end = blank + 2
                if (buf.startswith(b"data: ", pos) and not self._data and buf.find(b"\n", pos, blank) < 0):
                    # the usual event, one `data: ` line: no per-line work
                    events.append(SSEEvent(buf[start:end], self._event, buf[pos + 6:blank].decode("utf-8", "replace")))
                    start = pos = end
                    self._event = None
                    continue
                for line in buf[pos:blank].split(b"\n"):
                    self._field(line)
            pos = end
            if self._data or self._event is not None:
                events.append(SSEEvent(buf[start:end], self._event, "\n".join(self._data)))
                start = end
            self._event, self._data = None, []
        self._buf = buf[start:]
        self._scan = pos - start
        self._raw_start = 0
        return events

    def _field(self, line: bytes) -> None:
        if line.startswith(b":"):
            return
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")

    def flush(self) -> bytes:
        """Bytes of an unfinished event at end of stream (forwarded as they were)."""
        rest, self._buf, self._scan, self._raw_start = self._buf, b"", 0, 0
        self._event, self._data = None, []
        return rest
