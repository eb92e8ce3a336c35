"""Hostile input on every dialect's routes and the admin API: a clear 4xx in the caller's shape (or a
502 for an upstream that misbehaves), nothing held or charged, no traceback in the log, and nothing of
the operator's (provider key, organisation, project) on its way anywhere it should not go."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import ADMIN, PROVIDER_KEY, SETUP_EVENTS, Harness, emulator_state, make_settings

from gateway.app import AccessLogger, create_app
from gateway.keys import KeySchema
from gateway.state import GATEWAY

DIALECTS = ["openai", "anthropic", "gemini"]
NESTED = "[" * 2000 + "]" * 2000
MODEL = {"openai": "demo-mini", "anthropic": "demo-claude", "gemini": "demo-gemini"}


def one_message(dialect: str, text_json: str) -> str:
    """The JSON of a one-message conversation whose text is the JSON literal `text_json` (raw, so a
    test can send escapes the json module would not write)."""
    if dialect == "gemini":
        return '[{"role":"user","parts":[{"text":' + text_json + "}]}]"
    return '[{"role":"user","content":' + text_json + "}]"


def request_for(dialect: str, key: str, messages_json: str, *, stream: bool = False,
                path: str | None = None) -> tuple[str, bytes, dict[str, str]]:
    """Path, body and headers of a generation request in the dialect's wire format, its conversation
    (messages, or Gemini's contents) given as raw JSON text."""
    if dialect == "openai":
        body = f'{{"model":"demo-mini","stream":{json.dumps(stream)},"messages":{messages_json}}}'
        return path or "/v1/chat/completions", body.encode(), {"Authorization": f"Bearer {key}",
                                                               "Content-Type": "application/json"}
    if dialect == "anthropic":
        body = f'{{"model":"demo-claude","max_tokens":1000,"stream":{json.dumps(stream)},"messages":{messages_json}}}'
        return path or "/v1/messages", body.encode(), {"x-api-key": key, "anthropic-version": "2023-06-01",
                                                       "Content-Type": "application/json"}
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    body = f'{{"contents":{messages_json}}}'
    return path or f"/v1beta/models/demo-gemini:{method}", body.encode(), {"x-goog-api-key": key,
                                                                          "Content-Type": "application/json"}


def error_of(dialect: str, status: int, payload: dict[str, Any]) -> tuple[Any, str]:
    """(type, message) of an error answer, after checking it has the dialect's SDK-compatible shape
    (Gemini's "type" is its status string)."""
    if dialect == "anthropic":
        assert payload["type"] == "error" and set(payload["error"]) == {"type", "message"}, payload
        return payload["error"]["type"], payload["error"]["message"]
    error = payload["error"]
    if dialect == "gemini":
        assert error["code"] == status and isinstance(error["status"], str), payload
        return error["status"], error["message"]
    assert set(error) == {"message", "type", "param", "code"}, payload
    return error["type"], error["message"]


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    bad = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, bad


async def assert_nothing_left(harness: Harness, account: str, *, released: bool = False) -> None:
    """No hold, no charge, no ledger event beyond the account's set-up (and, for a request that was
    held and then refused upstream, `released`: the release)."""
    await harness.gw.quiesce()
    assert harness.holds(account) == {}
    state = harness.state(account)
    assert state["held"] == 0 and state["charged"] == 0, state
    assert {e["type"] for e in harness.ledger(account)} <= {*SETUP_EVENTS, *(["released"] if released else [])}
    if not released:  # (a released hold leaves a tombstone there until it expires)
        assert harness.redis.zcard(KeySchema().for_account(account).hold_expiry) == 0
    await harness.assert_conserved(account)


# ------------------------------------------------------------------------------ 1. deeply nested JSON


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_deeply_nested_json_is_a_400_in_the_callers_dialect(
        harness: Harness, caplog: pytest.LogCaptureFixture, dialect: str) -> None:
    account, key = await harness.account(credits=1)
    path, body, headers = request_for(dialect, key, NESTED)
    resp = await harness.client.post(path, data=body, headers=headers)
    assert resp.status == 400
    _type, message = error_of(dialect, 400, await resp.json())
    assert "nested too deeply" in message
    assert emulator_state(harness.emulator).total_requests == 0
    await assert_nothing_left(harness, account)
    assert_no_traceback(caplog)


async def test_deeply_nested_json_on_the_admin_api_is_a_400_and_changes_nothing(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    account, _key = await harness.account(credits=1)
    before = harness.state(account)
    for path, field in (("/admin/accounts", "name"), (f"/admin/accounts/{account}/credits", "credits")):
        resp = await harness.client.post(path, data=f'{{"{field}":{NESTED}}}',
                                         headers={**ADMIN, "Content-Type": "application/json"})
        assert resp.status == 400, await resp.text()
        _type, message = error_of("openai", 400, await resp.json())
        assert "nested too deeply" in message
    assert harness.state(account) == before
    await assert_nothing_left(harness, account)
    assert_no_traceback(caplog)


# ---------------------------------------------------------------- 2. a lone surrogate in the request


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_lone_surrogate_escape_is_forwarded_as_an_escape(
        harness: Harness, caplog: pytest.LogCaptureFixture, dialect: str, stream: bool) -> None:
    # 0.002 credits cannot cover any of the three models' full output cap: the cap is lowered, so
    # every dialect re-serialises the body (as OpenAI streams always do, to ask for usage)
    account, key = await harness.account(credits="0.002")
    path, body, headers = request_for(dialect, key, one_message(dialect, r'"\ud800 [[emu out=3]]"'), stream=stream)
    resp = await harness.client.post(path, data=body, headers=headers)
    assert resp.status == 200, await resp.text()
    await resp.read()
    sent = emulator_state(harness.emulator).received[-1]["body"]
    text = sent["contents"][0]["parts"][0]["text"] if dialect == "gemini" else sent["messages"][0]["content"]
    assert text == "\ud800 [[emu out=3]]"  # the client's escape, kept as an escape
    state = await harness.assert_conserved(account)
    assert 0 < state["charged"] <= 2000
    assert_no_traceback(caplog)


# ------------------------------------------------------------------- 3. and 4. Content-Encoding


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_gzip_content_encoding_on_a_plain_body_is_a_400_in_the_callers_dialect(
        harness: Harness, caplog: pytest.LogCaptureFixture, dialect: str) -> None:
    account, key = await harness.account(credits=1)
    path, body, headers = request_for(dialect, key, one_message(dialect, '"hello"'))
    resp = await harness.client.post(path, data=body, headers={**headers, "Content-Encoding": "gzip"})
    assert resp.status == 400
    _type, message = error_of(dialect, 400, await resp.json())
    assert "gzip" in message
    assert resp.headers.get("Connection", "").lower() == "close"  # the rest of its bytes cannot be trusted
    assert emulator_state(harness.emulator).total_requests == 0
    await assert_nothing_left(harness, account)
    assert_no_traceback(caplog)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_compressed_body_is_forwarded_decoded_without_its_content_encoding(
        harness: Harness, dialect: str, encoding: str) -> None:
    account, key = await harness.account(credits=1)
    path, body, headers = request_for(dialect, key, one_message(dialect, '"hello [[emu out=3]]"'))
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    resp = await harness.client.post(path, data=packed, headers={**headers, "Content-Encoding": encoding})
    assert resp.status == 200, await resp.text()
    received = emulator_state(harness.emulator).received[-1]
    assert "content-encoding" not in {name.lower() for name in received["headers"]}
    assert int(received["headers"]["Content-Length"]) == len(body)  # the decoded length, not the packed one
    state = await harness.assert_conserved(account)
    assert state["charged"] > 0


async def test_a_compressed_body_reaches_the_free_token_count_decoded(harness: Harness) -> None:
    _account, key = await harness.account(credits=1)
    body = json.dumps({"model": "demo-claude", "messages": [{"role": "user", "content": "count me"}]}).encode()
    resp = await harness.client.post("/v1/messages/count_tokens", data=gzip.compress(body), headers={
        "x-api-key": key, "anthropic-version": "2023-06-01", "Content-Type": "application/json",
        "Content-Encoding": "gzip"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["input_tokens"] > 0


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_decompression_bomb_is_a_413_before_anything_is_held(
        harness: Harness, caplog: pytest.LogCaptureFixture, encoding: str) -> None:
    account, key = await harness.account(credits=1)
    inflated = b'{"model":"demo-mini","messages":[{"role":"user","content":"' + b"a" * (64 << 20) + b'"}]}'
    packed = gzip.compress(inflated, 9) if encoding == "gzip" else zlib.compress(inflated, 9)
    assert len(packed) < 200_000
    resp = await harness.client.post("/v1/chat/completions", data=packed, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", "Content-Encoding": encoding})
    assert resp.status == 413
    error_of("openai", 413, await resp.json())
    assert emulator_state(harness.emulator).total_requests == 0
    await assert_nothing_left(harness, account)
    assert_no_traceback(caplog)


@pytest.mark.parametrize("encodings", [["compress"], ["gzip", "gzip"], ["x-custom"]])
async def test_a_content_encoding_the_gateway_cannot_decode_is_a_415(harness: Harness, encodings: list[str]) -> None:
    account, key = await harness.account(credits=1)
    path, body, headers = request_for("openai", key, one_message("openai", '"hello"'))
    sent = [*headers.items(), *(("Content-Encoding", e) for e in encodings)]
    resp = await harness.client.post(path, data=body, headers=sent)
    assert resp.status == 415
    assert "Content-Encoding" in error_of("openai", 415, await resp.json())[1]
    await assert_nothing_left(harness, account)


# ------------------------------------------------------- 7. a client that hangs up mid-upload


@pytest.fixture
async def served_like_production(harness: Harness, config_dir: Path, redis_url: str) -> AsyncIterator[web.AppRunner]:
    """A second gateway on the harness's Redis, run as `gateway serve` runs it: aiohttp's test server
    cancels a handler whose client went away, web.run_app lets it run on (handler_cancellation=False)."""
    runner = web.AppRunner(create_app(make_settings(config_dir, redis_url)), handler_cancellation=False,
                           access_log_class=AccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner
    await runner.cleanup()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/admin/accounts"])
async def test_a_client_hanging_up_mid_upload_is_not_a_redis_error(
        harness: Harness, served_like_production: web.AppRunner, caplog: pytest.LogCaptureFixture, path: str) -> None:
    caplog.set_level(logging.DEBUG)
    account, key = await harness.account(credits=1)
    gw = served_like_production.app[GATEWAY]
    host, port = served_like_production.addresses[0][:2]
    _reader, writer = await asyncio.open_connection(host, port)
    credential = ADMIN["Authorization"] if path.startswith("/admin/") else f"Bearer {key}"
    writer.write(f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 f"Authorization: {credential}\r\nContent-Length: 100000\r\n\r\n".encode()
                 + b'{"model":"demo-mini","messages":[{"role":"user","content":"')
    await writer.drain()
    server = served_like_production.server
    assert server is not None
    await _until(lambda: server.requests_count == 1)  # its handler runs, waiting for the rest of the body
    logged_before = len(caplog.records)
    writer.close()
    await writer.wait_closed()
    await _until(lambda: not server.connections)  # its handler has ended
    await gw.quiesce()
    assert "gateway_redis_errors_total 0.0" in gw.metrics.render().decode()
    about_it = [r.getMessage() for r in caplog.records[logged_before:] if r.levelno >= logging.INFO]
    assert len(about_it) <= 1 and not any(" 503 " in line for line in about_it), about_it
    assert_no_traceback(caplog)
    await assert_nothing_left(harness, account)


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 5 s")


# ------------------------------------------------- 12d. hop-by-hop headers declared by the client


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_headers_named_in_connection_and_expect_are_not_forwarded(harness: Harness, dialect: str) -> None:
    account, key = await harness.account(credits=1)
    path, body, headers = request_for(dialect, key, one_message(dialect, '"hello [[emu out=2]]"'))
    resp = await harness.client.post(path, data=body, headers={
        **headers, "Connection": "keep-alive, X-Hop-Secret , x-other-hop", "X-Hop-Secret": "for the next hop only",
        "X-Other-Hop": "1", "Expect": "100-continue", "X-Kept": "yes"})
    assert resp.status == 200, await resp.text()
    received = emulator_state(harness.emulator).received[-1]["headers"]
    forwarded = {name.lower(): value for name, value in received.items()}
    assert "x-hop-secret" not in forwarded and "x-other-hop" not in forwarded and "expect" not in forwarded
    assert forwarded["x-kept"] == "yes"
    assert PROVIDER_KEY in (forwarded.get("authorization", "") + forwarded.get("x-api-key", "")
                            + forwarded.get("x-goog-api-key", ""))
    await harness.assert_conserved(account)
