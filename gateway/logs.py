"""Logs: every record on one line, as text (the default) or as one JSON object (`GATEWAY_LOG_FORMAT=json`,
which `gateway serve --log-format` sets), and one access record per request.

A proxied request's access record (`Access`) is filled in as the request goes: who (account and key id,
never the key), what (dialect, model, route, upstream), how it ended (status, outcome, the upstream's
failure cause) and what it cost. It is written when both the response is done and the call has ended:
a non-streamed answer is sent before its settlement lands (respond-first), and the line carries the
credits actually charged. The client's own `X-Request-ID` and a W3C `traceparent` trace id are
recorded next to the gateway's request id; the client's id is never used as a key for anything.

Cost: the text line is formatted once with an f-string; the JSON line goes through one cached encoder;
nothing is built when the access logger's level is disabled.
"""

from __future__ import annotations

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
    """ISO-8601 UTC timestamps with milliseconds; the seconds part is formatted once per second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def iso(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((created - second) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, and the access fields of an access record."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": self._clock.iso(record.created), "level": record.levelname,
                                "logger": record.name, "msg": record.getMessage()}
        fields = getattr(record, "access", None)
        if fields is not None:
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _ENCODE(line)


def formatter(fmt: str | None = None) -> logging.Formatter:
    """The formatter of `fmt` (default: GATEWAY_LOG_FORMAT)."""
    return JsonFormatter() if (fmt or log_format()) == "json" else logging.Formatter(TEXT_FORMAT)


def setup(level: int = logging.INFO, fmt: str | None = None, stream: IO[str] | None = None) -> None:
    """Configure the root logger: one handler on stderr in the chosen format (a replacement for
    `logging.basicConfig` in `gateway serve`)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def apply_env_format() -> None:
    """With GATEWAY_LOG_FORMAT=json, give the plain stderr handlers `logging.basicConfig` installed the
    JSON formatter (a worker process configured before this module was asked). Test capture handlers
    (subclasses) are left alone."""
    if log_format() != "json":
        return
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(JsonFormatter())


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
    the call has ended (`hold` / `release`)."""

    __slots__ = (
        "_emit",
        "_pending",
        "account_id",
        "cause",
        "client_request_id",
        "credits_micro",
        "dialect",
        "error",
        "estimated",
        "input_tokens",
        "key_id",
        "latency_ms",
        "method",
        "model",
        "outcome",
        "output_tokens",
        "path",
        "request_id",
        "route",
        "settled",
        "span",
        "status",
        "trace_id",
        "ttft_ms",
        "upstream",
        "upstream_ms",
        "upstream_status",
    )

    def __init__(self, request_id: str, client_id: str | None, trace: str | None, dialect: str) -> None:
        self.request_id = request_id
        self.client_request_id = client_id
        self.trace_id = trace
        self.dialect = dialect
        self.account_id: str | None = None
        self.key_id: str | None = None
        self.model: str | None = None
        self.route: str | None = None
        self.upstream: str | None = None
        self.outcome: str | None = None
        self.estimated = False
        self.cause: str | None = None
        self.upstream_status: int | None = None
        self.error: str | None = None
        self.credits_micro: int | None = None
        self.settled = True
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.upstream_ms: float | None = None
        self.ttft_ms: float | None = None
        self.status = 0
        self.latency_ms = 0.0
        self.method = ""
        self.path = ""
        self.span: Any = None  # a gateway.tracing.Span when tracing is on: ended with the call
        self._pending = 2  # the response is done, the call has ended: the last of the two writes the record
        self._emit: Any = None

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
        parts = [f"{self.method} {self.path} {self.status} {self.latency_ms:.1f}ms {self.request_id}",
                 f"outcome={self.outcome_name()}"]
        for name in ("client_request_id", "trace_id", "account_id", "key_id", "model", "route", "upstream", "cause",
                     "upstream_status", "error", "input_tokens", "output_tokens"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value}")
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
            self.logger.info(line, extra={"access": {"request_id": rid, "method": request.method,
                                                     "path": request.path, "status": response.status,
                                                     "latency_ms": round(elapsed * 1000, 1)}})
        else:
            self.logger.info(line)

    def _write(self, access: Access) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if self._json:
            self.logger.info("access", extra={"access": access.fields()})
        else:
            self.logger.info(access.text())
