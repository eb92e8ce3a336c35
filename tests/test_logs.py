"""Logs: JSON lines (GATEWAY_LOG_FORMAT=json) and compact text lines; the access record of a proxied
request (who, what, how it ended, what it cost, the upstream's failure cause); the client's
X-Request-ID and W3C traceparent honoured, never used as a key."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as sync_redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from conftest import ADMIN_KEY, PROVIDER_KEY, TEST_PLANS, Harness, emulator_state, make_settings
from multidict import CIMultiDict
from served import account_with_key, serve, wait_ready, wait_until

from gateway import logs
from gateway.app import AccessLogger, create_app
from gateway.embedded import free_port
from gateway.logs import client_request_id, trace_id
from gateway.money import format_credits

PLANS = TEST_PLANS + """  rpm1:
    monthly_credits: 100
    credit_usd: 1
    models: ["demo-*"]
    limits: {requests_per_minute: 1}
"""
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"
CHAT = {"model": "demo-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hello"}]}
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


@pytest.fixture
def log_lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """Every log record of the test, in the format GATEWAY_LOG_FORMAT names (json here)."""
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, "json")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def _records(stream: io.StringIO) -> list[dict[str, Any]]:
    out = []
    for line in stream.getvalue().splitlines():
        record = json.loads(line)  # every line is one JSON object
        assert TS.fullmatch(record["ts"]) and record["level"] and record["logger"] and "msg" in record, record
        out.append(record)
    return out


async def _access(stream: io.StringIO, request_id: str) -> dict[str, Any]:
    """The access record of `request_id` (written once the response is done and the call has ended)."""
    for _ in range(3000):  # up to 30 s: the call ends after the response, on a loaded machine later
        found = [r for r in _records(stream) if r.get("request_id") == request_id and r["msg"] == "access"]
        if found:
            assert len(found) == 1, found
            return found[0]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no access record for {request_id}: {stream.getvalue()}")


async def _text_lines(caplog: pytest.LogCaptureFixture, request_id: str) -> list[str]:
    """The text access lines naming `request_id` (written once the response is done and the call has ended)."""
    for _ in range(3000):  # up to 30 s: the call ends after the response, on a loaded machine later
        lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access" and request_id in r.getMessage()]
        if lines:
            return lines
        await asyncio.sleep(0.01)
    raise AssertionError(f"no access line for {request_id}")


async def _post(client: TestClient[Any, Any], key: str, body: dict[str, Any] = CHAT, **headers: str
                ) -> tuple[int, CIMultiDict[str], bytes]:
    async with client.post("/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {key}", **headers}) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


def _no_secrets(text: str, key: str) -> None:
    for secret in (key, key[4:20], key[:12], PROVIDER_KEY, ADMIN_KEY):
        assert secret not in text, secret


def _key_id(harness: Harness, account: str) -> str:
    return next(e["key_id"] for e in harness.ledger(account) if e["type"] == "key_created")


async def test_a_served_request_is_one_json_access_record_with_its_settled_credits(
        harness: Harness, log_lines: io.StringIO) -> None:
    account, key = await harness.account(credits=1)
    status, headers, _ = await _post(harness.client, key,
                                     **{"X-Request-ID": "client-abc_123", "traceparent": TRACEPARENT})
    assert status == 200
    rid = headers["x-gateway-request-id"]
    assert rid.startswith("req_") and headers["request-id"] == rid
    assert headers["x-request-id"] == "client-abc_123"  # the client's own id echoed
    await harness.gw.quiesce()
    record = await _access(log_lines, rid)
    charged = harness.state(account)["charged"]
    assert charged > 0
    assert record["level"] == "INFO" and record["logger"] == "aiohttp.access"
    assert record["client_request_id"] == "client-abc_123" and record["trace_id"] == TRACE
    assert record["account_id"] == account and record["key_id"] == _key_id(harness, account)
    assert (record["dialect"], record["model"], record["route"], record["upstream"]) == (
        "openai", "demo-mini", "demo-mini", "demo")
    assert (record["method"], record["path"], record["status"], record["outcome"]) == (
        "POST", "/v1/chat/completions", 200, "served")
    assert record["credits_micro"] == charged and record["credits"] == format_credits(charged)
    assert record["input_tokens"] > 0 and record["output_tokens"] > 0
    assert record["latency_ms"] >= record["upstream_ms"] >= 0 and "cause" not in record
    usage = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert usage[0]["client_request_id"] == "client-abc_123"  # in the ledger event as a label
    _no_secrets(log_lines.getvalue(), key)


async def test_a_stream_records_its_time_to_first_token(harness: Harness, log_lines: io.StringIO) -> None:
    account, key = await harness.account(credits=1)
    status, headers, body = await _post(harness.client, key, {**CHAT, "stream": True})
    assert status == 200 and b"data:" in body
    await harness.gw.quiesce()
    record = await _access(log_lines, headers["x-request-id"])
    assert record["outcome"] == "served" and record["credits_micro"] == harness.state(account)["charged"] > 0
    assert 0 < record["ttft_ms"] <= record["latency_ms"]


async def test_an_upstream_500_and_429_are_logged_with_their_cause_and_nothing_charged(
        harness: Harness, log_lines: io.StringIO) -> None:
    account, key = await harness.account(credits=1)
    for fail, cause in (("500", "status_5xx"), ("429", "status_4xx")):
        body = {**CHAT, "messages": [{"role": "user", "content": f"x [[emu fail={fail}]]"}]}
        status, headers, _ = await _post(harness.client, key, body)
        assert status == int(fail)
        await harness.gw.quiesce()
        record = await _access(log_lines, headers["x-request-id"])
        assert (record["outcome"], record["cause"], record["upstream_status"], record["status"]) == (
            "upstream_error", cause, int(fail), int(fail))
        assert record["account_id"] == account and record["upstream"] == "demo" and "credits" not in record
    assert harness.state(account)["charged"] == 0
    _no_secrets(log_lines.getvalue(), key)


async def test_an_upstream_that_refuses_connections_is_logged_as_cause_connect(
        redis_url: str, config_dir: Path, emulator: TestServer, monkeypatch: pytest.MonkeyPatch,
        log_lines: io.StringIO) -> None:
    monkeypatch.setenv("EMULATOR_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens
    server = TestServer(create_app(make_settings(config_dir, redis_url)))
    await server.start_server(access_log_class=AccessLogger)
    client: TestClient[Any, Any] = TestClient(server)
    await client.start_server()
    try:
        h = Harness(client, sync_redis.Redis.from_url(redis_url), emulator)
        account, key = await h.account(credits=1)
        status, headers, _ = await _post(client, key)
        assert status == 502
        await h.gw.quiesce()
        record = await _access(log_lines, headers["x-request-id"])
        assert (record["outcome"], record["cause"], record["status"]) == ("upstream_error", "connect", 502)
        assert record["error"] == "ClientConnectorError" and record["account_id"] == account
        metrics = (await (await client.get("/metrics")).text())
        assert 'gateway_upstream_errors_total{cause="connect",upstream="demo"} 1.0' in metrics
        assert h.state(account)["charged"] == 0 and h.holds(account) == {}
        _no_secrets(log_lines.getvalue(), key)
        h.redis.close()
    finally:
        await client.close()


async def test_refusals_are_logged_as_refused_and_limited(harness: Harness, log_lines: io.StringIO) -> None:
    broke, broke_key = await harness.account(credits=0)
    status, headers, _ = await _post(harness.client, broke_key)
    assert status == 402
    record = await _access(log_lines, headers["x-request-id"])
    assert (record["outcome"], record["status"], record["account_id"]) == ("refused", 402, broke)
    assert record["key_id"] == _key_id(harness, broke) and record["model"] == "demo-mini"

    limited, limited_key = await harness.account(credits=10, plan="rpm1")
    assert (await _post(harness.client, limited_key))[0] == 200
    status, headers, _ = await _post(harness.client, limited_key, **{"X-Request-ID": "retry-7"})
    assert status == 429 and headers["x-request-id"] == "retry-7"
    record = await _access(log_lines, headers["x-gateway-request-id"])
    assert (record["outcome"], record["status"], record["account_id"]) == ("limited", 429, limited)
    assert record["client_request_id"] == "retry-7"
    await harness.gw.quiesce()
    text = log_lines.getvalue()
    _no_secrets(text, broke_key)
    _no_secrets(text, limited_key)


async def test_a_repeated_client_request_id_is_never_a_hold_or_settlement_id(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    answers = [await _post(harness.client, key, **{"X-Request-ID": "same-id"}) for _ in range(2)]
    await harness.gw.quiesce()
    assert [a[0] for a in answers] == [200, 200]
    gateway_ids = {a[1]["x-gateway-request-id"] for a in answers}
    assert len(gateway_ids) == 2 and {a[1]["x-request-id"] for a in answers} == {"same-id"}
    usage = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert len(usage) == 2 and all(int(e["cost"]) > 0 for e in usage)
    assert {e["rid"] for e in usage} == gateway_ids  # both charged, each under the gateway's id
    await harness.assert_conserved(account)


@pytest.mark.parametrize("given", ["has space", "x" * 129, "naïve", ""])
async def test_an_invalid_x_request_id_is_ignored(harness: Harness, log_lines: io.StringIO, given: str) -> None:
    _, key = await harness.account(credits=1)
    status, headers, _ = await _post(harness.client, key, **{"X-Request-ID": given, "traceparent": "00-" + "0" * 32
                                                             + "-00f067aa0ba902b7-01"})
    assert status == 200 and headers["x-request-id"] == headers["x-gateway-request-id"]
    await harness.gw.quiesce()
    record = await _access(log_lines, headers["x-request-id"])
    assert "client_request_id" not in record and "trace_id" not in record


async def test_traceparent_goes_upstream_unchanged_without_tracing(harness: Harness) -> None:
    _, key = await harness.account(credits=1)
    assert (await _post(harness.client, key, traceparent=TRACEPARENT))[0] == 200
    received = emulator_state(harness.emulator).received[-1]["headers"]
    assert {k.lower(): v for k, v in received.items()}["traceparent"] == TRACEPARENT


async def test_text_format_carries_the_key_facts_on_one_line(harness: Harness, caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    caplog.set_level(logging.INFO)
    account, key = await harness.account(credits=1)
    body = {**CHAT, "messages": [{"role": "user", "content": "x [[emu fail=500]]"}]}
    status, headers, _ = await _post(harness.client, key, body, **{"X-Request-ID": "abc"})
    assert status == 500
    await harness.gw.quiesce()
    rid = headers["x-gateway-request-id"]
    lines = await _text_lines(caplog, rid)
    assert lines == [f"POST /v1/chat/completions 500 {lines[0].split()[3]} {rid} outcome=upstream_error "
                     f"client_request_id=abc account_id={account} key_id={_key_id(harness, account)} "
                     f"model=demo-mini route=demo-mini upstream=demo cause=status_5xx upstream_status=500 "
                     f"upstream_ms={lines[0].rsplit('upstream_ms=', 1)[1]}"]
    _, ok_headers, _ = await _post(harness.client, key)
    await harness.gw.quiesce()
    ok = await _text_lines(caplog, ok_headers["x-request-id"])
    assert f"credits={format_credits(harness.state(account)['charged'])}" in ok[0] and "outcome=served" in ok[0]


async def test_other_routes_get_a_plain_json_line_and_every_logger_writes_json(
        harness: Harness, log_lines: io.StringIO) -> None:
    async with harness.client.get("/health") as resp:
        assert resp.status == 200
    logging.getLogger("gateway.test").warning("something %s", "odd")
    for _ in range(3000):  # up to 30 s: the call ends after the response, on a loaded machine later
        records = _records(log_lines)
        if any(r.get("path") == "/health" for r in records):
            break
        await asyncio.sleep(0.01)
    health = next(r for r in records if r.get("path") == "/health")
    assert health["status"] == 200 and health["method"] == "GET" and "latency_ms" in health
    assert {"level": "WARNING", "logger": "gateway.test", "msg": "something odd"}.items() <= next(
        r for r in records if r["logger"] == "gateway.test").items()


def test_client_request_id_rules() -> None:
    assert client_request_id("abc-DEF_123.:/=") == "abc-DEF_123.:/="
    assert client_request_id("x" * 128) == "x" * 128
    for bad in (None, "", "x" * 129, "a b", "a\tb", "a\x7fb", "é", "a\nb"):
        assert client_request_id(bad) is None, bad


def test_traceparent_rules() -> None:
    assert trace_id(TRACEPARENT) == TRACE
    assert trace_id(f"01-{TRACE}-00f067aa0ba902b7-01-extra") == TRACE  # a later version may carry more
    for bad in (None, "", f"00-{TRACE}-00f067aa0ba902b7-01-extra", f"ff-{TRACE}-00f067aa0ba902b7-01",
                f"00-{'0' * 32}-00f067aa0ba902b7-01", f"00-{TRACE}-{'0' * 16}-01",
                f"00-{TRACE.upper()}-00f067aa0ba902b7-01",
                f"00-{TRACE}-00f067aa0ba902b7"):
        assert trace_id(bad) is None, bad


def test_setup_writes_json_lines_with_exceptions(root_only: logging.Logger) -> None:
    stream = io.StringIO()
    logs.setup(fmt="json", stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("gateway.x").exception("failed %d", 3)
    (record,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert record["level"] == "ERROR" and record["msg"] == "failed 3" and "ValueError: boom" in record["exc"]


def test_apply_env_format_switches_plain_stderr_handlers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    plain = logging.StreamHandler(io.StringIO())
    root.addHandler(plain)
    try:
        monkeypatch.setenv(logs.LOG_FORMAT_ENV, "text")
        logs.apply_env_format()
        assert not isinstance(plain.formatter, logs.JsonFormatter)
        monkeypatch.setenv(logs.LOG_FORMAT_ENV, "JSON")
        logs.apply_env_format()
        assert isinstance(plain.formatter, logs.JsonFormatter)
        assert all(not isinstance(h.formatter, logs.JsonFormatter) for h in root.handlers if h is not plain
                   and type(h) is not logging.StreamHandler)
    finally:
        root.removeHandler(plain)



async def test_gateway_serve_with_json_logs_writes_json_lines(tmp_path: Path, config_dir: Path, redis_url: str,
                                                              emulator: TestServer) -> None:
    served = serve(tmp_path, config_dir, redis_url=redis_url, env={logs.LOG_FORMAT_ENV: "json"})
    try:
        await wait_ready(served)
        account, key = await account_with_key(served)
        async with aiohttp.ClientSession() as session, session.post(
                served.url("/v1/chat/completions"), json=CHAT,
                headers={"Authorization": f"Bearer {key}", "X-Request-ID": "from-serve"}) as resp:
            assert resp.status == 200
            rid = resp.headers["x-gateway-request-id"]

        def access() -> dict[str, Any] | None:
            return next((json.loads(line) for line in served.log().splitlines() if rid in line), None)

        async def written() -> dict[str, Any] | None:
            return access()

        record = await wait_until(written, "the access record")
    finally:
        assert served.stop() == 0
    assert (record["msg"], record["outcome"], record["account_id"], record["client_request_id"]) == (
        "access", "served", account, "from-serve")
    assert record["credits_micro"] > 0
    lines = served.log().splitlines()
    printed = ("gateway listening on", "embedded redis-server at")  # the CLI's own banner, not log records
    assert all(json.loads(line)["level"] for line in lines if not line.startswith(printed))
    _no_secrets(served.log(), key)


# ---------------------------------------------------------------- the access lines' own path (gateway serve's handler)


class _Writes(io.StringIO):
    """A stream that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _served_request(request_id: str) -> tuple[web.Request, web.Response, logs.Access]:
    """A proxied request's access record as the proxy fills it in, with its request and response."""
    request = make_mocked_request("POST", "/v1/chat/completions")
    access = logs.Access(request_id, "client-1", TRACE, "openai")
    access.account_id, access.key_id, access.model, access.route, access.upstream = (
        "acct_1", "key_1", "demo-mini", "demo-*", "demo")
    access.input_tokens, access.output_tokens, access.credits_micro, access.upstream_ms = 12, 34, 1_234, 5.0
    access.settled = False
    request[logs.ACCESS] = access
    return request, web.Response(status=200, headers={"x-gateway-request-id": request_id}), access


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_access_lines_skip_logging_but_read_exactly_as_its_records(
        fmt: str, root_only: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, fmt)
    monkeypatch.setattr(time, "time", lambda: 1_764_000_000.25)  # LogRecord.created and the direct line alike
    written: dict[str, str] = {}
    for path in ("direct", "logging"):
        stream = io.StringIO()
        logs.setup(stream=stream)
        access_logger = logging.getLogger("aiohttp.access")
        if path == "logging":  # an operator's filter: every record goes through logging
            access_logger.addFilter(lambda record: True)
        try:
            assert (logs.direct_handler(access_logger) is not None) == (path == "direct")
            request, response, access = _served_request("req_1")
            AccessLogger(access_logger, "").log(request, response, 0.0123)
            access.call_ended(200)
            AccessLogger(access_logger, "").log(make_mocked_request("GET", "/health?key=sk-secret"),
                                                web.Response(headers={"x-gateway-request-id": "req_2"}), 0.001)
            logs.flush()
        finally:
            access_logger.filters.clear()
        written[path] = stream.getvalue()
    assert written["direct"] == written["logging"]
    lines = written["direct"].splitlines()
    assert len(lines) == 2 and "sk-secret" not in written["direct"]
    if fmt == "json":
        assert json.loads(lines[0])["settlement"] == "queued" and json.loads(lines[1])["path"] == "/health"
    else:
        assert lines[0].endswith(f"INFO POST /v1/chat/completions 200 12.3ms req_1 outcome=served "
                                 f"client_request_id=client-1 trace_id={TRACE} account_id=acct_1 key_id=key_1 "
                                 "model=demo-mini route=demo-* upstream=demo input_tokens=12 output_tokens=34 "
                                 "credits=0.001234 settlement=queued upstream_ms=5.0")


