"""Hostile input on every dialect's routes and the admin API: a clear 4xx in the caller's shape (or a
502 for an upstream that misbehaves), nothing held or charged, no traceback in the log, and nothing of
the operator's (provider key, organisation, project) on its way anywhere it should not go."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import redis as sync_redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import ADMIN, PROVIDER_KEY, SETUP_EVENTS, Harness, emulator_state, make_settings

from gateway.app import AccessLogger, create_app
from gateway.keys import KeySchema
from gateway.state import GATEWAY
from gateway.upstream_errors import scrub

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


# ------------------------------------------------------------------- fake upstreams for 6. and 12a.

StartGateway = Callable[[web.Application], Awaitable[Harness]]


@pytest.fixture
async def gateway_via(redis_url: str, config_dir: Path, emulator: TestServer,
                      monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[StartGateway]:
    """Start a fake upstream (an aiohttp app) and a gateway whose demo upstreams (OpenAI, Anthropic
    and Gemini dialects) all point at it; the emulator still runs beside them."""
    started: list[tuple[Harness, TestClient[Any, Any], TestServer]] = []

    async def start(upstream_app: web.Application) -> Harness:
        upstream = TestServer(upstream_app)
        await upstream.start_server()
        origin = str(upstream.make_url("")).rstrip("/")
        monkeypatch.setenv("EMULATOR_URL", origin)
        server = TestServer(create_app(make_settings(config_dir, redis_url)))
        await server.start_server(access_log_class=AccessLogger)
        client: TestClient[Any, Any] = TestClient(server)
        await client.start_server()
        harness = Harness(client, sync_redis.Redis.from_url(redis_url), emulator)
        started.append((harness, client, upstream))
        return harness

    yield start
    for harness, client, upstream in started:
        await harness.close()
        await client.close()
        await upstream.close()


# -------------------------------------------------------------------- 6. upstream redirects


def redirecting_to(target: TestServer) -> web.Application:
    """An upstream that answers every request with a 307 to the same path on `target`."""

    async def redirect(request: web.Request) -> web.Response:
        await request.read()
        raise web.HTTPTemporaryRedirect(str(target.make_url(request.path_qs)))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app


@pytest.mark.parametrize(("dialect", "path"), [
    ("openai", None), ("anthropic", None), ("gemini", None),
    ("anthropic", "/v1/messages/count_tokens"),  # the free handler
    ("gemini", "/v1beta/models/demo-gemini:countTokens"),
])
async def test_an_upstream_redirect_is_never_followed_and_is_a_502(
        gateway_via: StartGateway, emulator: TestServer, caplog: pytest.LogCaptureFixture, dialect: str,
        path: str | None) -> None:
    # the redirect points at the emulator: were it followed, the provider key would reach another
    # origin (aiohttp strips only Authorization and Cookie) and the request would be served and charged
    harness = await gateway_via(redirecting_to(emulator))
    account, key = await harness.account(credits=1)
    url, body, headers = request_for(dialect, key, one_message(dialect, '"hello"'), path=path)
    resp = await harness.client.post(url, data=body, headers=headers)
    assert resp.status == 502
    _type, message = error_of(dialect, 502, await resp.json())
    assert "redirect" in message
    assert emulator_state(harness.emulator).total_requests == 0
    await assert_nothing_left(harness, account, released=True)
    assert_no_traceback(caplog)


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


# ------------------------------------------------------- 12a. upstream error bodies, scrubbed

OPENAI_429 = {"error": {
    "message": "Rate limit reached for gpt-4o in organization org-abc123XYZ on tokens per min (TPM): Limit 30000, "
               "Used 29500, Requested 1200. Please try again in 1.2s. Visit https://platform.openai.com/account/"
               "rate-limits to learn more.",
    "type": "tokens", "param": None, "code": "rate_limit_exceeded"}}
OPENAI_QUOTA = {"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
                          "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}
OPENAI_400 = {"error": {
    "message": "Invalid value for 'temperature' (project proj_Q2w3E4r5, organization org-abc123XYZ, request "
               "req_8a9b7c, key sk-proj-abcdefgh12345678): expected a number between 0 and 2.",
    "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}}
ANTHROPIC_429 = {"type": "error", "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy", "error": {
    "type": "rate_limit_error",
    "message": "This request would exceed the rate limit for your organization (8c4a1e52-1f2a-4b3c-9d8e-7f6a5b4c3d2e) "
               "of 50,000 input tokens per minute. For details, refer to: https://docs.anthropic.com/en/api/"
               "rate-limits. You may also contact sales at https://www.anthropic.com/contact-sales"}}
GEMINI_429 = {"error": {
    "code": 429, "status": "RESOURCE_EXHAUSTED",
    "message": "You exceeded your current quota, please check your plan and billing details.\n* Quota exceeded for "
               "metric: generativelanguage.googleapis.com/generate_content_free_tier_input_token_count, limit: "
               "250000, model: gemini-2.5-flash\nPlease retry in 28.5s.",
    "details": [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "RATE_LIMIT_EXCEEDED",
         "domain": "googleapis.com", "metadata": {"consumer": "projects/123456789012", "service": "x"}},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "28s"}]}}
GEMINI_400 = {"error": {
    "code": 400, "status": "INVALID_ARGUMENT",
    "message": "Invalid JSON payload received for project 123456789012. Unknown name \"temprature\" at "
               "'generation_config': Cannot find field.",
    "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
        {"field": "generation_config", "description": "Invalid JSON payload received. Unknown name \"temprature\""}]}]}}

SCRUBBED = ["org-abc123XYZ", "proj_Q2w3E4r5", "req_8a9b7c", "sk-proj-abcdefgh12345678", "8c4a1e52",
            "req_011CSHoEeqs5C35K2UUqR7Fy", "123456789012", "30000", "29500", "50,000", "250000", "free_tier",
            "FreeTier", "billing"]


def answering(status: int, body: dict[str, Any] | str, headers: dict[str, str] | None = None) -> web.Application:
    """An upstream that answers every request with this status and body."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        if isinstance(body, str):
            return web.Response(status=status, text=body, content_type="text/html", headers=headers)
        return web.json_response(body, status=status, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


@pytest.mark.parametrize(("dialect", "status", "upstream_body", "etype", "kept"), [
    pytest.param("openai", 429, OPENAI_429, "tokens", ["demo-mini", "tokens per min", "try again in 1.2s"],
                 id="openai-rate-limit"),
    pytest.param("openai", 429, OPENAI_QUOTA, "insufficient_quota", ["quota"], id="openai-quota"),
    pytest.param("openai", 400, OPENAI_400, "invalid_request_error", ["Invalid value for 'temperature'",
                                                                      "between 0 and 2"], id="openai-bad-param"),
    pytest.param("anthropic", 429, ANTHROPIC_429, "rate_limit_error", ["demo-claude", "input tokens per minute"],
                 id="anthropic-rate-limit"),
    pytest.param("gemini", 429, GEMINI_429, "RESOURCE_EXHAUSTED", ["demo-gemini", "try again in 28.5s"],
                 id="gemini-rate-limit"),
    pytest.param("gemini", 400, GEMINI_400, "INVALID_ARGUMENT", ["Unknown name", "temprature"],
                 id="gemini-bad-param"),
    pytest.param("openai", 503, "<html>upstream overloaded at edge 10.0.0.7</html>", "server_error", ["503"],
                 id="openai-html-503"),
])
async def test_upstream_errors_keep_status_type_and_shape_without_the_operators_identity(
        gateway_via: StartGateway, caplog: pytest.LogCaptureFixture, dialect: str, status: int,
        upstream_body: dict[str, Any] | str, etype: str, kept: list[str]) -> None:
    harness = await gateway_via(answering(status, upstream_body, {
        "x-request-id": "req_upstream_abc", "openai-organization": "org-abc123XYZ", "retry-after": "2"}))
    account, key = await harness.account(credits=1)
    path, body, headers = request_for(dialect, key, one_message(dialect, '"hello"'))
    resp = await harness.client.post(path, data=body, headers=headers)
    assert resp.status == status
    assert resp.content_type == "application/json"
    raw = await resp.text()
    payload = json.loads(raw)
    got_type, message = error_of(dialect, status, payload)
    assert got_type == etype
    for text in kept:
        assert text in message, message
    for text in [*SCRUBBED, "10.0.0.7"]:
        assert text not in raw, (text, raw)
    assert "org-" not in str(dict(resp.headers))
    if dialect == "openai" and isinstance(upstream_body, dict):
        upstream_error = upstream_body["error"]
        assert (payload["error"]["param"], payload["error"]["code"]) == (upstream_error["param"],
                                                                         upstream_error["code"])
    if dialect == "anthropic":
        assert payload["request_id"] == resp.headers["request-id"]  # the gateway's, not the provider's
    if dialect == "gemini" and status == 429:
        assert [d["@type"].rsplit(".", 1)[1] for d in payload["error"]["details"]] == ["ErrorInfo", "RetryInfo"]
        assert payload["error"]["details"][0] == {"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                                  "reason": "RATE_LIMIT_EXCEEDED", "domain": "googleapis.com"}
    await assert_nothing_left(harness, account, released=True)
    assert_no_traceback(caplog)


async def test_a_scrubbed_rate_limit_is_still_the_openai_sdks_rate_limit_error(gateway_via: StartGateway) -> None:
    harness = await gateway_via(answering(429, OPENAI_429, {"x-request-id": "req_upstream_abc"}))
    account, key = await harness.account(credits=1)
    with pytest.raises(openai.RateLimitError) as raised:
        await harness.sdk(key).chat.completions.create(model="demo-mini", messages=[{"role": "user", "content": "x"}])
    assert raised.value.code == "rate_limit_exceeded" and raised.value.type == "tokens"
    assert "org-" not in raised.value.message and "try again in 1.2s" in raised.value.message
    await assert_nothing_left(harness, account, released=True)


async def test_upstream_errors_of_the_free_token_count_are_scrubbed_too(gateway_via: StartGateway) -> None:
    harness = await gateway_via(answering(429, ANTHROPIC_429))
    account, key = await harness.account(credits=1)
    path, body, headers = request_for("anthropic", key, one_message("anthropic", '"hi"'),
                                      path="/v1/messages/count_tokens")
    resp = await harness.client.post(path, data=body, headers=headers)
    assert resp.status == 429
    raw = await resp.text()
    assert error_of("anthropic", 429, json.loads(raw))[0] == "rate_limit_error"
    assert "8c4a1e52" not in raw and "req_011" not in raw and "50,000" not in raw
    await assert_nothing_left(harness, account, released=True)  # token counts are admitted, then released


@pytest.mark.parametrize(("text", "kept", "gone"), [
    ("Incorrect API key provided: sk-abc***. You can find your API key at https://platform.openai.com",
     "Incorrect API key provided", "sk-abc"),
    ("Request req_8a9b7c failed for org-4bcd and proj_77x9", "Request [redacted] failed for", "org-4bcd"),
    ("Generative Language API has not been used in project 123456789012 before", "in project [redacted]",
     "123456789012"),
    ("consumer: projects/987654321 quota", "projects/[redacted]", "987654321"),
    ("key AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW is blocked", "is blocked", "AIzaSy"),
    ("contact ops@operator.example.com", "contact [redacted]", "operator.example"),
])
def test_scrub_replaces_provider_account_identifiers(text: str, kept: str, gone: str) -> None:
    scrubbed = scrub(text)
    assert kept in scrubbed and gone not in scrubbed, scrubbed


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
