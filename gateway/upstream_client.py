"""A lean HTTP/1.1 client for the metered hot path: one request per pooled keep-alive connection,
parsed by llhttp (through `httptools`, the parser uvicorn uses), with no task, lock or stream object
per request. aiohttp's client costs about 90 µs of CPU per request on this path, this one about 35 µs
(bench/RESULTS.md, round 3). Token counting uses it too; webhook deliveries keep aiohttp's session.

What it does, and no more, since it only ever talks to a configured provider:
- HTTP/1.1 over TCP or TLS (the system's default trust store, as aiohttp's default), keep-alive pools
  per origin; an idle connection older than `IDLE_SECONDS` or closed by the peer is not reused.
- No redirects followed (a 3xx is answered as it is: it would carry the provider key elsewhere), no
  proxies from the environment (aiohttp's session did not trust the environment either).
- Bodies framed by Content-Length, chunked, or by the connection's close; `Content-Encoding` gzip and
  deflate decoded (requests ask for identity; a provider that compresses anyway is still read).
- Timeouts: `connect` for the connection (DNS, TCP, TLS), `read` between two reads from the socket
  (while the consumer is slower than the provider, reading is paused and that time does not count).
- Limits on a hostile upstream: the response head is capped (`MAX_HEAD_BYTES`, `MAX_HEADERS`), and a
  streamed body is read only as fast as the consumer takes it (the buffer is bounded by pausing reads).

Errors are aiohttp's classes (or subclasses of them), so callers and access records read the same as
with aiohttp: `ServerTimeoutError` / `ConnectionTimeoutError`, `ServerDisconnectedError`,
`ClientPayloadError`, and `ClientConnectorError` here for a connection that could not be made.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
import zlib
from typing import Any

import aiohttp
import httptools
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

IDLE_SECONDS = 15.0  # aiohttp's keep-alive default: a provider may close an idle connection after that
MAX_IDLE_PER_ORIGIN = 128
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128
HIGH_WATER = 256 * 1024  # buffered body bytes at which reading pauses until the consumer catches up


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())  # until the head arrives


class ClientConnectorError(aiohttp.ClientConnectionError):
    """The connection to the upstream could not be made (named as aiohttp's, whose place it takes)."""


class UpstreamProtocolError(aiohttp.ClientConnectionError):
    """The upstream's answer broke HTTP (malformed or oversized head), or a header could not be sent."""


@functools.lru_cache(maxsize=1024)
def _target(url: str) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, Host header, request target) of `url`, encoded as aiohttp encodes a
    string URL (yarl), cached per URL: the hot path's URLs repeat."""
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise ClientConnectorError(f"unsupported upstream URL scheme {parsed.scheme!r}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.scheme, parsed.raw_host, port, parsed.host_port_subcomponent or parsed.raw_host, parsed.raw_path_qs


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one response in flight on it."""

    def __init__(self, client: UpstreamClient, origin: tuple[str, str, int]) -> None:
        self.client, self.origin = client, origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.lost = False
        self.idle_since = 0.0

    # -- transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: the connection is out of step
            self.close()
            return
        response.last_read = self.loop.time()
        if not response.head_done:
            response.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            error: Exception = (aiohttp.ClientPayloadError(f"malformed upstream body ({type(exc).__name__})")
                                if response.head_done else UpstreamProtocolError(
                                    f"malformed upstream response ({type(exc).__name__})"))
            self._fail(error)
            return
        if not response.head_done and response.head_bytes > MAX_HEAD_BYTES:
            self._fail(UpstreamProtocolError("the upstream's response head is too large"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        response = self.response
        if response is not None:
            self.response = None
            response.connection_ended()

    # -- parser callbacks (llhttp)
    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        assert response is not None
        raw = response.raw_headers
        response.head_size += len(name) + len(value)
        if len(raw) >= MAX_HEADERS or response.head_size > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("too many or too large headers")
        raw.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            response.raw_headers = []
            response.interim = True
            return
        response.head_complete(status)
        if response.bodiless:  # an answer to HEAD has no body, whatever its Content-Length says; llhttp
            self.response = None  # cannot be told so: the message ends here and the connection is dropped
            response.message_complete()
            self.close()

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None and not response.interim:
            response.feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None:
            return
        if response.interim:
            response.interim = False
            response.head_bytes = response.head_size = 0
            return
        self.response = None
        keep = self.parser.should_keep_alive()
        response.message_complete()
        if keep and not self.lost:
            self.client.release(self)
        else:
            self.close()

    # -- helpers
    def _fail(self, error: Exception) -> None:
        response, self.response = self.response, None
        self.close()
        if response is not None:
            response.fail(error)

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """One request and its answer: `async with client.request(...) as up` sends the request and waits
    for the response head; `read()` returns the whole body, `next_chunk()` the body as it arrives
    (b"" at its end). Leaving the block before the body was read closes the connection."""

    def __init__(self, client: UpstreamClient, method: str, url: str, body: bytes, headers: dict[str, str],
                 params: dict[str, str] | None, connect_timeout: float | None, read_timeout: float | None) -> None:
        self._client = client
        self._request = (method, url, body, headers, params)
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._conn: _Connection | None = None
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._whole = False  # read() wants the whole body: reading is never paused
        self._done = False  # the whole body is in (or failed)
        self._error: Exception | None = None
        self._decoder: Any = None
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.content_type = "application/octet-stream"
        self.raw_headers: list[tuple[str, str]] = []
        self.head_done = False
        self.head_bytes = 0  # bytes received while the head is incomplete
        self.head_size = 0  # bytes of header names and values
        self.interim = False
        self.framed = False  # Content-Length or chunked: a close before the end is an error
        self.bodiless = method == "HEAD"
        self.last_read = 0.0

    async def __aenter__(self) -> UpstreamResponse:
        method, url, body, headers, params = self._request
        scheme, host, port, host_header, target = _target(url)
        if params:
            target = str(URL(url).extend_query(params).raw_path_qs)
        head = [f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\nContent-Length: {len(body)}\r\n"]
        seen = set()
        for name, value in headers.items():
            if "\r" in name or "\n" in name or ":" in name or "\r" in value or "\n" in value:
                raise UpstreamProtocolError(f"invalid character in the request header {name[:40]!r}")
            lowered = name.lower()
            if lowered not in _SET_HERE:
                seen.add(lowered)
                head.append(f"{name}: {value}\r\n")
        for name, value in _DEFAULTS:  # what aiohttp's client added when the caller had not
            if name.lower() not in seen:
                head.append(f"{name}: {value}\r\n")
        head.append("\r\n")
        packed = "".join(head).encode("utf-8", "surrogateescape")  # bytes aiohttp's server decoded so: as received
        conn = await self._client.connection((scheme, host, port), self._connect_timeout)
        self._conn = conn
        conn.response = self
        self.last_read = self._loop.time()
        transport = conn.transport
        assert transport is not None
        if len(body) < 65536:
            transport.write(packed + body)
        else:
            transport.write(packed)
            transport.write(body)
        try:
            while not self.head_done:
                await self._wait()
        except BaseException:  # no head (timeout, error, cancelled): `async with` will not call __aexit__
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cancel_timer()
        if not self._done and self._conn is not None:
            self._conn.response = None
            self._conn.close()

    # -- reading
    async def read(self) -> bytes:
        """The whole body (read without pausing: it is all wanted at once)."""
        self._whole = True
        while not self._done:
            if self._paused:
                self._resume()
            await self._wait()
        if self._error is not None:
            raise self._error
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    async def next_chunk(self) -> bytes:
        """The body's next bytes as they came (b"" once it has ended)."""
        while not self._chunks:
            if self._done:
                if self._error is not None:
                    raise self._error
                return b""
            await self._wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < HIGH_WATER // 4:
            self._resume()
        return chunk

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._loop.create_future()
        if self._read_timeout and self._timer is None:
            self._timer = self._loop.call_at(self.last_read + self._read_timeout, self._check)
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None and not self._chunks and not self._done:
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check(self) -> None:
        """The read timeout: no byte from the provider for `read_timeout` seconds while reading."""
        self._timer = None
        if self._done or self._error is not None or self._read_timeout is None:
            return
        due = self.last_read + self._read_timeout
        now = self._loop.time()
        if self._paused:  # the consumer is behind: the provider is not the one stalling
            self.last_read = now
            due = now + self._read_timeout
        if now < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        error = (aiohttp.ServerTimeoutError("Timeout on reading data from socket") if self.head_done
                 else aiohttp.ServerTimeoutError("Timeout waiting for the upstream's response"))
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.response = None
            conn.close()
        self.fail(error)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _resume(self) -> None:
        self._paused = False
        conn = self._conn
        if conn is not None and conn.transport is not None and not conn.lost:
            conn.transport.resume_reading()

    # -- events from the connection
    def head_complete(self, status: int) -> None:
        self.status = status
        headers = CIMultiDict(self.raw_headers)
        self.headers = CIMultiDictProxy(headers)
        content_type = headers.get("Content-Type")
        if content_type:
            self.content_type = content_type.partition(";")[0].strip().lower()
        self.framed = "Content-Length" in headers or "chunked" in headers.get("Transfer-Encoding", "").lower()
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS)
        self.head_done = True
        self._wake()

    def feed(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error:
                self._conn_failed(aiohttp.ClientPayloadError("the upstream's compressed body is corrupt"))
                return
            if not data:
                return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and not self._whole and self._conn is not None:
            conn = self._conn
            if conn.transport is not None and not conn.lost:
                self._paused = True
                conn.transport.pause_reading()
        self._wake()

    def message_complete(self) -> None:
        if self._paused:  # the connection goes back to the pool reading, ready for its next answer
            self._resume()
        if self._decoder is not None:
            tail = self._decoder.flush()
            if tail:
                self._chunks.append(tail)
                self._buffered += len(tail)
        self._done = True
        self._conn = None
        self._cancel_timer()
        self._wake()

    def connection_ended(self) -> None:
        """The connection closed before the message's end."""
        if not self.head_done:
            self.fail(aiohttp.ServerDisconnectedError("the upstream closed the connection without an answer"))
        elif self.framed:
            self.fail(aiohttp.ClientPayloadError("Response payload is not completed"))
        else:  # no length, not chunked: the close is the body's end
            self.message_complete()

    def _conn_failed(self, error: Exception) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.response = None
            conn.close()
        self.fail(error)

    def fail(self, error: Exception) -> None:
        if self._done:
            return
        self._error = error
        self._done = True
        self._cancel_timer()
        self._wake()


#: Request headers this client writes itself (a caller's copy is dropped, never sent twice), and the
#: ones it adds when the caller did not send them (as aiohttp's client did).
_SET_HERE = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_DEFAULTS = (("Accept", "*/*"), ("Accept-Encoding", "gzip, deflate"), ("User-Agent", SERVER_SOFTWARE),
             ("Content-Type", "application/octet-stream"))


class UpstreamClient:
    """Keep-alive pools per origin (scheme, host, port). `request(...)` is used as an async context
    manager (see `UpstreamResponse`)."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    def request(self, method: str, url: str, *, body: bytes, headers: dict[str, str],
                params: dict[str, str] | None = None, connect_timeout: float | None = None,
                read_timeout: float | None = None) -> UpstreamResponse:
        return UpstreamResponse(self, method, url, body, headers, params, connect_timeout, read_timeout)

    async def connection(self, origin: tuple[str, str, int], connect_timeout: float | None) -> _Connection:
        """An idle connection to `origin` that is still open and fresh, or a new one."""
        idle = self._idle.get(origin)
        if idle:
            now = asyncio.get_running_loop().time()
            while idle:
                conn = idle.pop()
                if not conn.lost and now - conn.idle_since < IDLE_SECONDS:
                    return conn
                conn.close()
        return await self._open(origin, connect_timeout)

    async def _open(self, origin: tuple[str, str, int], connect_timeout: float | None) -> _Connection:
        if self._closed:
            raise aiohttp.ClientConnectionError("the upstream client is closed")
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        conn = _Connection(self, origin)
        tls = self._tls_context() if scheme == "https" else None
        try:
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(lambda: conn, host, port, ssl=tls,
                                             server_hostname=host if tls is not None else None,
                                             happy_eyeballs_delay=0.25)
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {host}:{port}") from None
        except (OSError, ssl.SSLError) as exc:
            raise ClientConnectorError(f"Cannot connect to host {host}:{port} ({type(exc).__name__})") from None
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def release(self, conn: _Connection) -> None:
        """A connection whose answer was read to its end, kept for the next request to its origin."""
        if self._closed:
            conn.close()
            return
        conn.idle_since = conn.loop.time()
        idle = self._idle.setdefault(conn.origin, collections.deque())
        if len(idle) >= MAX_IDLE_PER_ORIGIN:
            idle.popleft().close()
        idle.append(conn)

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