async def test_buffered_access_lines_are_written_once_in_order_in_whole_line_chunks(
        root_only: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, "text")
    stream = _Writes()
    logs.setup(stream=stream)
    access_logger = logging.getLogger("aiohttp.access")
    for n in range(40):
        request, response, access = _served_request(f"req_{n:03d}")
        AccessLogger(access_logger, "").log(request, response, 0.001)
        access.call_ended(200)
    logging.getLogger("gateway.test").warning("after forty requests")  # writes the lines buffered before it
    request, response, access = _served_request("req_last")
    AccessLogger(access_logger, "").log(request, response, 0.001)
    access.call_ended(200)
    for _ in range(500):  # the loop's timer writes the last line (ACCESS_FLUSH_SECONDS), no flush called
        if "req_last" in stream.getvalue():
            break
        await asyncio.sleep(0.01)
    lines = stream.getvalue().splitlines()
    assert [line.split()[8] for line in lines if "outcome=" in line] == [f"req_{n:03d}" for n in range(40)] + [
        "req_last"]
    assert "after forty requests" in lines[40]
    assert len(stream.writes) > 3  # several chunks, each of whole lines that one write to a pipe keeps together
    assert all(chunk.endswith("\n") and len(chunk.encode()) <= logs.ACCESS_CHUNK_BYTES for chunk in stream.writes)


def test_an_operators_own_handler_gets_every_access_record(root_only: logging.Logger) -> None:
    stream = io.StringIO()
    logs.setup(fmt="text", stream=stream)
    records: list[logging.LogRecord] = []
    extra = logging.Handler()
    extra.emit = records.append  # type: ignore[method-assign]
    root_only.addHandler(extra)
    access_logger = logging.getLogger("aiohttp.access")
    assert logs.direct_handler(access_logger) is None
    request, response, access = _served_request("req_seen")
    AccessLogger(access_logger, "").log(request, response, 0.001)
    access.call_ended(200)
    assert [r.getMessage().split()[4] for r in records] == ["req_seen"]
    assert "req_seen" in stream.getvalue()  # logging's path writes at once
