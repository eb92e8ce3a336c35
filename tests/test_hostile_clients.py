"""Hostile clients on the wire: tool paths that try to leave the entry's base path, malformed request
lines (no query string or traceback in the log), slow heads and bodies, and too many connections from
one address. Raw sockets, because aiohttp's client would normalise what these tests must send."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as sync_redis
from aiohttp.test_utils import TestServer
from conftest import ADMIN, SETUP_EVENTS, Harness, emulator_state, make_settings

from gateway.app import AccessLogger, create_app
from gateway.keys import KeySchema
from gateway.state import GATEWAY

PLANS = """
default_plan: free
plans:
  free:
    monthly_credits: 0
    models: ["demo-*"]
"""


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


@pytest.fixture
def config_dir(config_dir: Path) -> Path:
    """The shipped providers.yaml with the demo search entry's base URL below a path of its own."""
    providers = config_dir / "providers.yaml"
    text = providers.read_text()
    line = "base_url: ${EMULATOR_URL:-http://127.0.0.1:8090}"
    assert line in text
    providers.write_text(text.replace(line, line + "/tool-prefix"))
    return config_dir


async def _raw(server: TestServer, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` on a new connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _body(answer: bytes) -> dict[str, Any]:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


# ---------------------------------------------------------------- tool paths


ESCAPES = [
    "/tools/demo-search/../../search",
    "/tools/demo-search/%2e%2e/%2e%2e/search",
    "/tools/demo-search/%2E%2E/search",
    "/tools/demo-search/..%2f..%2fsearch",
    "/tools/demo-search/search/..",
    "/tools/demo-search/./search",
    "/tools/demo-search/search%3Fq=x",
    "/tools/demo-search/search%23frag",
    "/tools/demo-search/..%5c..%5csearch",
    "/tools/demo-search/sea%00rch",
    "/tools/demo-search/%252e%252e/search",
]


async def test_tool_paths_that_could_leave_the_base_path_are_refused_before_anything_is_held(
        harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    received = len(emulator_state(harness.emulator).received)
    for target in ESCAPES:
        answer = await _raw(harness.client.server, (f"GET {target} HTTP/1.1\r\nHost: gw\r\n"
                                                    f"Authorization: Bearer {key}\r\nConnection: close\r\n\r\n"
                                                    ).encode())
        assert _status(answer) == 400, (target, answer[:300])
        error = _body(answer)["error"]
        assert error["type"] == "invalid_request" and "tool path" in error["message"], target
    await harness.gw.quiesce()
    assert harness.holds(account) == {}
    assert harness.state(account)["charged"] == 0
    assert {e["type"] for e in harness.ledger(account)} <= set(SETUP_EVENTS)  # not even a released hold
    assert len(emulator_state(harness.emulator).received) == received


async def test_a_tool_path_inside_the_base_path_is_forwarded_below_it(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    # below /tool-prefix the emulator has no route: the upstream's 404 comes back, free of charge
    answer = await _raw(harness.client.server, (f"GET /tools/demo-search/search%20me/x?q=1 HTTP/1.1\r\nHost: gw\r\n"
                                                f"Authorization: Bearer {key}\r\nConnection: close\r\n\r\n").encode())
    assert _status(answer) == 404
    assert b"tool path" not in answer
    assert (await harness.assert_conserved(account))["charged"] == 0


# ---------------------------------------------------------------- malformed requests in the log


MALFORMED = [
    b"GET /v1beta/models?key=gwk_secret_in_the_line junk HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /v1/models?key=gwk_secret_in_the_line HTTP/1.1\r\nBad Header gwk_secret_in_the_line\r\n\r\n",
    b"GET /v1/models?key=gwk_secret_in_the_line HTTP/9.9\r\nHost: gw\r\n\r\n",
    b"G\x00T /v1/models?key=gwk_secret_in_the_line HTTP/1.1\r\nHost: gw\r\n\r\n",
]


async def test_a_malformed_request_logs_one_warning_without_its_query_or_a_traceback(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for request in MALFORMED:
        assert _status(await _raw(harness.client.server, request)) == 400
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(records) == len(MALFORMED)
    for record in records:
        assert record.exc_info is None and record.exc_text is None
        assert record.levelno <= logging.WARNING
        assert "\n" not in record.getMessage() and "malformed HTTP request" in record.getMessage()
    assert sum(r.levelno == logging.WARNING for r in records) >= len(MALFORMED) - 1  # G\0T: DEBUG, as aiohttp does
    assert "gwk_secret_in_the_line" not in caplog.text
    assert "key=" not in caplog.text and "Traceback" not in caplog.text


# ---------------------------------------------------------------- slow clients, many connections


@pytest.fixture
async def guarded(config_dir: Path, redis_url: str) -> AsyncIterator[TestServer]:
    """A gateway with small limits: heads within 1 s, bodies within 0.5 s, 4 connections per client."""
    settings = make_settings(config_dir, redis_url, header_timeout_seconds=1.0, body_timeout_seconds=0.5,
                             max_connections_per_client=4)
    server = TestServer(create_app(settings))
    await server.start_server(access_log_class=AccessLogger)
    yield server
    await server.close()


async def test_a_request_head_sent_byte_by_byte_is_cut_off_at_the_header_timeout(guarded: TestServer) -> None:
    reader, writer = await asyncio.open_connection(guarded.host, guarded.port)
    head = b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"

    async def drip() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)  # the slowloris itself: one byte every 50 ms

    dripping = asyncio.ensure_future(drip())
    started = time.monotonic()
    try:
        try:
            answer = await asyncio.wait_for(reader.read(), 5.0)
        except ConnectionResetError:  # closed while the client was still writing: a reset, not a FIN
            answer = b""
        assert answer == b""  # closed, with no answer
        assert time.monotonic() - started < 4.0
        assert not dripping.done()  # long before the head was complete
    finally:
        dripping.cancel()
        writer.close()


async def test_a_body_that_does_not_arrive_in_time_is_refused_with_408_and_nothing_held(
        guarded: TestServer, redis_url: str) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.post(guarded.make_url("/admin/accounts"), json={"name": "slow"}, headers=ADMIN) as resp:
            account = (await resp.json())["id"]
        async with session.post(guarded.make_url(f"/admin/accounts/{account}/credits"), json={"credits": 1},
                                headers=ADMIN) as resp:
            assert resp.status == 200
        async with session.post(guarded.make_url(f"/admin/accounts/{account}/keys"), json={}, headers=ADMIN) as resp:
            key = (await resp.json())["key"]
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    started = time.monotonic()
    answer = await _raw(guarded, head + b'{"model": "demo-mini", ', timeout=5.0)
    assert _status(answer) == 408 and time.monotonic() - started < 4.0
    assert _body(answer)["error"]["message"]
    client = sync_redis.Redis.from_url(redis_url)
    try:
        assert client.hget(KeySchema().for_account(account).account, "held") in (None, b"0")
        assert client.hlen(KeySchema().for_account(account).holds) == 0
    finally:
        client.close()


async def test_connections_over_the_per_client_cap_are_closed_at_once(guarded: TestServer) -> None:
    held = [await asyncio.open_connection(guarded.host, guarded.port) for _ in range(4)]
    try:
        reader, writer = await asyncio.open_connection(guarded.host, guarded.port)
        assert await asyncio.wait_for(reader.read(), 2.0) == b""  # the fifth: closed before any request
        writer.close()
        assert b"gateway_connections_refused_total 1.0" in guarded.app[GATEWAY].metrics.render()
        # the admitted ones are served
        _, first_writer = held[0]
        first_writer.write(b"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        assert _status(await asyncio.wait_for(held[0][0].read(), 5.0)) == 200
        # one closed: a new connection is admitted again
        for _ in range(200):
            answer = await _raw(guarded, b"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            if answer:
                break
            await asyncio.sleep(0.01)  # the closed connection's slot is freed when the server sees it go
        assert _status(answer) == 200
    finally:
        for _, w in held:
            w.close()
