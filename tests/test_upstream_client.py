"""The hot path's HTTP/1.1 client (gateway.upstream_client) against raw sockets that answer exactly
the bytes each test scripts: framing (Content-Length, chunked, close), keep-alive reuse, interim
answers, compression, timeouts, a hostile upstream's heads and bodies, and what it sends."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from yarl import URL

from gateway import upstream_client
from gateway.upstream_client import ClientConnectorError, UpstreamClient, UpstreamProtocolError

Answer = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawServer:
    """Answers each request with `answer(request bytes, writer)`; records requests and connections."""

    answer: Answer
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    closed: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                await self.answer(head + body, writer)
                if writer.is_closing():
                    return
        finally:
            self.closed += 1
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], Awaitable[RawServer]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> RawServer:
        raw = RawServer(answer)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        raw.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return raw

    yield start
    for server in servers:
        server.close()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient()
    yield c
    await c.close()


def fixed(*parts: bytes, close: bool = False) -> Answer:
    async def answer(_request: bytes, writer: asyncio.StreamWriter) -> None:
        for part in parts:
            writer.write(part)
            await writer.drain()
        if close:
            writer.close()

    return answer


def json_answer(body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n" + extra + b"\r\n" + body)


async def fetch(client: UpstreamClient, url: str, body: bytes = b"{}", headers: dict[str, str] | None = None,
                **kw: object) -> tuple[int, bytes]:
    async with client.request("POST", url + "/v1/chat/completions", body=body,
                              headers=headers or {"Content-Type": "application/json"}, **kw) as up:  # type: ignore[arg-type]
        return up.status, await up.read()


async def test_a_content_length_answer_is_read_and_its_connection_reused(serve, client) -> None:
    server = await serve(fixed(json_answer(b'{"ok":1}', b"x-request-id: up-1\r\n")))
    for _ in range(3):
        assert await fetch(client, server.url) == (200, b'{"ok":1}')
    assert server.connections == 1 and len(server.requests) == 3
    async with client.request("POST", server.url + "/v1/x", body=b"{}", headers={}) as up:
        assert up.headers["X-Request-Id"] == "up-1" and up.content_type == "application/json"
        await up.read()


async def test_the_request_carries_the_callers_headers_once_and_aiohttps_defaults_when_absent(serve, client) -> None:
    server = await serve(fixed(json_answer(b"{}")))
    async with client.request("POST", server.url + "/v1/chat/completions", body=b'{"a":1}',
                              headers={"Content-Type": "application/json", "User-Agent": "OpenAI/Python 1.0",
                                       "Host": "evil.example", "Content-Length": "999", "Accept-Encoding": "identity"},
                              params={"api-version": "2024 06"}) as up:
        await up.read()
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions?api-version=2024+06 HTTP/1.1"
    names = [line.split(b":", 1)[0].lower() for line in lines[1:]]
    assert sorted(names) == sorted(set(names)), "a header sent twice"
    sent = {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip() for line in lines[1:]}
    assert sent[b"host"] == f"127.0.0.1:{server.port}".encode() and sent[b"content-length"] == b"7"
    assert sent[b"user-agent"] == b"OpenAI/Python 1.0" and sent[b"accept-encoding"] == b"identity"
    assert sent[b"accept"] == b"*/*" and body == b'{"a":1}'


async def test_the_request_target_is_encoded_as_aiohttp_encodes_a_string_url(serve, client) -> None:
    server = await serve(fixed(json_answer(b"{}")))
    path = "/v1beta/models/a b%2Fc:generateContent"
    async with client.request("POST", server.url + path, body=b"{}", headers={}) as up:
        await up.read()
    target = server.requests[0].split(b" ")[1].decode()
    assert target == URL(server.url + path).raw_path_qs


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb"])
async def test_a_header_that_would_split_the_request_is_refused_before_anything_is_sent(serve, client, value) -> None:
    server = await serve(fixed(json_answer(b"{}")))
    with pytest.raises(UpstreamProtocolError):
        await fetch(client, server.url, headers={"anthropic-beta": value})
    assert server.requests == []


async def test_a_chunked_answer_is_decoded_and_streamed_chunk_by_chunk(serve, client) -> None:
    parts = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    server = await serve(fixed(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n", chunked))
    async with client.request("POST", server.url + "/s", body=b"{}", headers={}) as up:
        assert up.content_type == "text/event-stream"
        got = []
        while chunk := await up.next_chunk():
            got.append(chunk)
    assert b"".join(got) == b"".join(parts)
    assert await fetch(client, server.url) == (200, b"".join(parts))  # the connection was reusable
    assert server.connections == 1


async def test_an_answer_framed_by_the_close_is_read_to_the_close_and_not_reused(serve, client) -> None:
    server = await serve(fixed(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n", b'{"a":', b"1}",
                               close=True))
    assert await fetch(client, server.url) == (200, b'{"a":1}')
    assert await fetch(client, server.url) == (200, b'{"a":1}')
    assert server.connections == 2


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n12345\r\n",
])
async def test_a_framed_body_cut_short_is_a_payload_error(serve, client, answer) -> None:
    server = await serve(fixed(answer, close=True))
    with pytest.raises(aiohttp.ClientPayloadError):
        await fetch(client, server.url)


async def test_a_close_before_any_answer_is_a_disconnect(serve, client) -> None:
    server = await serve(fixed(close=True))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await fetch(client, server.url)


@pytest.mark.parametrize("answer", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n12345",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"Content-Length: 0\r\n\r\n",
])
async def test_a_malformed_or_oversized_head_is_a_client_error_not_a_crash(serve, client, answer) -> None:
    server = await serve(fixed(answer, close=True))
    with pytest.raises(aiohttp.ClientError):
        await fetch(client, server.url)


async def test_interim_answers_are_skipped(serve, client) -> None:
    server = await serve(fixed(b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n",
                               json_answer(b'{"final":true}')))
    assert await fetch(client, server.url) == (200, b'{"final":true}')


@pytest.mark.parametrize("encoding,packed", [("gzip", gzip.compress(b'{"usage":1}')),
                                             ("deflate", __import__("zlib").compress(b'{"usage":1}'))])
async def test_a_compressed_answer_is_decoded(serve, client, encoding, packed) -> None:
    server = await serve(fixed(b"HTTP/1.1 200 OK\r\nContent-Encoding: " + encoding.encode() + b"\r\n"
                               b"Content-Length: " + str(len(packed)).encode() + b"\r\n\r\n" + packed))
    assert await fetch(client, server.url) == (200, b'{"usage":1}')


async def test_a_corrupt_compressed_answer_is_a_payload_error(serve, client) -> None:
    server = await serve(fixed(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!"))
    with pytest.raises(aiohttp.ClientPayloadError):
        await fetch(client, server.url)


async def test_an_upstream_silent_after_its_head_times_out_on_read(serve, client) -> None:
    async def stall(_request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12")
        await writer.drain()
        await asyncio.sleep(5)

    server = await serve(stall)
    with pytest.raises(aiohttp.ServerTimeoutError):
        await fetch(client, server.url, read_timeout=0.2)


async def test_an_upstream_that_never_answers_times_out_waiting_for_its_head(serve, client) -> None:
    async def silent(_request: bytes, _writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server = await serve(silent)
    with pytest.raises(TimeoutError):
        await fetch(client, server.url, read_timeout=0.2)


async def test_a_tls_handshake_that_never_ends_is_a_connect_timeout(serve, client) -> None:
    server = await serve(lambda _r, _w: asyncio.sleep(5))  # accepts TCP, never speaks TLS
    with pytest.raises(aiohttp.ConnectionTimeoutError):
        await fetch(client, f"https://127.0.0.1:{server.port}", connect_timeout=0.2)


async def test_a_refused_connection_is_a_connector_error(client) -> None:
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(ClientConnectorError) as caught:
        await fetch(client, f"http://127.0.0.1:{port}")
    assert isinstance(caught.value, aiohttp.ClientConnectionError)
    assert type(caught.value).__name__ == "ClientConnectorError"  # what access records have always said


async def test_a_slow_consumer_pauses_reading_and_gets_every_byte_without_a_read_timeout(serve, client,
                                                                                        monkeypatch) -> None:
    monkeypatch.setattr(upstream_client, "HIGH_WATER", 64 * 1024)
    payload = bytes(range(256)) * 8192  # 2 MiB
    server = await serve(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n",
                               payload))
    got = bytearray()
    async with client.request("POST", server.url + "/big", body=b"{}", headers={}, read_timeout=0.3) as up:
        while chunk := await up.next_chunk():
            got += chunk
            assert up._buffered <= 64 * 1024 + 256 * 1024  # bounded: reads pause while the consumer is behind
            if len(got) < 256 * 1024:
                await asyncio.sleep(0.1)  # slower than the read timeout, in total
    assert bytes(got) == payload


async def test_leaving_before_the_end_closes_the_connection_and_the_next_one_is_fresh(serve, client) -> None:
    async def answer(_request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()

    server = await serve(answer)
    async with client.request("POST", server.url + "/x", body=b"{}", headers={}) as up:
        assert await up.next_chunk() == b"0123456789"
    server.answer = fixed(json_answer(b"{}"))
    assert await fetch(client, server.url) == (200, b"{}")
    assert server.connections == 2


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused(serve, client) -> None:
    server = await serve(fixed(json_answer(b"{}", b"Connection: keep-alive\r\n")))
    assert await fetch(client, server.url) == (200, b"{}")
    server.answer = fixed(json_answer(b"{}"), close=True)
    assert await fetch(client, server.url) == (200, b"{}")  # this one closes after its answer
    await asyncio.sleep(0.05)
    assert await fetch(client, server.url) == (200, b"{}")
    assert server.connections == 2


async def test_an_idle_connection_past_its_keep_alive_is_replaced(serve, client, monkeypatch) -> None:
    monkeypatch.setattr(upstream_client, "IDLE_SECONDS", 0.0)
    server = await serve(fixed(json_answer(b"{}")))
    assert await fetch(client, server.url) == (200, b"{}")
    assert await fetch(client, server.url) == (200, b"{}")
    assert server.connections == 2


async def test_bytes_after_the_answer_make_the_connection_unusable_not_a_second_answer(serve, client) -> None:
    server = await serve(fixed(json_answer(b'{"n":1}') + json_answer(b'{"n":2}')))
    assert await fetch(client, server.url) == (200, b'{"n":1}')
    server.answer = fixed(json_answer(b'{"n":3}'))
    await asyncio.sleep(0.05)
    assert await fetch(client, server.url) == (200, b'{"n":3}')


async def test_a_redirect_is_answered_as_it_is_never_followed(serve, client) -> None:
    server = await serve(fixed(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://elsewhere.invalid/\r\n"
                               b"Content-Length: 0\r\n\r\n"))
    assert await fetch(client, server.url) == (307, b"")
    assert len(server.requests) == 1


async def test_concurrent_requests_each_get_their_own_answer(serve, client) -> None:
    async def echo(request: bytes, writer: asyncio.StreamWriter) -> None:
        body = request.partition(b"\r\n\r\n")[2]
        await asyncio.sleep(0.01)
        writer.write(json_answer(body))
        await writer.drain()

    server = await serve(echo)
    answers = await asyncio.gather(*(fetch(client, server.url, body=b'{"i":%d}' % i) for i in range(40)))
    assert answers == [(200, b'{"i":%d}' % i) for i in range(40)]
    assert server.connections <= 40


async def test_a_request_cancelled_before_its_answer_closes_its_connection(serve, client) -> None:
    async def slow(_request: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)
        writer.write(json_answer(b'{"late":1}'))
        await writer.drain()

    server = await serve(slow)
    pending = asyncio.ensure_future(fetch(client, server.url))
    await asyncio.sleep(0.05)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await asyncio.sleep(0.5)  # the server answers late, then finds the connection closed
    assert server.closed == 1  # not left open, and never handed to the next request
    server.answer = fixed(json_answer(b'{"n":2}'))
    assert await fetch(client, server.url) == (200, b'{"n":2}')
    assert server.connections == 2


async def test_an_answer_to_head_has_no_body_whatever_its_length_says(serve, client) -> None:
    server = await serve(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: application/json\r\n\r\n"))
    async with client.request("HEAD", server.url + "/x", body=b"", headers={}, read_timeout=5) as up:
        assert up.status == 200 and await up.read() == b""
    server.answer = fixed(json_answer(b"{}"))
    assert await fetch(client, server.url, read_timeout=5) == (200, b"{}")  # on a fresh connection
    assert server.connections == 2


async def test_a_connection_paused_for_a_slow_consumer_goes_back_to_the_pool_reading(serve, client,
                                                                                    monkeypatch) -> None:
    monkeypatch.setattr(upstream_client, "HIGH_WATER", 64 * 1024)
    payload = b"x" * (1024 * 1024)
    server = await serve(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n",
                               payload))
    got = bytearray()
    async with client.request("POST", server.url + "/big", body=b"{}", headers={}, read_timeout=5) as up:
        await asyncio.sleep(0.2)  # the consumer is behind: reading pauses
        while chunk := await up.next_chunk():
            got += chunk
            await asyncio.sleep(0)
    assert bytes(got) == payload
    pooled = [conn for idle in client._idle.values() for conn in idle]
    assert pooled and all(conn.transport is not None and conn.transport.is_reading() for conn in pooled)
    server.answer = fixed(json_answer(b'{"next":1}'))
    assert await fetch(client, server.url, read_timeout=5) == (200, b'{"next":1}')
    assert server.connections == 1


async def test_read_never_pauses_whatever_the_size(serve, client, monkeypatch) -> None:
    monkeypatch.setattr(upstream_client, "HIGH_WATER", 16 * 1024)
    payload = b"y" * (512 * 1024)
    server = await serve(fixed(json_answer(payload)))
    assert await fetch(client, server.url, read_timeout=5) == (200, payload)
    pooled = [conn for idle in client._idle.values() for conn in idle]
    assert pooled and all(conn.transport is not None and conn.transport.is_reading() for conn in pooled)
