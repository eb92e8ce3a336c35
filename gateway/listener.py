"""How a listener holds up against hostile clients: slow headers and bodies, many connections from one
address, malformed requests in the log.

- Request heads: aiohttp's keep-alive timer is armed when a connection opens and after each answer,
  and is not pushed back by bytes that do not complete a request head, so with it set to the header
  timeout a head must arrive whole within that time (an idle keep-alive connection is closed then too).
- Request bodies: `body_deadline` (a middleware) fails a body that is not read to its end within the
  body timeout with a 408 and closes the connection.
- Connections per client address: counted by the protocol factory of each listener; one over the cap
  is closed as soon as it is accepted.
- aiohttp logs a malformed request with a traceback and the raw request line (which may carry
  `?key=`): `ServerErrorLog` makes it one line with neither.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_RAW_ECHO = re.compile(r"""b(['"]).*?\1""")  # the parser's echo of the raw line: b'GET /x?key=... HTTP/1.1'
_QUERY = re.compile(r"\?\S*")


class ServerErrorLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger aiohttp's request handler writes its own errors to (`handler_args={"logger": ...}`).

    A request the HTTP parser refused is logged as one line at WARNING (DEBUG for non-HTTP traffic,
    as aiohttp does), naming the client and the parser's complaint, never the request line, a header
    or a query string, and without a traceback. Anything else is passed on unchanged."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        super().__init__(logger or logging.getLogger("aiohttp.server"), {})

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        error = kwargs.get("exc_info")
        if isinstance(error, HttpProcessingError):
            client = args[0] if args else "-"
            self.logger.log(max(min(level, logging.WARNING), logging.DEBUG), "malformed HTTP request from %s: %s (%s)",
                            client, describe_parse_error(error), type(error).__name__)
            return
        super().log(level, msg, *args, **kwargs)


def describe_parse_error(error: HttpProcessingError) -> str:
    """The parser's complaint on one line, without the echo of what the client sent."""
    lines = [line.strip() for line in str(error.message).splitlines()]
    kept = [line for line in lines if line and not line.startswith(("b'", 'b"')) and set(line) != {"^"}]
    text = _QUERY.sub("", _RAW_ECHO.sub("", " ".join(kept))).strip(" :")
    return text[:200] or "unreadable request"


def body_deadline(timeout: float) -> Any:
    """A middleware: a request body not read to its end within `timeout` seconds of the request head
    fails the read with 408 (rendered in the caller's dialect) and the connection is closed after it."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if timeout <= 0 or not request.body_exists or request.content.is_eof():
            return await handler(request)
        timer = asyncio.get_running_loop().call_later(timeout, _expire_body, request)
        try:
            return await handler(request)
        finally:
            timer.cancel()

    return middleware


class BodyTimeout(web.HTTPRequestTimeout, TimeoutError):
    """A body that took too long. A TimeoutError too, so aiohttp's own drain of an unread body after
    the answer stops on it quietly and closes the connection."""


def _expire_body(request: web.Request) -> None:
    if not request.content.is_eof():
        request.content.set_exception(BodyTimeout(text="The request body was not received in time."))


# ---------------------------------------------------------------- connections per client address


class ConnectionCap:
    """Open connections per client address on one listener (0: no cap); `refused` is called for each
    connection turned away (a metric: a log line each would let an attacker flood the log)."""

    def __init__(self, limit: int, refused: Callable[[], object] = lambda: None) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}
        self._refused = refused

    def admit(self, client: str) -> bool:
        count = self.open.get(client, 0)
        if self.limit > 0 and count >= self.limit:
            self._refused()
            return False
        self.open[client] = count + 1
        return True

    def release(self, client: str) -> None:
        count = self.open.get(client, 0) - 1
        if count > 0:
            self.open[client] = count
        else:
            self.open.pop(client, None)


def _client_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "local"  # a unix socket


class _Admitted(asyncio.Protocol):
    """The request handler's protocol behind the per-client cap: a connection over the cap is closed
    before aiohttp sees it; an admitted one is passed through untouched."""

    __slots__ = ("_cap", "_client", "_inner")

    def __init__(self, inner: asyncio.Protocol, cap: ConnectionCap) -> None:
        self._inner = inner
        self._cap = cap
        self._client: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        client = _client_of(transport)
        if not self._cap.admit(client):
            transport.close()
            return
        self._client = client
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._client is not None:
            self._cap.release(self._client)
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._client is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._client is not None else None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _QuietRequestHandler(RequestHandler):
    """aiohttp's request handler, except that its answer to a request the HTTP parser refused says what
    was wrong without echoing the request line or header back (it may carry `?key=` or a key)."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            message = f"Bad request: {describe_parse_error(exc)}"
        return super().handle_error(request, status, exc, message)


class _CappedServer:
    """aiohttp's `web.Server` (the protocol factory of a listener) with the per-client cap in front,
    and request handlers that never echo a malformed request back."""

    def __init__(self, server: web.Server, cap: ConnectionCap) -> None:
        self._server = server
        self.cap = cap

    def __call__(self) -> asyncio.Protocol:
        server = self._server
        handler = _QuietRequestHandler(server, loop=server._loop, **server._kwargs)  # as web.Server.__call__
        return _Admitted(handler, self.cap) if self.cap.limit > 0 else handler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def cap_connections_per_client(app: web.Application, limit: int, refused: Callable[[], object] = lambda: None
                               ) -> None:
    """Serve `app` with at most `limit` open connections per client address on each listener, and
    without cancelling a handler whose client goes away (aiohttp's `handler_cancellation`, which the
    test server turns on): a metered handler forwards and settles in its own task (gateway.proxy), and a
    request the provider served is billed whatever its client does.

    `web.run_app`, `AppRunner` and the test server all build a listener's protocol factory through the
    application's `_make_handler`; wrapping it here makes both hold however the app is served."""
    make_server = app._make_handler

    def make_capped_server(**kwargs: Any) -> Any:
        kwargs["handler_cancellation"] = False
        return _CappedServer(make_server(**kwargs), ConnectionCap(limit, refused))

    app._make_handler = make_capped_server  # type: ignore[method-assign]


def handler_args(header_timeout: float, body_timeout: float) -> dict[str, Any]:
    """aiohttp request handler options for `web.Application(handler_args=...)`: they apply however the
    app is served (run_app, AppRunner, the test server). An unread body left after an answer is
    drained for at most the body timeout (aiohttp's default: 10 s)."""
    return {"keepalive_timeout": header_timeout, "logger": ServerErrorLog(),
            "lingering_time": min(10.0, body_timeout) if body_timeout > 0 else 10.0}
