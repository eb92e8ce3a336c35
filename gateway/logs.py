"""Logs: every record on one line, as text (the default) or as one JSON object (`GATEWAY_LOG_FORMAT=json`,
which `gateway serve --log-format` sets), and one access record per request.

A proxied request's access record (`Access`) is filled in as the request goes: who (account and key id,
never the key), what (dialect, model, route, upstream), how it ended (status, outcome, the upstream's
failure cause) and what it cost. It is written when both the response is done and the call has ended:
a non-streamed answer is sent before its settlement lands (respond-first), and the line carries the
credits actually charged. The client's own `X-Request-ID` and a W3C `traceparent` trace id are
recorded next to the gateway's request id; the client's id is never used as a key for anything.

Cost: the text line is formatted once with an f-string; the JSON line goes through one cached encoder;
nothing is built when the access logger's level is disabled. When the only handler an access line would
reach is the one `setup` installs (`gateway serve`), the line is formatted straight into that handler's
buffer, without a LogRecord, and written in chunks of whole lines (see `LineHandler`); an operator's own
handlers, filters or formatters get every record through logging as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import time
from typing import IO, Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gateway.money import format_credits

LOG_FORMAT_ENV = "GATEWAY_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(message)s"
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode

# ---------------------------------------------------------------- formats


def log_format() -> str:
    """`json` or `text`, from GATEWAY_LOG_FORMAT (anything else: text)."""
    return _format_from_env()


def _format_from_env() -> str:
    return "json" if os.environ.get(LOG_FORMAT_ENV, "").strip().lower() == "json" else "text"


class _Clock:
    """Timestamps with milliseconds whose seconds part is formatted once per second: ISO-8601 UTC
    (`iso`), or local time as logging's default asctime (`local`)."""

    __slots__ = ("_local", "_local_second", "_prefix", "_second")

    def __init__(self) -> None:
        self._second = self._local_second = -1
        self._prefix = self._local = ""

    def iso(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((created - second) * 1000):03d}Z"

    def local(self, created: float) -> str:
        second = int(created)
        if second != self._local_second:
            self._local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._local_second = second
        return f"{self._local},{int((created - second) * 1000):03d}"


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT` (the lines `gateway serve` always wrote), its time formatted once per second."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._clock = _Clock()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._clock.local(record.created)

    def info_line(self, created: float, name: str, msg: str, fields: dict[str, Any] | None) -> str:
        """What `format` makes of an INFO record of `name` with `msg` (no exception), built directly."""
        return f"{self._clock.local(created)} {os.getpid()} INFO {msg}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, and the access fields of an access record."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        line = self._fields(record.created, record.levelname, record.name, record.getMessage(),
                            getattr(record, "access", None))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return _ENCODE(line)

    def info_line(self, created: float, name: str, msg: str, fields: dict[str, Any] | None) -> str:
        """What `format` makes of an INFO record of `name` with `msg` and access `fields`, built directly."""
        return _ENCODE(self._fields(created, "INFO", name, msg, fields))

    def _fields(self, created: float, level: str, name: str, msg: str, fields: dict[str, Any] | None
                ) -> dict[str, Any]:
        line: dict[str, Any] = {"ts": self._clock.iso(created), "level": level, "logger": name, "msg": msg}
        if fields is not None:
            line.update(fields)
        return line


def formatter(fmt: str | None = None) -> logging.Formatter:
    """The formatter of `fmt` (default: GATEWAY_LOG_FORMAT)."""
    return JsonFormatter() if (fmt or log_format()) == "json" else TextFormatter()


#: Buffered access lines are written when they would pass this many bytes: whole lines only, and within
#: PIPE_BUF (4096 on Linux), so that the lines of several workers sharing one pipe never interleave.
ACCESS_CHUNK_BYTES = 4096
#: ... and at the latest this long after the first of them was buffered (a timer of the event loop).
ACCESS_FLUSH_SECONDS = 0.5


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `setup` installs: logging's records as a StreamHandler writes them, plus access lines
    formatted by the caller (`write_line`), which are buffered. Buffered lines are written, each once and
    in order, before any other record, when they pass ACCESS_CHUNK_BYTES, within ACCESS_FLUSH_SECONDS, and
    on `flush` (at shutdown, and by logging's own exit hook)."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def write_line(self, line: str) -> None:
        size = (len(line) if line.isascii() else len(line.encode())) + 1
        with self.lock:  # type: ignore[union-attr]  # set by Handler.createLock
            if self._lines and self._bytes + size > ACCESS_CHUNK_BYTES:
                self._write_buffered()
            self._lines.append(line)
            self._bytes += size
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop to flush later: now
            self.flush()
            return
        if self._timer is None or self._timer_loop is not loop:
            self._timer, self._timer_loop = loop.call_later(ACCESS_FLUSH_SECONDS, self._on_timer), loop

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def _write_buffered(self) -> None:
        """Write the buffered lines in one call (the caller holds the lock)."""
        lines, self._lines, self._bytes = self._lines, [], 0
        try:
            self.stream.write(self.terminator.join(lines) + self.terminator)
            self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"name": "aiohttp.access", "msg": f"{len(lines)} access lines"}))

    def emit(self, record: logging.LogRecord) -> None:
        if self._lines:  # the lines buffered before this record are written before it
            self._write_buffered()
        super().emit(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._lines:
                self._write_buffered()
            super().flush()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # the stream is closed already
            self.flush()
        super().close()


def direct_handler(logger: logging.Logger) -> LineHandler | None:
    """The `LineHandler` an INFO record of `logger` would reach, when it is the only handler it would
    reach and nothing on the way filters or formats it otherwise; None when logging must do it."""
    if logger.filters or logger.disabled:
        return None
    found: LineHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if found is not None or type(handler) is not LineHandler or handler.filters or handler.level > logging.INFO:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    if found is None or type(found.formatter) not in (TextFormatter, JsonFormatter):
        return None
    return found


def flush() -> None:
    """Write what the root logger's handlers buffer (`gateway serve` calls it once it has stopped)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def setup(level: int = logging.INFO, fmt: str | None = None, stream: IO[str] | None = None) -> None:
    """Configure the root logger: one handler on stderr in the chosen format (a replacement for
    `logging.basicConfig` in `gateway serve`)."""
    handler = LineHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def apply_env_format() -> None:
    """Give the plain stderr handlers `logging.basicConfig` installed (a worker process configured
    before this module was asked) the formatter GATEWAY_LOG_FORMAT names: JSON, or for text the same
    lines as before, formatted more cheaply. Test capture handlers (subclasses) are left alone."""
    json_format = log_format() == "json"
    for handler in logging.getLogger().handlers:
        if type(handler) is not logging.StreamHandler or isinstance(handler.formatter, JsonFormatter | TextFormatter):
            continue
        if json_format:
            handler.setFormatter(JsonFormatter())
        elif handler.formatter is not None and handler.formatter._fmt == TEXT_FORMAT:
            handler.setFormatter(TextFormatter())


# ---------------------------------------------------------------- inbound ids

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def client_request_id(value: str | None) -> str | None:
    """The client's X-Request-ID when it is 1-128 printable ASCII characters without spaces, else None."""
    if value and len(value) <= 128 and value.isascii() and value.isprintable() and " " not in value:
        return value
    return None


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a valid W3C `traceparent` (version 00 exactly 55 characters; a higher version may
    carry more; ff, all-zero trace or parent ids are invalid), else None."""
    if not traceparent or len(traceparent) < 55:
        return None
    found = _TRACEPARENT.fullmatch(traceparent.strip())
    if found is None:
        return None
    version, trace, parent, _flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest) or trace == "0" * 32 or parent == "0" * 16:
        return None
    return trace


# ---------------------------------------------------------------- access records

#: An upstream failure's cause (also the label of gateway_upstream_errors_total).
CAUSES = ("connect", "timeout", "redirect", "protocol", "status_4xx", "status_5xx")

#: billing's end_call outcomes -> the access record's outcome.
_OUTCOMES = {"ok": "served", "refused": "refused", "client_disconnected": "client_gone",
             "internal_error": "error", "upstream_cut": "upstream_error"}


def outcome_of(end: str) -> str:
    """The access outcome of a call ended with billing's `outcome` (its `_estimated` suffix dropped)."""
    base = end.removesuffix("_estimated")
    found = _OUTCOMES.get(base)
    if found is not None:
        return found
    return "upstream_error" if base.startswith("upstream_") else "error"


class Access:
    """What the access record of one proxied request says; written once the response is done and
    the call has ended (`call_ended`). Facts not known stay at the class's defaults (None): a request
    sets only what it learns, which keeps building the record cheap."""

    account_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    route: str | None = None
    upstream: str | None = None
    outcome: str | None = None
    estimated = False
    cause: str | None = None
    upstream_status: int | None = None
    error: str | None = None
    credits_micro: int | None = None
    settled = True
    input_tokens: int | None = None
    output_tokens: int | None = None
    upstream_ms: float | None = None
    ttft_ms: float | None = None
    status = 0
    latency_ms = 0.0
    method = ""
    path = ""
    span: Any = None  # a gateway.tracing.Span when tracing is on: ended with the call
    _emit: Any = None  # the access logger's writer, once the response is done

    def __init__(self, request_id: str, client_id: str | None, trace: str | None, dialect: str) -> None:
        self.request_id = request_id
        self.client_request_id = client_id
        self.trace_id = trace
        self.dialect = dialect
        self._pending = 2  # the response is done, the call has ended: the last of the two writes the record

    def call_ended(self, status: int) -> None:
        """The call is over (settled or released, or refused before anything was held): `status` is
        what the client was (or will be) answered."""
        if self.span is not None:
            span, self.span = self.span, None
            span.end(self, status)
        self._release()

    def _release(self) -> None:
        self._pending -= 1
        if self._pending == 0 and self._emit is not None:
            self._emit(self)

    def fields(self) -> dict[str, Any]:
        """The JSON access fields (None values left out)."""
        out: dict[str, Any] = {
            "request_id": self.request_id, "client_request_id": self.client_request_id, "trace_id": self.trace_id,
            "method": self.method, "path": self.path, "status": self.status, "outcome": self.outcome_name(),
            "account_id": self.account_id, "key_id": self.key_id, "dialect": self.dialect, "model": self.model,
            "route": self.route, "upstream": self.upstream, "cause": self.cause,
            "upstream_status": self.upstream_status, "error": self.error,
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "latency_ms": round(self.latency_ms, 1),
            "upstream_ms": round(self.upstream_ms, 1) if self.upstream_ms is not None else None,
            "ttft_ms": round(self.ttft_ms, 1) if self.ttft_ms is not None else None,
        }
        if self.credits_micro is not None:
            out["credits"] = format_credits(self.credits_micro)
            out["credits_micro"] = self.credits_micro
            if not self.settled:
                out["settlement"] = "queued"
        if self.estimated:
            out["estimated"] = True
        return {k: v for k, v in out.items() if v is not None}

    def outcome_name(self) -> str:
        if self.outcome is not None:
            return self.outcome
        return outcome_for_status(self.status)

    def text(self) -> str:
        """The compact text line: the request line, then key=value facts that are known."""
        parts = [f"{self.method} {self.path} {self.status} {self.latency_ms:.1f}ms {self.request_id} "
                 f"outcome={self.outcome_name()}"]
        if self.client_request_id is not None:
            parts.append(f"client_request_id={self.client_request_id}")
        if self.trace_id is not None:
            parts.append(f"trace_id={self.trace_id}")
        if self.account_id is not None:
            parts.append(f"account_id={self.account_id} key_id={self.key_id}")
        if self.model is not None:
            parts.append(f"model={self.model}")
        if self.route is not None:
            parts.append(f"route={self.route} upstream={self.upstream}")
        if self.cause is not None:
            parts.append(f"cause={self.cause}")
        if self.upstream_status is not None:
            parts.append(f"upstream_status={self.upstream_status}")
        if self.error is not None:
            parts.append(f"error={self.error}")
        if self.input_tokens is not None or self.output_tokens is not None:
            parts.append(f"input_tokens={self.input_tokens} output_tokens={self.output_tokens}")
        if self.credits_micro is not None:
            parts.append(f"credits={format_credits(self.credits_micro)}")
            if not self.settled:
                parts.append("settlement=queued")
        if self.upstream_ms is not None:
            parts.append(f"upstream_ms={self.upstream_ms:.1f}")
        if self.ttft_ms is not None:
            parts.append(f"ttft_ms={self.ttft_ms:.1f}")
        return " ".join(parts)


def outcome_for_status(status: int) -> str:
    """The outcome of a request that never reached the upstream (or was not a metered call)."""
    if status < 400:
        return "served"
    if status == 429:
        return "limited"
    if status == 499:
        return "client_gone"
    return "refused" if status < 500 else "error"


ACCESS = web.RequestKey("access", Access)


class AccessLogger(AbstractAccessLogger):
    """One line per request (run the app with it: aiohttp's default prints the query string, which may
    hold `?key=`). A proxied request's line is its `Access` record, written when its call has ended too;
    any other request gets method, path, status, time and request id."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._json = _format_from_env() == "json"

    def log(self, request: Any, response: Any, time: float) -> None:
        access: Access | None = request.get(ACCESS)
        if access is None:
            self._plain(request, response, time)
            return
        access.method, access.path = request.method, request.path
        access.status, access.latency_ms = response.status, time * 1000
        access._emit = self._write
        access._release()

    def _plain(self, request: Any, response: Any, elapsed: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        rid = response.headers.get("x-gateway-request-id") or response.headers.get("x-request-id", "-")
        line = f"{request.method} {request.path} {response.status} {elapsed * 1000:.1f}ms {rid}"
        if self._json:
            self._emit(line, {"access": {"request_id": rid, "method": request.method, "path": request.path,
                                         "status": response.status, "latency_ms": round(elapsed * 1000, 1)}})
        else:
            self._emit(line, None)

    def _write(self, access: Access) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if self._json:
            self._emit("access", {"access": access.fields()})
        else:
            self._emit(access.text(), None)

    def _emit(self, line: str, extra: dict[str, Any] | None) -> None:
        """`logger.info(line)`: straight into the gateway's own handler's buffer when that is all logging
        would do with it, else through logging (without looking up the caller's frame)."""
        logger = self.logger
        handler = direct_handler(logger)
        if handler is not None:
            formatter: TextFormatter | JsonFormatter = handler.formatter  # type: ignore[assignment]
            handler.write_line(formatter.info_line(time.time(), logger.name, line,
                                                   extra["access"] if extra is not None else None))
            return
        logger.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, line, (), None, extra=extra))
