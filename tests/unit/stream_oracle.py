"""The stream meters as they were before they worked per chunk (main at 34711db): the SSE decoder
that built one event per event, and meters that searched and decoded every event. The property
tests check that today's meters send the same bytes and read the same usage for any chunking."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

from gateway.dialects.anthropic import parse_usage as anthropic_usage
from gateway.dialects.gemini import parse_usage as gemini_usage
from gateway.dialects.openai import usage_of
from gateway.money import ceil_div
from gateway.sse import SSEEvent
from gateway.usage import Usage


class OldDecoder:
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


_USAGE_OBJECT = re.compile(r'"usage"\s*:\s*\{')
_CHAT_TEXT = re.compile(r'"(?:content|reasoning_content|refusal|arguments|text)"\s*+:\s*+"((?:[^"\\]++|\\.)++)"')
_RESPONSES_DELTA = re.compile(r'"delta"\s*:\s*"((?:[^"\\]|\\.)+)"')
_ANTHROPIC_TEXT = re.compile(r'"(?:text|thinking|partial_json)"\s*+:\s*+"((?:[^"\\]++|\\.)++)"')
_GEMINI_TEXT = re.compile(r'"text"\s*+:\s*+"((?:[^"\\]++|\\.)++)"')
_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


class OldMeter:
    """One of the four old meters (`kind`: chat, responses, anthropic, gemini). `chars` counts the
    characters of the text the estimate was taken from (what a per-run estimate must cover)."""

    def __init__(self, kind: str, hide_usage: bool = False) -> None:
        self.kind, self.hide = kind, hide_usage
        self.decoder = OldDecoder()
        self._usage: Usage | None = None
        self.estimate = self.chars = 0
        self.output_seen = self.finished = False
        self.meta: dict[str, Any] | None = None

    @property
    def usage(self) -> Usage | None:
        if self.kind == "gemini":
            return None if self.meta is None else gemini_usage(self.meta, final=self.finished)
        if self.kind == "anthropic" and self._usage is not None and not self.output_seen:
            return replace(self._usage, output_tokens=None, reasoning_tokens=None)
        return self._usage

    def _text(self, pattern: re.Pattern[str], data: str) -> None:
        texts = pattern.findall(data)
        if texts:
            self.chars += sum(len(t) for t in texts)
            self.estimate += max(1, ceil_div(sum(len(t) for t in texts), 4))

    def feed(self, chunk: bytes) -> bytes:
        events = self.decoder.feed(chunk)
        if self.kind == "chat":
            if not self.hide:
                for event in events:
                    self._chat(event)
                return chunk
            return b"".join(event.raw for event in events if not self._chat(event))
        for event in events:
            getattr(self, "_" + self.kind)(event)
        return chunk

    def finish(self) -> bytes:
        rest = self.decoder.flush()
        return rest if self.kind == "chat" and self.hide else b""

    def _chat(self, event: SSEEvent) -> bool:
        data = event.data
        if _USAGE_OBJECT.search(data):
            try:
                obj = json.loads(data)
            except ValueError:
                return False
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                self._usage = usage_of(obj)
                if obj.get("choices") == []:
                    return True
        self._text(_CHAT_TEXT, data)
        return False

    def _responses(self, event: SSEEvent) -> None:
        name = event.event or ""
        if name.endswith(".delta"):
            self._text(_RESPONSES_DELTA, event.data)
        elif name in _TERMINAL:
            try:
                obj = json.loads(event.data)
            except ValueError:
                return
            response = obj.get("response") if isinstance(obj, dict) else None
            if isinstance(response, dict):
                self._usage = usage_of(response)

    def _anthropic(self, event: SSEEvent) -> None:
        if event.event == "content_block_delta":
            self._text(_ANTHROPIC_TEXT, event.data)
        elif event.event in ("message_start", "message_delta"):
            try:
                obj = json.loads(event.data)
            except ValueError:
                return
            if not isinstance(obj, dict):
                return
            usage = (obj.get("message") or {}).get("usage") if event.event == "message_start" else obj.get("usage")
            if isinstance(usage, dict):
                self._usage = anthropic_usage(usage, self._usage)
                if event.event == "message_delta":
                    self.output_seen = True

    def _gemini(self, event: SSEEvent) -> None:
        try:
            obj = json.loads(event.data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if isinstance(obj.get("usageMetadata"), dict):
            self.meta = obj["usageMetadata"]
        candidates = obj.get("candidates")
        if isinstance(candidates, list):
            if any(isinstance(c, dict) and c.get("finishReason") for c in candidates):
                self.finished = True
            self._text(_GEMINI_TEXT, event.data)
